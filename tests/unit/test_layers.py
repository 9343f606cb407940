"""berthd.node.layers without servers: chain ids, the layer and image stores, and pull_image
against an in-memory registry."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from berth.client.registry import ManifestData
from berthd.common.errors import DataLoss, InvalidArgument, NotFound
from berthd.common.oci import mediatypes as mt
from berthd.common.oci.manifest import Descriptor
from berthd.common.oci.platform import host_platform
from berthd.common.tarsafe import UnsafeLayer
from berthd.node import layers as layers_module
from berthd.node.layers import (
    ImageRecord,
    ImageStore,
    LayerStore,
    PullEvent,
    PullResult,
    PullState,
    chain_ids,
    pull_image,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Layer:
    """A gzip layer blob and its diff_id."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.tar = make_tar(files)
        self.blob = gzip.compress(self.tar, mtime=0)
        self.diff_id = sha(self.tar)
        self.digest = sha(self.blob)

    def descriptor(self) -> Descriptor:
        return Descriptor(mt.OCI_LAYER_TAR_GZIP, self.digest, len(self.blob))

    def write(self, directory: Path) -> Path:
        path = directory / self.digest[7:19]
        path.write_bytes(self.blob)
        return path


BASE = Layer({"bin/busybox": b"ELF busybox", "etc/passwd": b"root:x:0:0::/root:/bin/sh\n"})
APP = Layer({"app/run": b"#!/bin/sh\necho app\n"})
OTHER = Layer({"other/file": b"other"})


# --- chain ids -----------------------------------------------------------------------------


def test_chain_ids_follow_the_image_spec() -> None:
    a, b, c = sha(b"a"), sha(b"b"), sha(b"c")
    chain_ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    chain_abc = "sha256:" + hashlib.sha256(f"{chain_ab} {c}".encode()).hexdigest()
    assert chain_ids([]) == []
    assert chain_ids([a]) == [a]
    assert chain_ids([a, b, c]) == [a, chain_ab, chain_abc]
    # By hand, for the record: sha256("sha256:ca97...48bb sha256:3e23...2f3d").
    assert (
        chain_ab
        == "sha256:"
        + hashlib.sha256(
            b"sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb "
            b"sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"
        ).hexdigest()
    )
    with pytest.raises(InvalidArgument):
        chain_ids(["md5:abc"])


# --- layer store ---------------------------------------------------------------------------


@pytest.fixture
def layers(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "node")


def layer_dir_entries(layers: LayerStore) -> list[str]:
    return sorted(p.name for p in layers.directory.iterdir())


