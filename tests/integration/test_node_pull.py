"""pull_image against a real `berthd registry`: a two-layer busybox image with a whiteout is
pushed with the client, then pulled (through the services' RegistryApi), unpacked and pulled
again from the cache."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest
from isal import igzip

from berth.client import RegistryClient
from berthd.common.errors import DataLoss
from berthd.common.oci import mediatypes as mt
from berthd.common.rpc.registry import RegistryApi
from berthd.node.layers import (
    ImageStore,
    LayerStore,
    PullEvent,
    PullResult,
    PullState,
    chain_ids,
    pull_image,
)

BUSYBOX = Path("/bin/busybox")
REPO = "test/busybox"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: list[tuple[str, bytes, int]]) -> bytes:
    """An uncompressed layer: (name, content, mode) files, with their parent dirs first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(name).parent) for name, _, _ in entries} - {"."})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE_TAR = layer_tar(
    [
        ("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        ("etc/motd", b"welcome\n", 0o644),
        ("etc/obsolete.conf", b"old\n", 0o644),
    ]
)
TOP_TAR = layer_tar(
    [("app/hello.txt", b"hello from layer 2\n", 0o644), ("etc/.wh.obsolete.conf", b"", 0)]
)


def push_image(
    client: RegistryClient, tmp: Path, tag: str, diff_ids: list[str] | None = None
) -> list[dict]:
    """Push config, layers and manifest under `REPO:tag`; returns the layer descriptors."""
    layers = []
    for tar in (BASE_TAR, TOP_TAR):
        blob = igzip.compress(tar)
        layers.append(push_blob(client, tmp, blob, mt.OCI_LAYER_TAR_GZIP))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(BASE_TAR), sha(TOP_TAR)]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_IMAGE_MANIFEST,
        "config": push_blob(client, tmp, config, mt.OCI_IMAGE_CONFIG),
        "layers": layers,
    }
    client.put_manifest(REPO, tag, mt.OCI_IMAGE_MANIFEST, json.dumps(manifest).encode())
    return layers


def push_blob(client: RegistryClient, tmp: Path, data: bytes, media_type: str) -> dict:
    path = tmp / f"push-{sha(data)[7:19]}"
    path.write_bytes(data)
    client.push_blob(REPO, path, sha(data), len(data))
    return {"mediaType": media_type, "digest": sha(data), "size": len(data)}


async def pull(
    client: RegistryClient, node: Path, reference: str, events: list[PullEvent]
) -> PullResult:
    registry = RegistryApi(client.address)
    return await pull_image(
        registry, ImageStore(node), LayerStore(node), reference, node / "downloads", events.append
    )


def states(events: list[PullEvent], digest: str) -> list[str]:
    out: list[str] = []
    for event in events:
        if event.layer_digest == digest and (not out or out[-1] != event.state):
            out.append(event.state)
    return out


async def test_pull_unpacks_layers_then_reuses_them(client: RegistryClient, tmp_path: Path) -> None:
    layers = push_image(client, tmp_path, "v1")
    node = tmp_path / "node"
    events: list[PullEvent] = []

    result = await pull(client, node, f"{REPO}:v1", events)

    for layer in layers:
        assert states(events, layer["digest"]) == [
            PullState.WAITING,
            PullState.DOWNLOADING,
            PullState.VERIFYING,
            PullState.EXTRACTING,
            PullState.PULL_COMPLETE,
        ]
        downloading = [e for e in events if e.layer_digest == layer["digest"]][1:]
        assert downloading[0].total == layer["size"]
    last_download = [e for e in events if e.state == PullState.DOWNLOADING][-1]
    assert last_download.current == last_download.total
    image = result.image
    assert (result.layers_pulled, result.layers_cached) == (2, 0)
    config_size = len(_config_bytes(client, image.config_digest, tmp_path))
    assert result.bytes_downloaded == sum(layer["size"] for layer in layers) + config_size
    assert image.references == (f"{REPO}:v1",)
    assert image.chain_ids == tuple(chain_ids([sha(BASE_TAR), sha(TOP_TAR)]))
    assert image.config == {"Cmd": ["/bin/busybox", "sh"]}

    store = LayerStore(node)
    base, top = (store.path(chain) for chain in image.chain_ids)
    assert (base / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    assert stat.S_IMODE((base / "bin/busybox").stat().st_mode) == 0o755
    assert (base / "etc/obsolete.conf").read_bytes() == b"old\n"
    assert (top / "app/hello.txt").read_bytes() == b"hello from layer 2\n"
    whiteout = (top / "etc/obsolete.conf").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert not (top / "etc/.wh.obsolete.conf").exists()
    assert list((node / "downloads").iterdir()) == []
    assert ImageStore(node).get(f"{REPO}:v1") == image

    # Again, and under another tag: everything is on the node already.
    client.put_manifest(REPO, "again", *_manifest_of(client, "v1"))
    events.clear()
    again = await pull(client, node, f"{REPO}:again", events)
    for layer in layers:
        assert states(events, layer["digest"]) == [PullState.ALREADY_EXISTS]
    assert (again.layers_pulled, again.layers_cached) == (0, 2)
    assert again.bytes_downloaded == 0
    assert again.image.digest == image.digest
    assert set(again.image.references) == {f"{REPO}:v1", f"{REPO}:again"}


async def test_wrong_diff_id_fails_with_data_loss_and_leaves_no_layer(
    client: RegistryClient, tmp_path: Path
) -> None:
    wrong = [sha(BASE_TAR), sha(b"not the top layer")]
    push_image(client, tmp_path, "bad", diff_ids=wrong)
    node = tmp_path / "node"
    events: list[PullEvent] = []

    with pytest.raises(DataLoss, match="diff_id"):
        await pull(client, node, f"{REPO}:bad", events)

    store = LayerStore(node)
    assert not store.has(chain_ids(wrong)[1])
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".tmp-")]
    assert ImageStore(node).list() == []
    assert not [p for p in (node / "downloads").iterdir() if not p.name.endswith(".partial")]


async def test_a_layer_whose_size_is_not_its_descriptors_is_data_loss_before_download(
    client: RegistryClient, tmp_path: Path
) -> None:
    layers = push_image(client, tmp_path, "v1")
    media_type, content = _manifest_of(client, "v1")
    manifest = json.loads(content)
    manifest["layers"][1]["size"] += 1
    client.put_manifest(REPO, "wrong-size", media_type, json.dumps(manifest).encode())
    node = tmp_path / "node"

    with pytest.raises(DataLoss) as lost:
        await pull(client, node, f"{REPO}:wrong-size", [])

    assert lost.value.reason == "SIZE_MISMATCH"
    size = layers[1]["size"]
    assert str(lost.value) == (
        f"blob {layers[1]['digest']} in {REPO} is {size} bytes but its descriptor says "
        f"{size + 1}; the image is damaged: push it again"
    )
    assert ImageStore(node).list() == []
    # Nothing of that layer was downloaded (the other, pulled alongside, may leave a
    # `.partial` to resume from).
    top = chain_ids([sha(BASE_TAR), sha(TOP_TAR)])[1].removeprefix("sha256:")
    assert not [p for p in (node / "downloads").iterdir() if p.name.startswith(top)]


def _manifest_of(client: RegistryClient, tag: str) -> tuple[str, bytes]:
    data = client.get_manifest(REPO, tag)
    return data.media_type, data.content


def _config_bytes(client: RegistryClient, digest: str, tmp: Path) -> bytes:
    path = tmp / "config.json"
    client.pull_blob(REPO, digest, path)
    return path.read_bytes()
