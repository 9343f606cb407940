"""podman (Debian's) against the registry's OCI HTTP API: pull an image from berth, run it,
tag and push it back; `podman login` with a berth token. podman keeps everything in the test's
own directories (storage with the vfs driver, run root, auth file, containers.conf with what
this host needs: docs/HOST-NOTES in the design notes), so nothing of the machine's is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from berth.client import RegistryClient
from scripts.oci_images import make_busybox_image

from .conftest import ServiceProcess

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")

CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


class Podman:
    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        # podman refuses a run root over 50 characters: a short one of its own in /tmp.
        self.runroot = Path(tempfile.mkdtemp(prefix="berth-podman-"))
        conf = home / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.home = home
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
            "HOME": str(home),
        }
        self.flags = [
            "--root",
            str(home / "storage"),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            "--tmpdir",
            str(home / "tmp"),
        ]

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *self.flags, *args],
            capture_output=True,
            text=True,
            env=self.env,
            input=stdin,
            timeout=300,
        )
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stderr}"
        return result

    def clean(self) -> None:
        subprocess.run(
            ["podman", *self.flags, "system", "reset", "--force"],
            capture_output=True,
            env=self.env,
            timeout=120,
        )
        shutil.rmtree(self.runroot, ignore_errors=True)


def test_podman_login_pull_run_push(
    oci_registry: ServiceProcess, admin_token: str, tmp_path: Path
) -> None:
    host = oci_registry.http_url.removeprefix("http://")
    layout = tmp_path / "busybox"
    make_busybox_image(layout, "latest")
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"x:{admin_token}",
            f"oci:{layout}:latest",
            f"docker://{host}/demo/busybox:1",
        ],
        check=True,
        capture_output=True,
    )
    podman = Podman(tmp_path / "podman")
    try:
        podman(
            "login", "--tls-verify=false", "-u", "ci", "--password-stdin", host, stdin=admin_token
        )
        podman("pull", "--tls-verify=false", f"{host}/demo/busybox:1")
        ran = podman("run", "--rm", f"{host}/demo/busybox:1", "echo", "hello from berth")
        assert ran.stdout == "hello from berth\n"
        podman("tag", f"{host}/demo/busybox:1", f"{host}/demo/from-podman:2")
        podman("push", "--tls-verify=false", f"{host}/demo/from-podman:2")
        with RegistryClient(oci_registry.address) as client:
            assert [t.name for t in client.iter_tags("demo/from-podman")] == ["2"]
    finally:
        podman.clean()
