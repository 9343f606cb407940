"""Save and load archives with real registries, etcd and skopeo.

Images are saved from one berth registry and loaded into a fresh one (its own data directory
and etcd prefix, as another cluster's would be); skopeo reads what berth writes and writes
archives that berth loads.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from isal import igzip

from berth.client import RegistryClient
from berthd.common.errors import DataLoss, InvalidArgument, NotFound
from berthd.common.rpc.registry import RegistryApi
from berthd.common.store import Store
from berthd.image.archive import load_images, save_images
from berthd.image.catalog import Catalog
from berthd.image.model import ORIGIN_LOAD

from .conftest import ServiceProcess, Services
from .images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, busybox_layer, sha, tar_of

pytestmark = pytest.mark.integration

BUSYBOX = "test/busybox:1"
OTHER = "test/other:2"


def catalog_for(store: Store, registry: ServiceProcess, scratch: Path) -> Catalog:
    return Catalog(store, RegistryApi(registry.address), scratch)


@pytest.fixture
async def catalog(store: Store, registry: ServiceProcess, tmp_path: Path) -> AsyncIterator[Catalog]:
    catalog = catalog_for(store, registry, tmp_path / "scratch")
    yield catalog
    await catalog.close()


@pytest.fixture
async def fresh(etcd_endpoint: str, tmp_path: Path) -> AsyncIterator[Catalog]:
    """A second, empty registry with its own data directory and etcd prefix."""
    prefix = f"/berth-test-{uuid.uuid4().hex[:12]}/"
    home = tmp_path / "fresh"
    home.mkdir()
    services = Services(home, etcd_endpoint, prefix)
    store = Store(etcd_endpoint, prefix)
    await store.connect()
    try:
        registry = services.registry(home / "registry-data")
        catalog = catalog_for(store, registry, home / "scratch")
        yield catalog
        await catalog.close()
    finally:
        services.stop_all()
        await store.delete_prefix("")
        await store.close()


@pytest.fixture
def two_images(client: RegistryClient, busybox: str, tmp_path: Path) -> dict[str, str]:
    """busybox, and a second image with one more layer on the very same busybox layer blob;
    their manifest digests."""
    base = json.loads(client.get_manifest("test/busybox", "1").content)
    assert client.mount_blob("test/other", base["layers"][0]["digest"])
    extra = tar_of({"hello.txt": b"hi\n"})
    blob = igzip.compress(extra, compresslevel=1, mtime=0)
    (tmp_path / "extra").write_bytes(blob)
    client.push_blob("test/other", tmp_path / "extra", sha(blob), len(blob))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(busybox_layer()), sha(extra)]},
            "history": [{"created_by": "busybox"}, {"created_by": "hello.txt"}],
        }
    ).encode()
    (tmp_path / "config").write_bytes(config)
    client.push_blob("test/other", tmp_path / "config", sha(config), len(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [
            base["layers"][0],
            {"mediaType": OCI_LAYER, "digest": sha(blob), "size": len(blob)},
        ],
    }
    other = client.put_manifest("test/other", "2", OCI_MANIFEST, json.dumps(manifest).encode())
    return {BUSYBOX: client.get_manifest("test/busybox", "1").digest, OTHER: other}


async def save_to(catalog: Catalog, refs: list[str], fmt: str, path: Path) -> Path:
    total, chunks = await save_images(catalog, refs, fmt)  # type: ignore[arg-type]
    with open(path, "wb") as out:
        async for chunk in chunks:
            assert 0 < len(chunk) <= 1 << 20
            out.write(chunk)
    assert path.stat().st_size == total
    return path


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def skopeo(*args: str) -> str:
    result = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def skopeo_inspect(reference: str) -> dict:
    return json.loads(skopeo("inspect", reference))


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def blob_count(path: Path) -> int:
    return sum(1 for name in members(path) if name.startswith("blobs/sha256/") and len(name) > 13)


def config_of(client: RegistryClient, repository: str, manifest: bytes, tmp: Path) -> dict:
    digest = json.loads(manifest)["config"]["digest"]
    client.pull_blob(repository, digest, tmp / "config")
    return json.loads((tmp / "config").read_bytes())


def uncompressed_digests(client: RegistryClient, repository: str, manifest: bytes, tmp: Path):
    """The sha256 of each layer blob of a manifest, uncompressed."""
    digests = []
    for layer in json.loads(manifest)["layers"]:
        path = tmp / layer["digest"].replace(":", "-")
        client.pull_blob(repository, layer["digest"], path)
        digests.append("sha256:" + hashlib.sha256(igzip.decompress(path.read_bytes())).hexdigest())
    return digests


def flip_byte_in(path: Path, member: str) -> None:
    """Corrupt one byte in the middle of a member's data."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    with open(path, "r+b") as f:
        f.seek(info.offset_data + info.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def assert_scratch_empty(catalog: Catalog) -> None:
    assert not catalog.scratch.exists() or list(catalog.scratch.iterdir()) == []


# --- save -----------------------------------------------------------------------------------


async def test_docker_archive_stores_shared_layers_once_and_skopeo_reads_it(
    catalog: Catalog, client: RegistryClient, two_images: dict[str, str], tmp_path: Path
) -> None:
    one = await save_to(catalog, [BUSYBOX], "docker", tmp_path / "one.tar")
    two = await save_to(catalog, [BUSYBOX, OTHER], "docker", tmp_path / "two.tar")
    # busybox: manifest, config, layer; the other image adds those but the busybox layer.
    assert blob_count(one) == 3
    assert blob_count(two) == 3 + 3 - 1 + 1
    names = members(two)
    assert names == sorted(names)
    assert {"manifest.json", "repositories", "index.json", "oci-layout"} <= set(names)
    with tarfile.open(two) as tar:
        entries = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        member = tar.getmember("manifest.json")
    assert [e["RepoTags"] for e in entries] == [[BUSYBOX], [OTHER]]
    assert (member.mtime, member.uid, member.gid) == (0, 0, 0)

    for ref in (BUSYBOX, OTHER):
        repository, tag = ref.split(":")
        manifest = client.get_manifest(repository, tag).content
        config = config_of(client, repository, manifest, tmp_path)
        seen = skopeo_inspect(f"docker-archive:{two}:{ref}")
        # skopeo's docker-archive source names layers by their diff_ids.
        assert seen["Layers"] == config["rootfs"]["diff_ids"]
        assert seen["Env"] == ["PATH=/bin"]
    # The same images give the same bytes.
    again = await save_to(catalog, [BUSYBOX, OTHER], "docker", tmp_path / "again.tar")
    assert again.read_bytes() == two.read_bytes()
    assert_scratch_empty(catalog)


async def test_oci_archive_is_read_by_skopeo_with_the_same_digests(
    catalog: Catalog, client: RegistryClient, two_images: dict[str, str], tmp_path: Path
) -> None:
    path = await save_to(catalog, [BUSYBOX, OTHER], "oci", tmp_path / "oci.tar")
    assert blob_count(path) == 6
    assert "manifest.json" not in members(path)
    for ref, tag in ((BUSYBOX, "1"), (OTHER, "2")):
        repository = ref.split(":")[0]
        manifest = json.loads(client.get_manifest(repository, tag).content)
        seen = skopeo_inspect(f"oci-archive:{path}:{tag}")
        assert seen["Digest"] == two_images[ref]
        assert seen["Layers"] == [layer["digest"] for layer in manifest["layers"]]


async def test_unknown_image_fails_before_any_byte(
    catalog: Catalog, two_images: dict[str, str]
) -> None:
    with pytest.raises(NotFound, match="nope"):
        await save_images(catalog, [BUSYBOX, "test/nope:1"], "docker")


# --- load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["docker", "oci", "docker-gzip"])
async def test_save_then_load_into_a_fresh_registry_keeps_digests(
    fmt: str,
    catalog: Catalog,
    fresh: Catalog,
    two_images: dict[str, str],
    tmp_path: Path,
) -> None:
    path = await save_to(catalog, [BUSYBOX, OTHER], fmt.split("-")[0], tmp_path / "images.tar")
    if fmt.endswith("-gzip"):  # `docker save | gzip`, which docker load takes too
        path.write_bytes(igzip.compress(path.read_bytes()))
    details, references = await load_images(fresh, file_chunks(path))
    assert references == [BUSYBOX, OTHER]
    assert {d.digest for d in details} == set(two_images.values())
    for detail in details:
        assert detail.origin == ORIGIN_LOAD
    with RegistryClient(await fresh.registry.address()) as loaded:
        for ref, digest in two_images.items():
            repository, tag = ref.split(":")
            assert loaded.get_manifest(repository, tag).digest == digest
    assert_scratch_empty(fresh)


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
async def test_archives_skopeo_makes_load_with_matching_diff_ids(
    transport: str,
    catalog: Catalog,
    fresh: Catalog,
    client: RegistryClient,
    two_images: dict[str, str],
    tmp_path: Path,
) -> None:
    ours = await save_to(catalog, [OTHER], "oci", tmp_path / "ours.tar")
    theirs = tmp_path / "theirs.tar"
    # docker-archive gets the full name; oci-archive a bare tag, named by the reference.
    name = "copied/other:7" if transport == "docker-archive" else "7"
    skopeo("copy", f"oci-archive:{ours}:2", f"{transport}:{theirs}:{name}")

    details, references = await load_images(fresh, file_chunks(theirs), "copied/other")
    assert references == ["copied/other:7"]
    original = config_of(
        client, "test/other", client.get_manifest("test/other", "2").content, tmp_path
    )
    with RegistryClient(await fresh.registry.address()) as loaded:
        manifest = loaded.get_manifest("copied/other", "7").content
        assert config_of(loaded, "copied/other", manifest, tmp_path) == original
        diff_ids = uncompressed_digests(loaded, "copied/other", manifest, tmp_path)
    assert diff_ids == original["rootfs"]["diff_ids"]
    assert [d.diff_ids for d in details] == [original["rootfs"]["diff_ids"]]


async def test_oci_archive_without_names_needs_a_reference(
    catalog: Catalog, fresh: Catalog, two_images: dict[str, str], tmp_path: Path
) -> None:
    ours = await save_to(catalog, [OTHER], "oci", tmp_path / "ours.tar")
    unnamed = tmp_path / "unnamed.tar"
    skopeo("copy", f"oci-archive:{ours}:2", f"oci-archive:{unnamed}")
    with pytest.raises(InvalidArgument, match="have no name; pass a reference"):
        await load_images(fresh, file_chunks(unnamed))
    _, references = await load_images(fresh, file_chunks(unnamed), "named/now:3")
    assert references == ["named/now:3"]


@pytest.mark.parametrize("source", ["berth-oci", "berth-docker", "skopeo-docker"])
async def test_a_flipped_layer_byte_is_data_loss(
    source: str,
    catalog: Catalog,
    fresh: Catalog,
    two_images: dict[str, str],
    tmp_path: Path,
) -> None:
    fmt = "docker" if source == "berth-docker" else "oci"
    path = await save_to(catalog, [BUSYBOX], fmt, tmp_path / "images.tar")
    manifest = json.loads(skopeo("inspect", "--raw", f"oci-archive:{path}:1"))
    layer = manifest["layers"][0]["digest"]
    member = f"blobs/sha256/{layer.removeprefix('sha256:')}"
    if source == "skopeo-docker":
        theirs = tmp_path / "theirs.tar"
        skopeo("copy", f"oci-archive:{path}:1", f"docker-archive:{theirs}:{BUSYBOX}")
        path = theirs
        with tarfile.open(path) as tar:
            entries = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        member = entries[0]["Layers"][0]
    flip_byte_in(path, member)
    with pytest.raises(DataLoss, match=member):
        await load_images(fresh, file_chunks(path))
    with RegistryClient(await fresh.registry.address()) as loaded:
        assert [r.name for r in loaded.iter_repositories() if r.tag_count] == []
    assert_scratch_empty(fresh)


async def test_what_is_not_an_archive_is_invalid(fresh: Catalog, tmp_path: Path) -> None:
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"this is not a tar file\n" * 100)
    with pytest.raises(InvalidArgument, match="not a tar file"):
        await load_images(fresh, file_chunks(not_tar))
    no_manifest = tmp_path / "plain.tar"
    no_manifest.write_bytes(tar_of({"hello.txt": b"hi\n"}))
    with pytest.raises(InvalidArgument, match=r"neither a docker-archive .* nor an OCI layout"):
        await load_images(fresh, file_chunks(no_manifest))
    assert_scratch_empty(fresh)
