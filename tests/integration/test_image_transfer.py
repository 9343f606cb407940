"""berth pull / push against Debian's docker-registry on loopback, checked with skopeo.

Real processes throughout: berth's registry, etcd, docker-registry (with no auth, htpasswd
basic auth, or token auth with a token server in this process) and skopeo.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from isal import igzip
from prometheus_client import REGISTRY

from berth.client import RegistryClient
from berthd.common.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from berthd.common.oci import mediatypes
from berthd.common.oci.platform import host_platform
from berthd.common.rpc.registry import RegistryApi
from berthd.image.catalog import Catalog
from berthd.image.model import CONFIG_PREFIX, Credentials, Event, State
from berthd.image.transfer import pull_external, push_external

from .conftest import free_port
from .docker_registry import (  # noqa: F401  (the fixtures)
    DockerRegistry,
    docker_registry_basic_fixture,
    docker_registry_fixture,
    docker_registry_token_fixture,
)
from .images import sha, tar_of

pytestmark = pytest.mark.integration


@pytest.fixture
async def catalog(store, registry, tmp_path: Path) -> AsyncIterator[Catalog]:
    catalog = Catalog(store, RegistryApi(registry.address), tmp_path / "scratch")
    yield catalog
    await catalog.close()


def final_states(events: list[Event]) -> dict[str, State]:
    """The last state each blob reached (by digest, the config's without its id prefix)."""
    return {e.id.removeprefix(CONFIG_PREFIX): e.state for e in events}


def external_bytes(direction: str) -> float:
    """berth_image_external_bytes_total{direction} of this process."""
    labels = {"direction": direction}
    return REGISTRY.get_sample_value("berth_image_external_bytes_total", labels) or 0.0


def skopeo(*args: str) -> bytes:
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args], check=True, capture_output=True
    ).stdout


def skopeo_inspect(reference: str, raw: bool = False) -> dict:
    args = ["inspect", "--tls-verify=false", *(["--raw"] if raw else []), f"docker://{reference}"]
    return json.loads(skopeo(*args))


def blobs_of(manifest: bytes) -> list[str]:
    doc = json.loads(manifest)
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def assert_scratch_empty(catalog: Catalog) -> None:
    leftovers = list(catalog.scratch.iterdir()) if catalog.scratch.exists() else []
    assert leftovers == []


# --- images that skopeo pushes to the remote ------------------------------------------------


def oci_image(files: dict[str, bytes], arch: str) -> tuple[list[bytes], bytes]:
    """Blobs (config, layer, manifest) of a one-layer OCI image, and its manifest."""
    layer_tar = tar_of(files)
    layer = igzip.compress(layer_tar, compresslevel=1)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]},
            "history": [{"created_by": "test_image_transfer"}],
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_IMAGE_MANIFEST,
            "config": {"mediaType": mediatypes.OCI_IMAGE_CONFIG, "digest": sha(config),
                       "size": len(config)},
            "layers": [{"mediaType": mediatypes.OCI_LAYER_TAR_GZIP, "digest": sha(layer),
                        "size": len(layer)}],
        }
    ).encode()  # fmt: skip
    return [config, layer, manifest], manifest


def write_layout(root: Path, tag: str, blobs: list[bytes], top: bytes, media_type: str) -> None:
    """An OCI image layout whose index.json names `top` as `tag`."""
    (root / "blobs" / "sha256").mkdir(parents=True)
    for blob in blobs:
        (root / "blobs" / "sha256" / sha(blob)[7:]).write_bytes(blob)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry = {
        "mediaType": media_type,
        "digest": sha(top),
        "size": len(top),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


def skopeo_push_image(tmp: Path, destination: str, files: dict[str, bytes]) -> None:
    """skopeo copies a one-layer image to the remote, converted to Docker schema2."""
    blobs, manifest = oci_image(files, host_platform()[1])
    write_layout(tmp / "layout", "v1", blobs, manifest, mediatypes.OCI_IMAGE_MANIFEST)
    skopeo(
        "copy", "--dest-tls-verify=false", "--format=v2s2",
        f"oci:{tmp / 'layout'}:v1", f"docker://{destination}",
    )  # fmt: skip


# --- push -----------------------------------------------------------------------------------


async def test_push_then_push_again_then_push_to_another_repository(
    catalog: Catalog,
    client: RegistryClient,
    busybox: str,
    docker_registry: DockerRegistry,
) -> None:
    local = client.get_manifest("test/busybox", "1")
    blobs = blobs_of(local.content)
    destination = f"{docker_registry.address}/test/busybox:1"

    events: list[Event] = []
    pushed_before = external_bytes("push")
    digest, size = await push_external(catalog, busybox, destination, None, False, events.append)
    assert (digest, size) == (local.digest, len(local.content))
    size_sum = sum(client.stat_blob("test/busybox", blob).size for blob in blobs)
    assert external_bytes("push") - pushed_before == size_sum
    assert final_states(events) == dict.fromkeys(blobs, State.DONE)
    assert events[0].state == State.WAITING
    # blobs[0] is the config: marked so clients show layers only, as Docker does.
    assert {e.id for e in events if e.id.startswith(CONFIG_PREFIX)} == {CONFIG_PREFIX + blobs[0]}
    layer_bytes = [e for e in events if e.id == blobs[1] and e.state == State.UPLOADING]
    assert layer_bytes and layer_bytes[-1].current == layer_bytes[-1].total > 1_000_000
    seen = skopeo_inspect(destination)
    assert seen["Digest"] == local.digest
    assert seen["Layers"] == blobs[1:]
    assert skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{destination}") == (
        local.content
    )

    again: list[Event] = []
    assert await push_external(catalog, busybox, destination, None, False, again.append) == (
        digest,
        size,
    )
    assert final_states(again) == dict.fromkeys(blobs, State.ALREADY_EXISTS)

    other = f"{docker_registry.address}/other/busybox:2"
    mounted: list[Event] = []
    await push_external(catalog, busybox, other, None, False, mounted.append)
    assert final_states(mounted) == dict.fromkeys(blobs, State.MOUNTED)
    assert {e.message for e in mounted if e.state == State.MOUNTED} == {"Mounted from test/busybox"}
    assert external_bytes("push") - pushed_before == size_sum  # nothing moved since
    assert skopeo_inspect(other)["Digest"] == local.digest
    assert_scratch_empty(catalog)