def test_unpack_places_a_verified_layer_once(layers: LayerStore, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    blob = BASE.write(tmp_path)
    result = layers.unpack(
        BASE.diff_id,
        BASE.diff_id,
        blob,
        mt.OCI_LAYER_TAR_GZIP,
        lambda done, total: seen.append((done, total)),
    )
    assert result is not None and result.entries == 2
    assert (layers.path(BASE.diff_id) / "bin/busybox").read_bytes() == b"ELF busybox"
    assert layers.has(BASE.diff_id) and layers.list() == [BASE.diff_id]
    assert seen[-1] == (len(BASE.blob), len(BASE.blob))
    assert stat.S_IMODE(layers.path(BASE.diff_id).stat().st_mode) == 0o755
    # Already there: nothing is read, not even a missing blob.
    assert layers.unpack(BASE.diff_id, BASE.diff_id, tmp_path / "nope", mt.OCI_LAYER_TAR) is None
    assert layers.disk_usage(BASE.diff_id) > 0


def test_diff_id_mismatch_leaves_no_layer_and_no_tmp_dir(
    layers: LayerStore, tmp_path: Path
) -> None:
    wrong = sha(b"something else")
    with pytest.raises(DataLoss, match="diff_id"):
        layers.unpack(wrong, wrong, BASE.write(tmp_path), mt.OCI_LAYER_TAR_GZIP)
    assert not layers.has(wrong)
    assert layer_dir_entries(layers) == []


def test_unsafe_layer_leaves_no_layer_and_no_tmp_dir(layers: LayerStore, tmp_path: Path) -> None:
    tar = make_tar({"../escape": b"x"})
    blob = tmp_path / "evil.tar"
    blob.write_bytes(tar)
    with pytest.raises(UnsafeLayer):
        layers.unpack(sha(tar), sha(tar), blob, mt.OCI_LAYER_TAR)
    assert layer_dir_entries(layers) == []
    assert not (layers.directory.parent / "escape").exists()


def test_leftover_tmp_dirs_are_removed_at_start(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "node")
    half = store.directory / ".tmp-crashed"
    (half / "usr/lib").mkdir(parents=True)
    (half / "usr/lib/half").write_bytes(b"x")
    (half / "usr").chmod(0o555)
    LayerStore(tmp_path / "node")
    assert layer_dir_entries(store) == []


def test_concurrent_unpacks_of_one_layer_extract_it_once(
    layers: LayerStore, tmp_path: Path
) -> None:
    blob = BASE.write(tmp_path)
    results: list[object] = []
    barrier = threading.Barrier(4)

    def unpack() -> None:
        barrier.wait()
        results.append(layers.unpack(BASE.diff_id, BASE.diff_id, blob, mt.OCI_LAYER_TAR_GZIP))

    threads = [threading.Thread(target=unpack) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert layer_dir_entries(layers) == [BASE.diff_id[7:]]


def test_remove_gets_through_read_only_dirs(layers: LayerStore, tmp_path: Path) -> None:
    layers.unpack(BASE.diff_id, BASE.diff_id, BASE.write(tmp_path), mt.OCI_LAYER_TAR_GZIP)
    top = layers.path(BASE.diff_id)
    (top / "bin").chmod(0o555)
    (top / "etc").chmod(0o000)
    top.chmod(0o500)
    assert layers.remove(BASE.diff_id) is True
    assert layers.remove(BASE.diff_id) is False
    assert layer_dir_entries(layers) == []
    with pytest.raises(NotFound):
        layers.disk_usage(BASE.diff_id)


def test_images_sharing_a_layer_share_its_files(layers: LayerStore, tmp_path: Path) -> None:
    first = chain_ids([BASE.diff_id, APP.diff_id])
    second = chain_ids([BASE.diff_id, OTHER.diff_id])
    for layer, chain in ((BASE, first[0]), (APP, first[1])):
        layers.unpack(chain, layer.diff_id, layer.write(tmp_path), mt.OCI_LAYER_TAR_GZIP)
    before = (layers.path(first[0]) / "bin/busybox").stat()
    assert (
        layers.unpack(second[0], BASE.diff_id, BASE.write(tmp_path), mt.OCI_LAYER_TAR_GZIP) is None
    )
    layers.unpack(second[1], OTHER.diff_id, OTHER.write(tmp_path), mt.OCI_LAYER_TAR_GZIP)
    after = (layers.path(second[0]) / "bin/busybox").stat()
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    assert len(layers.list()) == 3


# --- image store ---------------------------------------------------------------------------


def record(
    name: str, diff_ids: list[str], refs: tuple[str, ...], pulled_at: float = 1_700_000_000.5
) -> ImageRecord:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": [f"NAME={name}"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return ImageRecord(
        digest=sha(f"manifest {name}".encode()),
        references=refs,
        config_digest=sha(json.dumps(config).encode()),
        image_config=config,
        layers=tuple(Descriptor(mt.OCI_LAYER_TAR_GZIP, sha(d.encode()), 10) for d in diff_ids),
        diff_ids=tuple(diff_ids),
        chain_ids=tuple(chain_ids(diff_ids)),
        size=10 * len(diff_ids),
        pulled_at=pulled_at,
    )


@pytest.fixture
def images(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "node")


def test_image_records_round_trip_and_resolve(images: ImageStore, tmp_path: Path) -> None:
    web = images.add(record("web", [BASE.diff_id, APP.diff_id], ("lib/web:1.0", "lib/web:latest")))
    other_ref = "other@" + sha(b"manifest other")
    other = images.add(record("other", [OTHER.diff_id], (other_ref,), pulled_at=1_800_000_000))

    reopened = ImageStore(tmp_path / "node")
    assert reopened.get("lib/web:1.0") == web
    assert reopened.get("lib/web") == web  # :latest
    assert reopened.get(web.digest) == web
    assert reopened.get(f"lib/web@{web.digest}") == web
    assert reopened.get(web.config_digest) == web
    assert reopened.get(web.config_digest[7:19]) == web  # Docker's short image id
    assert reopened.get("sha256:" + web.config_digest[7:19]) == web
    assert reopened.get(f"other@{other.digest}") == other
    assert web.config == {"Cmd": ["/bin/sh"], "Env": ["NAME=web"]}
    assert web.image_config["rootfs"]["diff_ids"] == [BASE.diff_id, APP.diff_id]
    assert reopened.list() == [other, web]  # most recent first
    for missing in ("lib/web:2.0", "nothing", sha(b"unknown"), f"other@{web.digest}", "abcdef"):
        with pytest.raises(NotFound):
            reopened.get(missing)
    with pytest.raises(InvalidArgument):
        reopened.get("Not A Reference!")
    assert not [p for p in images.directory.iterdir() if p.name.startswith(".tmp-")]


def test_ambiguous_short_id_is_refused(images: ImageStore) -> None:
    made = [images.add(record(str(i), [sha(str(i).encode())], (f"img{i}:x",))) for i in range(40)]
    first = {m.config_digest[7] for m in made}
    shared = next(c for c in first if sum(m.config_digest[7] == c for m in made) > 1)
    with pytest.raises(InvalidArgument, match="matches"):
        images.get(shared)


def test_add_merges_references_and_moves_tags(images: ImageStore) -> None:
    old = images.add(record("old", [BASE.diff_id], ("app:latest", "app:1")))
    images.add(replace(old, references=("app:stable",)))
    assert images.get("app:1").references == ("app:latest", "app:1", "app:stable")
    new = images.add(record("new", [APP.diff_id], ("app:latest",)))
    assert images.get("app:latest") == new
    assert images.get(old.digest).references == ("app:1", "app:stable")
    assert len(images.list()) == 2


def test_remove_keeps_layers_other_images_or_containers_use(images: ImageStore) -> None:
    web = images.add(record("web", [BASE.diff_id, APP.diff_id, OTHER.diff_id], ("web:1",)))
    base = images.add(record("base", [BASE.diff_id], ("base:1",)))
    chains = list(web.chain_ids)
    # BASE is shared with `base`; the top layer is still used by a container.
    assert images.remove("web:1", in_use={chains[2]}) == [chains[1]]
    with pytest.raises(NotFound):
        images.get("web:1")
    assert images.remove(base.digest) == [base.chain_ids[0]]
    assert images.list() == []
    with pytest.raises(NotFound):
        images.remove("base:1")


# --- pull_image, against an in-memory registry ---------------------------------------------


class FakeRegistry:
    """RegistryApi's get_manifest and pull_blob over dicts, counting blob downloads.

    Like the real one, pull_blob is a coroutine that reports progress on the event loop,
    writes into `<dest>.partial`, goes on from the bytes already there (`resumed` records
    where each download started), and renames the file into place only when it is complete.
    `delay` is a pause halfway through each blob, where a cancellation leaves half of it."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.downloads: list[str] = []
        self.resumed: dict[str, int] = {}
        self.delay = 0.0

    def add_blob(self, data: bytes) -> Descriptor:
        self.blobs[sha(data)] = data
        return Descriptor(mt.OCI_IMAGE_CONFIG, sha(data), len(data))

    def add_image(
        self, repo: str, tag: str, layers: list[Layer], diff_ids: list[str] | None = None
    ) -> str:
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids or [x.diff_id for x in layers]},
            }
        ).encode()
        for layer in layers:
            self.blobs[layer.digest] = layer.blob
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mt.OCI_IMAGE_MANIFEST,
                "config": self.add_blob(config).to_dict(),
                "layers": [layer.descriptor().to_dict() for layer in layers],
            }
        ).encode()
        self.manifests[(repo, tag)] = (mt.OCI_IMAGE_MANIFEST, manifest)
        self.manifests[(repo, sha(manifest))] = (mt.OCI_IMAGE_MANIFEST, manifest)
        return sha(manifest)

    async def get_manifest(self, repo: str, reference: str) -> ManifestData:
        if (repo, reference) not in self.manifests:
            raise NotFound(f"registry: manifest {repo}:{reference} not found")
        media_type, content = self.manifests[(repo, reference)]
        return ManifestData(sha(content), media_type, content)

    async def pull_blob(
        self, repo: str, digest: str, dest: Path, progress=None, *, size: int | None = None
    ) -> int:
        data = self.blobs[digest]
        # Like the registry client: a descriptor whose size is not the blob's moves no byte.
        if size is not None and size != len(data):
            raise DataLoss(f"blob {digest} has {len(data)} bytes, its descriptor says {size}")
        self.downloads.append(digest)
        partial = dest.with_name(dest.name + ".partial")
        offset = partial.stat().st_size if partial.exists() else 0
        self.resumed[digest] = offset
        half = max(len(data) // 2, offset)
        with open(partial, "ab") as out:
            for start, end in ((offset, half), (half, len(data))):
                for done in range(start, end, 100):
                    if progress is not None:
                        progress(done, len(data))
                out.write(data[start:end])
                out.flush()
                if end == half:
                    await asyncio.sleep(self.delay)
        if partial.read_bytes() != data:
            partial.unlink()
            raise DataLoss(f"registry: blob {digest} does not match its digest")
        partial.rename(dest)
        if progress is not None:
            progress(len(data), len(data))
        return len(data)


class Node:
    """A node's stores, one of each per data directory as the agent holds them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = ImageStore(root)
        self.layers = LayerStore(root)
        self.events: list[PullEvent] = []

    async def pull(self, registry: FakeRegistry, reference: str) -> PullResult:
        return await pull_image(
            registry,  # type: ignore[arg-type]
            self.images,
            self.layers,
            reference,
            self.root / "downloads",
            self.events.append,
        )


def states(events: list[PullEvent], digest: str) -> list[str]:
    """The states a layer went through, repeats (byte progress) collapsed."""
    out: list[str] = []
    for event in events:
        if event.layer_digest == digest and (not out or out[-1] != event.state):
            out.append(event.state)
    return out


async def test_pull_reports_states_and_reuses_layers(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add_image("lib/app", "v1", [BASE, APP])
    node = Node(tmp_path)
    events = node.events
    result = await node.pull(registry, "lib/app:v1")
    full = ["waiting", "downloading", "verifying", "extracting", "done"]
    assert states(events, BASE.digest) == full
    assert states(events, APP.digest) == full
    assert (result.layers_pulled, result.layers_cached) == (2, 0)
    assert result.image.references == ("lib/app:v1",)
    assert list(os.listdir(tmp_path / "downloads")) == []

    registry.add_image("lib/other", "latest", [BASE, OTHER])
    events.clear()
    result = await node.pull(registry, "lib/other")
    assert states(events, BASE.digest) == [PullState.ALREADY_EXISTS]
    assert (result.layers_pulled, result.layers_cached) == (1, 1)
    config_size = len(registry.blobs[result.image.config_digest])
    assert result.bytes_downloaded == len(OTHER.blob) + config_size
    assert registry.downloads.count(BASE.digest) == 1


async def test_concurrent_pulls_download_each_layer_once(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.delay = 0.05
    registry.add_image("lib/app", "v1", [BASE, APP])
    node = Node(tmp_path)
    first, second = await asyncio.gather(
        node.pull(registry, "lib/app:v1"), node.pull(registry, "lib/app:v1")
    )
    assert registry.downloads.count(BASE.digest) == 1
    assert registry.downloads.count(APP.digest) == 1
    assert first.layers_pulled + second.layers_pulled == 2
    assert first.image.digest == second.image.digest


async def test_pull_from_an_index_picks_the_host_platform(tmp_path: Path) -> None:
    registry = FakeRegistry()
    digest = registry.add_image("lib/app", "amd", [BASE])
    os_name, arch = host_platform()
    _, manifest = registry.manifests[("lib/app", digest)]
    entry = {"mediaType": mt.OCI_IMAGE_MANIFEST, "digest": digest, "size": len(manifest)}
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_IMAGE_INDEX,
            "manifests": [
                {**entry, "digest": sha(b"x"), "platform": {"os": os_name, "architecture": "mips"}},
                {**entry, "platform": {"os": os_name, "architecture": arch}},
            ],
        }
    ).encode()
    registry.manifests[("lib/app", "multi")] = (mt.OCI_IMAGE_INDEX, index)
    registry.manifests[("lib/app", sha(index))] = (mt.OCI_IMAGE_INDEX, index)
    node = Node(tmp_path)
    result = await node.pull(registry, f"lib/app@{sha(index)}")
    assert result.image.digest == digest
    assert result.image.references == (f"lib/app@{sha(index)}",)
    assert node.images.get(f"lib/app@{sha(index)}").digest == digest

    only_mips = json.loads(index)
    del only_mips["manifests"][1]
    registry.manifests[("lib/app", "mips")] = (mt.OCI_IMAGE_INDEX, json.dumps(only_mips).encode())
    with pytest.raises(NotFound, match=f"no {os_name}/{arch} image"):
        await node.pull(registry, "lib/app:mips")


async def test_failed_pull_leaves_no_layer_blob_or_record(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add_image("lib/bad", "v1", [APP, OTHER], diff_ids=[APP.diff_id, sha(b"wrong")])
    node = Node(tmp_path)
    with pytest.raises(DataLoss, match="diff_id"):
        await node.pull(registry, "lib/bad:v1")
    store = node.layers
    bad_chain = chain_ids([APP.diff_id, sha(b"wrong")])[1]
    assert not store.has(bad_chain)
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".tmp-")]
    assert not [p for p in (tmp_path / "downloads").iterdir() if not p.name.endswith(".partial")]
    assert node.images.list() == []
    with pytest.raises(NotFound, match="not found"):
        await node.pull(registry, "lib/bad:v2")
    registry.manifests[("lib/bad", "zstd")] = (
        mt.OCI_IMAGE_MANIFEST,
        registry.manifests[("lib/bad", "v1")][1].replace(
            mt.OCI_LAYER_TAR_GZIP.encode(), mt.OCI_LAYER_TAR_ZSTD.encode()
        ),
    )
    downloads = len(registry.downloads)
    with pytest.raises(InvalidArgument, match="zstd layers are not supported yet"):
        await node.pull(registry, "lib/bad:zstd")
    assert len(registry.downloads) == downloads  # refused before downloading anything


