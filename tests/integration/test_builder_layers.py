"""COPY layers made by the builder, for real: pushed to a berth registry, pulled and unpacked by a
node agent, run with runc on overlayfs; and an image's files read back from the layers a node
exported (real overlay whiteouts)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from isal import igzip

from berth.client import ContainerConfig, NodeClient, RegistryClient
from berthd.builder.context import BuildContext
from berthd.builder.layerfiles import LayerFiles
from berthd.builder.layers import copy_layer

from .images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, busybox_layer, sha


def context_tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.mtime = len(data), mode, 1000, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def push(
    client: RegistryClient,
    repository: str,
    layers: list[tuple[Path, str]],
    cmd: list[str],
    tmp: Path,
) -> str:
    """Push gzip layer files (path, diff_id) as an image tagged `1`; returns its reference."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            "history": [{"created_by": "COPY"} for _ in layers],
        }
    ).encode()
    config_path = tmp / "config.json"
    config_path.write_bytes(config)
    client.push_blob(repository, config_path, sha(config), len(config))
    descriptors = []
    for path, _ in layers:
        digest, size = sha(path.read_bytes()), path.stat().st_size
        client.push_blob(repository, path, digest, size)
        descriptors.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": descriptors,
    }
    client.put_manifest(repository, "1", OCI_MANIFEST, json.dumps(manifest).encode())
    return f"{repository}:1"


def run_and_read(node: NodeClient, image: str) -> str:
    node.pull(image)
    box = node.run(ContainerConfig(image)).id
    assert node.wait(box) == 0
    return b"".join(line.data for line in node.logs(box)).decode()


def test_a_copy_layer_runs_on_a_node(
    node: NodeClient, client: RegistryClient, tmp_path: Path
) -> None:
    raw = busybox_layer()
    base_layer = tmp_path / "busybox.tar.gz"
    base_layer.write_bytes(igzip.compress(raw, compresslevel=1))
    context_path = tmp_path / "context.tar"
    context_path.write_bytes(
        context_tar(
            {
                "app/hello.txt": (b"hello from the build context\n", 0o640),
                "app/bin/run.sh": (b"#!/bin/sh\necho ran\n", 0o755),
                "note.txt": (b"a note\n", 0o644),
            }
        )
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with (
        BuildContext.from_file(context_path, 1 << 30) as context,
        LayerFiles([base_layer], scratch=scratch) as image,
    ):
        app = copy_layer(
            context.match(["app"], 2), "/srv/", "/", (65534, 65534), None, scratch, base=image.tree
        )
        image.add_layer(app.path)
        # /tmp exists below as 1777: a file copied there leaves it so.
        notes = context.match(["note.txt"], 3)
        note = copy_layer(notes, "/tmp", "/", None, None, scratch, base=image.tree)
    script = (
        "cat /srv/hello.txt; /srv/bin/run.sh; "
        "stat -c '%n %a %u:%g' /srv /srv/hello.txt /tmp /tmp/note.txt"
    )
    reference = push(
        client,
        "test/copied",
        [(base_layer, sha(raw)), (app.path, app.diff_id), (note.path, note.diff_id)],
        ["sh", "-c", script],
        tmp_path,
    )
    assert run_and_read(node, reference).splitlines() == [
        "hello from the build context",
        "ran",
        "/srv 755 65534:65534",  # created by the copy, --chown applied
        "/srv/hello.txt 640 65534:65534",
        "/tmp 1777 0:0",
        "/tmp/note.txt 644 0:0",  # the context's owner (1000) means nothing
    ]


def test_layer_files_read_what_a_node_exported(
    node: NodeClient, client: RegistryClient, busybox: str, tmp_path: Path
) -> None:
    node.pull(busybox)
    script = "rm /etc/group; mkdir /root/new; echo hi > /root/new/f"
    box = node.run(ContainerConfig(busybox, command=["sh", "-c", script])).id
    assert node.wait(box) == 0
    digest, _diff_id, _size = node.export_layer(box, "test/busybox")
    manifest = json.loads(client.get_manifest("test/busybox", "1").content)
    paths = []
    for i, blob in enumerate([*(layer["digest"] for layer in manifest["layers"]), digest]):
        paths.append(tmp_path / f"layer{i}.tar.gz")
        client.pull_blob("test/busybox", blob, paths[-1])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with LayerFiles(paths, scratch=scratch, where="stage build") as image:
        assert image.read_file("/etc/group") is None  # the exported whiteout applied
        assert image.read_file("/etc/passwd") is not None
        assert image.read_file("/root/new/f") == b"hi\n"
        [busybox_binary] = image.match(["/bin/busybox"], 4)
        expected = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
        assert busybox_binary.entry.data is not None
        assert busybox_binary.entry.data.digest() == sha(expected)
    assert list(scratch.iterdir()) == []
