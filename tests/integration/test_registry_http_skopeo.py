"""skopeo (Debian's, containers/image) against the registry's OCI HTTP API: copies into and
out of berth from an OCI layout and a docker-archive, by tag and by digest, with berth tokens
as credentials and anonymously for a public repository; a pull-only token cannot push."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from berth.client import RegistryClient
from berthd.common.store import Store
from scripts.oci_images import make_busybox_image

from .conftest import ServiceProcess
from .oci_http import make_token


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory) -> Path:
    layout = tmp_path_factory.mktemp("oci") / "busybox"
    make_busybox_image(layout, "latest")
    return layout


def test_skopeo_copies_into_and_out_of_berth(
    oci_registry: ServiceProcess, admin_token: str, busybox_layout: Path, tmp_path: Path
) -> None:
    host = oci_registry.http_url.removeprefix("http://")
    creds = f"anyone:{admin_token}"
    push = ["--dest-tls-verify=false", "--dest-creds", creds]
    pull = ["--src-tls-verify=false", "--src-creds", creds]
    skopeo("copy", *push, f"oci:{busybox_layout}:latest", f"docker://{host}/demo/busybox:1.35")
    source = json.loads(skopeo("inspect", "--raw", f"oci:{busybox_layout}:latest").stdout)
    raw = skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        creds,
        f"docker://{host}/demo/busybox:1.35",
    )
    # Stored byte for byte: the same manifest, so the same digest.
    assert json.loads(raw.stdout) == source
    inspected = json.loads(
        skopeo(
            "inspect", "--tls-verify=false", "--creds", creds, f"docker://{host}/demo/busybox:1.35"
        ).stdout
    )
    digest = inspected["Digest"]
    with RegistryClient(oci_registry.address) as client:
        assert client.get_manifest("demo/busybox", "1.35").digest == digest

    # Out by digest, into an OCI layout and a docker-archive.
    skopeo("copy", *pull, f"docker://{host}/demo/busybox@{digest}", f"oci:{tmp_path / 'out'}:1")
    copied = json.loads(skopeo("inspect", "--raw", f"oci:{tmp_path / 'out'}:1").stdout)
    assert copied == source
    archive = tmp_path / "busybox.tar"
    skopeo(
        "copy",
        *pull,
        f"docker://{host}/demo/busybox:1.35",
        f"docker-archive:{archive}:demo/busybox:1.35",
    )
    # And a docker-archive back in (skopeo makes a Docker schema 2 manifest of it), by tag.
    skopeo("copy", *push, f"docker-archive:{archive}", f"docker://{host}/demo/fromarchive:1")
    back = json.loads(
        skopeo(
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            creds,
            f"docker://{host}/demo/fromarchive:1",
        ).stdout
    )
    assert back["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(back["layers"]) == len(source["layers"])
    # Copying again moves no layer: skopeo asks first (HEAD), the blobs are there.
    received = received_bytes(oci_registry)
    assert received > 0
    skopeo("copy", *push, f"oci:{busybox_layout}:latest", f"docker://{host}/demo/busybox:again")
    assert received_bytes(oci_registry) == received


def received_bytes(registry: ServiceProcess) -> float:
    with urllib.request.urlopen(registry.metrics, timeout=30) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("berth_registry_received_bytes_total "):
                return float(line.split()[1])
    raise AssertionError("no berth_registry_received_bytes_total")


async def test_skopeo_anonymous_and_pull_only(
    oci_registry: ServiceProcess, admin_token: str, busybox_layout: Path, store: Store
) -> None:
    host = oci_registry.http_url.removeprefix("http://")
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"x:{admin_token}",
        f"oci:{busybox_layout}:latest",
        f"docker://{host}/lib/busybox:1",
    )
    # Private: an anonymous skopeo is refused.
    refused = skopeo("inspect", "--tls-verify=false", f"docker://{host}/lib/busybox:1", check=False)
    assert refused.returncode != 0
    assert "unauthorized" in refused.stderr.lower() or "authentication required" in refused.stderr
    with RegistryClient(oci_registry.address) as client:
        client.update_repository("lib/busybox", visibility="public")
    # Public: anonymous skopeo follows the challenge, gets an anonymous token and pulls.
    shown = json.loads(
        skopeo("inspect", "--tls-verify=false", f"docker://{host}/lib/busybox:1").stdout
    )
    assert shown["Digest"].startswith("sha256:")
    # A reader's token pulls but cannot push.
    reader = await make_token(store, "reader", "reader")
    denied = skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"x:{reader}",
        f"oci:{busybox_layout}:latest",
        f"docker://{host}/lib/busybox:2",
        check=False,
    )
    assert denied.returncode != 0
    with RegistryClient(oci_registry.address) as client:
        assert [t.name for t in client.iter_tags("lib/busybox")] == ["1"]