async def test_cancelled_download_leaves_only_partials_that_the_next_pull_resumes(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry()
    registry.delay = 0.3
    registry.add_image("lib/app", "v1", [BASE, APP])
    node = Node(tmp_path)
    task = asyncio.create_task(node.pull(registry, "lib/app:v1"))
    while not any(e.state == PullState.DOWNLOADING for e in node.events):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # No layer, no record, no complete blob: only the halves of the layer downloads, named
    # by chain id (the config's download, under a random name, is never resumed: it is gone).
    chains = chain_ids([BASE.diff_id, APP.diff_id])
    partials = {c.removeprefix("sha256:") + ".layer.partial" for c in chains}
    assert {p.name for p in (tmp_path / "downloads").iterdir()} == partials
    assert node.layers.list() == []
    assert layer_dir_entries(node.layers) == []
    assert node.images.list() == []

    registry.delay = 0.0
    result = await node.pull(registry, "lib/app:v1")
    assert (result.layers_pulled, result.layers_cached) == (2, 0)
    for layer in (BASE, APP):
        assert registry.resumed[layer.digest] == len(layer.blob) // 2  # went on from the half
    assert list((tmp_path / "downloads").iterdir()) == []


async def test_cancelled_extraction_stops_its_thread_and_leaves_no_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    outcomes: list[BaseException | None] = []
    extract = layers_module.extract_layer

    def held_extract(tar, dest):  # in the unpack thread: wait, then read the blob
        started.set()
        release.wait(5)
        try:
            result = extract(tar, dest)
        except BaseException as exc:
            outcomes.append(exc)
            raise
        outcomes.append(None)
        return result

    monkeypatch.setattr(layers_module, "extract_layer", held_extract)
    registry = FakeRegistry()
    registry.add_image("lib/app", "v1", [BASE])
    node = Node(tmp_path)
    task = asyncio.create_task(node.pull(registry, "lib/app:v1"))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.1)  # the pull handles its cancellation and waits for the thread
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread was awaited: its first read of the blob stopped it, and it cleaned up.
    assert [type(outcome).__name__ for outcome in outcomes] == ["_Stopped"]
    assert node.layers.list() == []
    assert layer_dir_entries(node.layers) == []
    assert list((tmp_path / "downloads").iterdir()) == []
    assert node.images.list() == []


def test_a_damaged_image_record_is_skipped_and_a_pull_repairs_it(
    images: ImageStore, caplog: pytest.LogCaptureFixture
) -> None:
    """One unreadable record (a disk that failed under it, a hand edit) must not break every
    listing and every pull on the node: it is skipped with a log line, and rewritten whole by
    the next pull of that image."""
    web = images.add(record("web", [BASE.diff_id], ("web:1",)))
    broken = images.add(record("broken", [APP.diff_id], ("broken:1",)))
    path = images.directory / f"{broken.digest[7:]}.json"
    path.write_bytes(b'{"digest": ')
    assert images.list() == [web]
    assert images.get("web:1") == web
    assert f"skipping unreadable image record {path}" in caplog.text
    with pytest.raises(NotFound):
        images.get("broken:1")
    assert images.find(broken.digest) is None  # a pull downloads it again
    assert images.add(broken) == broken  # and stores it, as pull_image does
    assert images.get("broken:1") == broken