# --- pull -----------------------------------------------------------------------------------


async def test_pull_an_image_skopeo_pushed_keeps_its_docker_manifest_bytes(
    catalog: Catalog, client: RegistryClient, docker_registry: DockerRegistry, tmp_path: Path
) -> None:
    source = f"{docker_registry.address}/src/tool:v1"
    skopeo_push_image(tmp_path, source, {"bin/tool": b"#!/bin/sh\necho hi\n" * 1000})
    remote_manifest = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{source}")
    remote_digest = skopeo_inspect(source)["Digest"]
    assert json.loads(remote_manifest)["mediaType"] == mediatypes.DOCKER_MANIFEST

    events: list[Event] = []
    pulled_before = external_bytes("pull")
    image, local = await pull_external(catalog, source, None, False, "", events.append)
    assert local == "src/tool:v1"
    assert image.digest == remote_digest
    assert image.manifest == remote_manifest
    assert (image.origin, image.origin_detail) == ("pull", source)
    assert "src/tool:v1" in image.repo_tags
    stored = client.get_manifest("src/tool", "v1")
    assert (stored.digest, stored.content) == (remote_digest, remote_manifest)
    blobs = blobs_of(remote_manifest)
    assert final_states(events) == dict.fromkeys(blobs, State.DONE)
    assert {e.state for e in events} >= {State.WAITING, State.DOWNLOADING, State.VERIFYING}
    for blob in blobs:
        assert client.stat_blob("src/tool", blob) is not None
    size_sum = sum(client.stat_blob("src/tool", blob).size for blob in blobs)
    assert external_bytes("pull") - pulled_before == size_sum

    # Into another local name: berth's registry links the blobs it already stores.
    again: list[Event] = []
    image2, local2 = await pull_external(catalog, source, None, False, "copy/tool:x", again.append)
    assert (local2, image2.digest) == ("copy/tool:x", remote_digest)
    assert final_states(again) == dict.fromkeys(blobs, State.MOUNTED)
    # By digest, into the same name: everything is there already; stored untagged.
    pinned = f"{docker_registry.address}/src/tool@{remote_digest}"
    third: list[Event] = []
    _, local3 = await pull_external(catalog, pinned, None, False, "", third.append)
    assert local3 == f"src/tool@{remote_digest}"
    assert final_states(third) == dict.fromkeys(blobs, State.ALREADY_EXISTS)
    assert_scratch_empty(catalog)


async def test_pull_an_index_stores_the_host_platform_image(
    catalog: Catalog, client: RegistryClient, docker_registry: DockerRegistry, tmp_path: Path
) -> None:
    arch = host_platform()[1]
    other_arch = "s390x" if arch != "s390x" else "riscv64"
    here_blobs, here = oci_image({"which": arch.encode()}, arch)
    there_blobs, there = oci_image({"which": other_arch.encode()}, other_arch)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_IMAGE_INDEX,
            "manifests": [
                {"mediaType": mediatypes.OCI_IMAGE_MANIFEST, "digest": sha(m), "size": len(m),
                 "platform": {"os": "linux", "architecture": a}}
                for m, a in ((there, other_arch), (here, arch))
            ],
        }
    ).encode()  # fmt: skip
    layout = tmp_path / "layout"
    blobs = [*here_blobs, *there_blobs, index]
    write_layout(layout, "multi", blobs, index, mediatypes.OCI_IMAGE_INDEX)
    source = f"{docker_registry.address}/multi/img:1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{source}")

    image, local = await pull_external(catalog, source, None, False, "", lambda e: None)
    assert (local, image.digest, image.manifest) == ("multi/img:1", sha(here), here)
    assert image.platform == f"linux/{arch}"
    assert client.stat_blob("multi/img", blobs_of(there)[1]) is None


