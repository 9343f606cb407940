"""The nginx image made from Debian's package (scripts/nginx_image.py): reproducible, and the
seed's story in the multi-host harness (tests/integration/hosts.py): run it on the default
network, fetch its page from its host's namespace, change the page with `exec`, commit it, run
the commit on the other host and fetch the changed page there. The addresses curl talks to are
the containers', which the agents gave inside host namespaces this test made."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.nginx_image import make_nginx_image

from .hosts import HostService
from .nginx import WELCOME, NginxLayout
from .test_networks import Net, leftovers, network_cluster  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration

IMAGE = "test/nginx:1"
CHANGED = "test/nginx:changed"
PAGE = "/usr/share/nginx/html/index.html"


@pytest.fixture(scope="module")
def image_service(network_cluster: Net) -> Iterator[HostService]:  # noqa: F811
    """The image service (commit) in the control namespace, next to the cluster."""
    net = network_cluster
    data = f"--data-dir={net.run_dir / 'image'}"
    service = net.net.start_service(net.net.ctl, "image", data, prefix=net.prefix)
    try:
        yield service.wait_ready()
    finally:
        service.stop()


def test_the_same_debs_make_the_same_image(nginx_layout: NginxLayout, tmp_path: Path) -> None:
    again = make_nginx_image(tmp_path / "again", "latest")
    assert again.digest == nginx_layout.digest
    index = json.loads((nginx_layout.path / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [nginx_layout.digest]
    blobs = nginx_layout.path / "blobs" / "sha256"
    manifest = json.loads((blobs / nginx_layout.digest.removeprefix("sha256:")).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_text())
    assert config["config"]["Cmd"] == ["nginx", "-g", "daemon off;"]
    assert config["config"]["ExposedPorts"] == {"80/tcp": {}}
    assert nginx_layout.version.startswith("1.22")


def _address(net: Net, name: str) -> str:
    """The container's address once it runs (its status write follows the start)."""
    deadline = time.monotonic() + 60
    while True:
        shown = net.cli("--format", "json", "inspect", name)
        assert shown.returncode == 0, shown.stderr
        info = json.loads(shown.stdout)[0]
        address = info["NetworkSettings"]["IPAddress"]
        if info["State"]["Status"] == "running" and address:
            return address
        assert info["State"]["Status"] != "exited", net.cli("logs", name).stderr
        assert time.monotonic() < deadline, f"{name}: {info['State']}"
        time.sleep(0.2)


def _fetch(net: Net, host: int, address: str, want: str) -> str:
    """GET / from the host's namespace until the page says `want` (nginx binds port 80 a few
    milliseconds after its container counts as running)."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            [
                *net.net.exec_argv(net.net.host(host)),
                "curl",
                "-sS",
                "-m",
                "5",
                f"http://{address}/",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 and want in done.stdout:
            return done.stdout
        assert time.monotonic() < deadline, f"curl {address}: {done.stdout or done.stderr}"
        time.sleep(0.2)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_nginx_answers_on_its_address_and_a_commit_serves_the_change_on_another_host(
    network_cluster: Net,  # noqa: F811
    nginx_layout: NginxLayout,
    image_service: HostService,
) -> None:
    net = network_cluster
    cli = net.cli
    _ok(cli("--registry", net.registry, "oci", "push", nginx_layout.source, IMAGE))
    try:
        run = ["run", "-d", "--network", "berth", "--name"]
        _ok(cli(*run, "nginx", "--constraint", "node.id==host1", IMAGE))
        address = _address(net, "nginx")
        assert address.startswith("10.89.")  # the default network's range
        page = _fetch(net, 1, address, WELCOME)
        assert f"nginx {nginx_layout.version}" in page
        # Its access log is its output: the request above is in `berth logs`.
        assert '"GET / HTTP/1.1" 200' in _ok(cli("logs", "nginx"))

        _ok(cli("exec", "nginx", "sh", "-c", f"echo changed by exec > {PAGE}"))
        assert _fetch(net, 1, address, "changed by exec") == "changed by exec\n"
        commit = ["--image-service", image_service.address, "commit", "-m", "a changed page"]
        _ok(cli(*commit, "nginx", CHANGED))

        _ok(cli(*run, "nginx2", "--constraint", "node.id==host2", CHANGED))
        other = _address(net, "nginx2")
        assert other != address
        assert _fetch(net, 2, other, "changed by exec") == "changed by exec\n"
    finally:
        for name in ("nginx", "nginx2"):
            cli("rm", "-f", name)
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}
