"""Docker's engine and containerd's `ctr` (Debian's docker.io and containerd) against the
registry's OCI HTTP API. Each test starts its own daemon with its own data, exec root and
socket (dockerd with `--iptables=false --bridge=none`, so the host's firewall and bridges are
left alone) and stops it by pid; a registry on 127.0.0.0/8 needs no `insecure-registries`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.client import RegistryClient
from scripts.oci_images import make_busybox_image

from .conftest import ServiceProcess, spawn, stop_process, wait_until


def push_busybox(host: str, token: str, repository: str, tmp_path: Path) -> None:
    layout = tmp_path / "busybox"
    make_busybox_image(layout, "latest")
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"x:{token}",
            f"oci:{layout}:latest",
            f"docker://{host}/{repository}",
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Daemon sockets need short paths (a unix socket path is at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="berth-d-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dockerd(short_dir: Path, tmp_path: Path) -> Iterator[list[str]]:
    """A private dockerd; yields the docker CLI's argv prefix."""
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd (Debian's docker.io) is not installed")
    sock = short_dir / "docker.sock"
    proc = spawn(
        [
            "dockerd",
            "--data-root",
            str(tmp_path / "docker-data"),
            "--exec-root",
            str(short_dir / "exec"),
            "--pidfile",
            str(short_dir / "docker.pid"),
            "-H",
            f"unix://{sock}",
            "--iptables=false",
            "--bridge=none",
            "--log-level=warn",
        ],
        tmp_path / "dockerd.log",
    )
    docker = ["docker", "-H", f"unix://{sock}"]
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker-config")}
    try:
        wait_until(
            lambda: (
                subprocess.run([*docker, "version"], capture_output=True, env=env).returncode == 0
            ),
            60,
            "dockerd",
            proc,
        )
        yield docker
    finally:
        stop_process(proc, timeout=30)


def run(argv: list[str], tmp_path: Path, stdin: str | None = None) -> str:
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker-config")}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, input=stdin, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_docker_login_pull_run_push(
    oci_registry: ServiceProcess, admin_token: str, dockerd: list[str], tmp_path: Path
) -> None:
    host = oci_registry.http_url.removeprefix("http://")
    push_busybox(host, admin_token, "demo/busybox:1", tmp_path)
    docker = dockerd
    login = run([*docker, "login", "-u", "ci", "--password-stdin", host], tmp_path, admin_token)
    assert "Login Succeeded" in login
    run([*docker, "pull", f"{host}/demo/busybox:1"], tmp_path)
    said = run(
        [*docker, "run", "--rm", "--network", "none", f"{host}/demo/busybox:1", "echo", "hi"],
        tmp_path,
    )
    assert said == "hi\n"
    run([*docker, "tag", f"{host}/demo/busybox:1", f"{host}/demo/from-docker:2"], tmp_path)
    run([*docker, "push", f"{host}/demo/from-docker:2"], tmp_path)
    with RegistryClient(oci_registry.address) as client:
        assert [t.name for t in client.iter_tags("demo/from-docker")] == ["2"]
    run([*docker, "rmi", f"{host}/demo/busybox:1", f"{host}/demo/from-docker:2"], tmp_path)


def test_ctr_pulls_from_berth(
    oci_registry: ServiceProcess, admin_token: str, short_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd (Debian's) is not installed")
    host = oci_registry.http_url.removeprefix("http://")
    push_busybox(host, admin_token, "demo/busybox:1", tmp_path)
    sock = short_dir / "containerd.sock"
    config = tmp_path / "containerd.toml"
    # Its own state, root and sockets; no CRI plugin (nothing of Kubernetes here).
    config.write_text(
        'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[debug]\n  address = "{sock}.debug"\n'
    )
    proc = spawn(
        [
            "containerd",
            "--config",
            str(config),
            "--root",
            str(tmp_path / "containerd-root"),
            "--state",
            str(short_dir / "state"),
        ],
        tmp_path / "containerd.log",
    )
    ctr = ["ctr", "--address", str(sock)]
    try:
        wait_until(
            lambda: subprocess.run([*ctr, "version"], capture_output=True).returncode == 0,
            60,
            "containerd",
            proc,
        )
        pulled = run(
            [
                *ctr,
                "images",
                "pull",
                "--plain-http",
                "--user",
                f"ci:{admin_token}",
                f"{host}/demo/busybox:1",
            ],
            tmp_path,
        )
        assert "done" in pulled
        listed = run([*ctr, "images", "ls", "-q"], tmp_path)
        assert f"{host}/demo/busybox:1" in listed.split()
        with RegistryClient(oci_registry.address) as client:
            digest = client.get_manifest("demo/busybox", "1").digest
        assert digest in run([*ctr, "images", "ls"], tmp_path)
        # Anonymous, once the repository is public.
        with RegistryClient(oci_registry.address) as client:
            client.update_repository("demo/busybox", visibility="public")
        run([*ctr, "images", "rm", f"{host}/demo/busybox:1"], tmp_path)
        run([*ctr, "images", "pull", "--plain-http", f"{host}/demo/busybox:1"], tmp_path)
    finally:
        stop_process(proc, timeout=30)