# --- auth -----------------------------------------------------------------------------------


async def test_basic_auth(
    catalog: Catalog, busybox: str, docker_registry_basic: DockerRegistry
) -> None:
    remote = docker_registry_basic
    destination = f"{remote.address}/secure/busybox:1"
    wrong = Credentials(remote.username, "not-the-password")
    with pytest.raises(Unauthenticated, match=f"^{remote.address} refused the credentials for "):
        await push_external(catalog, busybox, destination, wrong, False, lambda e: None)
    with pytest.raises(Unauthenticated, match=f"^{remote.address}: authentication required$") as no:
        await push_external(catalog, busybox, destination, None, False, lambda e: None)
    assert no.value.reason == "REGISTRY_UNAUTHORIZED"
    assert no.value.details.metadata == {"host": remote.address}

    digest, _ = await push_external(
        catalog, busybox, destination, remote.credentials, False, lambda e: None
    )
    image, _ = await pull_external(
        catalog, destination, remote.credentials, False, "back/busybox:1", lambda e: None
    )
    assert image.digest == digest


async def test_token_auth_scopes_mounts_and_identity_tokens(
    catalog: Catalog, busybox: str, docker_registry_token: DockerRegistry
) -> None:
    remote = docker_registry_token
    assert remote.token_server is not None
    requests = remote.token_server.requests
    first = f"{remote.address}/tok/a:1"
    digest, _ = await push_external(
        catalog, busybox, first, remote.credentials, False, lambda e: None
    )
    assert requests and all(r.granted and r.method == "GET" for r in requests)
    assert ("repository:tok/a:pull,push",) in [r.scopes for r in requests]

    # A mount asks for pull on the source repository in the same token.
    mounted: list[Event] = []
    second = f"{remote.address}/tok/b:1"
    await push_external(catalog, busybox, second, remote.credentials, False, mounted.append)
    assert set(final_states(mounted).values()) == {State.MOUNTED}
    scopes = [set(r.scopes) for r in requests]
    assert {"repository:tok/b:pull,push", "repository:tok/a:pull"} in scopes
    # ...asked for up front, not after a 401 to a token for tok/b alone.
    assert {"repository:tok/b:pull,push"} not in scopes

    # An identity token is posted to the token server instead of a password.
    identity = Credentials(identity_token=remote.identity_token)
    image, _ = await pull_external(catalog, second, identity, False, "from/tok:1", lambda e: None)
    assert image.digest == digest
    assert requests[-1].method == "POST" and requests[-1].granted

    wrong = Credentials(remote.username, "wrong")
    with pytest.raises(Unauthenticated, match=f"^{remote.address} refused the credentials for "):
        await pull_external(catalog, second, wrong, False, "x/y:1", lambda e: None)
    with pytest.raises(Unauthenticated, match=f"^{remote.address}: authentication required$"):
        await pull_external(catalog, second, None, False, "x/y:1", lambda e: None)


# --- errors ---------------------------------------------------------------------------------


async def test_bad_references_unknown_images_and_unreachable_hosts(
    catalog: Catalog, busybox: str, docker_registry: DockerRegistry
) -> None:
    address = docker_registry.address
    with pytest.raises(NotFound, match=f"^{address}/no/such:1: manifest unknown$") as unknown:
        await pull_external(catalog, f"{address}/no/such:1", None, False, "", lambda e: None)
    assert unknown.value.reason == "REGISTRY_NOT_FOUND"
    assert unknown.value.details.metadata["codes"] == "MANIFEST_UNKNOWN"
    with pytest.raises(
        InvalidArgument, match=r"^test/busybox:1 has no registry host; berth pull"
    ) as no_host:
        await pull_external(catalog, "test/busybox:1", None, False, "", lambda e: None)
    assert no_host.value.reason == "INVALID_REFERENCE"
    assert no_host.value.details.field_violations[0][0] == "image"
    with pytest.raises(InvalidArgument, match=r"^other:1 has no registry host; berth push"):
        await push_external(catalog, busybox, "other:1", None, False, lambda e: None)
    with pytest.raises(InvalidArgument, match="local reference must be name"):
        await pull_external(catalog, f"{address}/a:1", None, False, f"{address}/b", print)
    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable, match=f"^{nobody}: cannot reach the registry") as down:
        await push_external(catalog, busybox, f"{nobody}/x:1", None, False, lambda e: None)
    assert down.value.reason == "REGISTRY_UNREACHABLE"
