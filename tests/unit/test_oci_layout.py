"""OCI image layouts: reading what skopeo/umoci write, writing what they read, DIR[:REF]."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from berth.oci_layout import (
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    ImageLayout,
    LayoutError,
    Manifest,
    parse_layout_ref,
)

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(root: Path, data: bytes, media_type: str) -> dict:
    """Store a blob the way skopeo does and return its descriptor as JSON."""
    path = root / "blobs" / "sha256" / sha(data).split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": sha(data), "size": len(data)}


def make_image(root: Path, content: bytes, arch: str = "amd64") -> tuple[dict, bytes]:
    """A real, minimal image (one gzip tar layer holding /hello); returns (descriptor, bytes)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    layer = put_blob(root, gzip.compress(tar_bytes.getvalue(), mtime=0), LAYER_MEDIA_TYPE)
    config_json = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(tar_bytes.getvalue())]},
        "history": [{"created_by": "test"}],
    }
    config = put_blob(root, json.dumps(config_json).encode(), CONFIG_MEDIA_TYPE)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": config,
            "layers": [layer],
        }
    ).encode()
    return put_blob(root, manifest, MEDIA_TYPE_OCI_MANIFEST), manifest


def write_layout(root: Path, entries: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))


def named(descriptor: dict, ref: str) -> dict:
    return {**descriptor, "annotations": {REF_NAME_ANNOTATION: ref}}


@pytest.fixture
def two_refs(tmp_path: Path) -> Path:
    """A layout with images "v1" and "v2", the second carrying fields berth does not know."""
    root = tmp_path / "layout"
    one, _ = make_image(root, b"one")
    two, _ = make_image(root, b"two")
    write_layout(root, [named(one, "v1"), {**named(two, "v2"), "urls": ["https://x"]}])
    return root


# --- reading ---------------------------------------------------------------------------------


def test_reads_refs_manifest_and_blobs_of_a_hand_built_layout(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    descriptor, manifest_bytes = make_image(root, b"hi")
    write_layout(root, [named(descriptor, "1.0")])

    layout = ImageLayout.open(root)
    assert layout.refs() == ["1.0"]
    found = layout.resolve("1.0")
    assert (found.digest, found.size, found.ref_name) == (
        descriptor["digest"],
        len(manifest_bytes),
        "1.0",
    )
    manifest = layout.read_manifest(found)
    assert manifest.content == manifest_bytes
    assert not manifest.is_index
    data = json.loads(manifest_bytes)
    blobs = layout.blobs_for(manifest)
    assert [b.digest for b in blobs] == [data["layers"][0]["digest"], data["config"]["digest"]]
    assert all(layout.has_blob(b.digest, b.size) for b in blobs)
    assert layout.blob_path(found.digest) == root / "blobs" / "sha256" / found.digest[7:]
    assert [m.descriptor.digest for m in layout.walk(found)] == [found.digest]


def test_walk_yields_children_before_their_index_and_blobs_for_lists_children(
    tmp_path: Path,
) -> None:
    root = tmp_path / "layout"
    amd, _ = make_image(root, b"amd", "amd64")
    arm, _ = make_image(root, b"arm", "arm64")
    index_bytes = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [amd, arm]}
    ).encode()
    index = put_blob(root, index_bytes, MEDIA_TYPE_OCI_INDEX)
    write_layout(root, [named(index, "multi")])

    layout = ImageLayout.open(root)
    walked = list(layout.walk(layout.resolve()))
    assert [m.descriptor.digest for m in walked] == [amd["digest"], arm["digest"], index["digest"]]
    assert walked[-1].is_index
    assert [d.digest for d in layout.blobs_for(walked[-1])] == [amd["digest"], arm["digest"]]


def test_resolve_takes_the_only_entry_when_no_ref_is_given(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    descriptor, _ = make_image(root, b"x")
    write_layout(root, [descriptor])  # unnamed, as `skopeo copy ... oci:DIR` may write it
    assert ImageLayout.open(root).resolve(None).digest == descriptor["digest"]


def test_resolve_without_ref_among_several_images_lists_the_refs(two_refs: Path) -> None:
    with pytest.raises(LayoutError, match=r"holds 2 images.*refs present: v1, v2"):
        ImageLayout.open(two_refs).resolve(None)


def test_resolve_unknown_ref_lists_the_refs(two_refs: Path) -> None:
    with pytest.raises(LayoutError, match=r'no image "v3".*refs present: v1, v2'):
        ImageLayout.open(two_refs).resolve("v3")


def test_resolve_in_an_empty_layout(tmp_path: Path) -> None:
    write_layout(tmp_path / "empty", [])
    with pytest.raises(LayoutError, match="holds no images"):
        ImageLayout.open(tmp_path / "empty").resolve(None)


@pytest.mark.parametrize(
    ("oci_layout", "index", "message"),
    [
        (None, '{"schemaVersion": 2, "manifests": []}', "no oci-layout file"),
        ('{"imageLayoutVersion": "2.0.0"}', '{"schemaVersion": 2}', "unsupported"),
        ('{"imageLayoutVersion": "1.0.0"}', None, r"no index\.json"),
        ('{"imageLayoutVersion": "1.0.0"}', "{not json", "not valid JSON"),
        ('{"imageLayoutVersion": "1.0.0"}', '{"schemaVersion": 1}', "schemaVersion must be 2"),
    ],
)
def test_open_rejects_what_is_not_a_layout(
    tmp_path: Path, oci_layout: str | None, index: str | None, message: str
) -> None:
    if oci_layout is not None:
        (tmp_path / "oci-layout").write_text(oci_layout)
    if index is not None:
        (tmp_path / "index.json").write_text(index)
    with pytest.raises(LayoutError, match=message):
        ImageLayout.open(tmp_path)


def test_open_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="does not exist"):
        ImageLayout.open(tmp_path / "nope")


def test_corrupt_or_missing_manifest_blobs_are_reported(two_refs: Path) -> None:
    layout = ImageLayout.open(two_refs)
    descriptor = layout.resolve("v1")
    layout.blob_path(descriptor.digest).write_bytes(b"{}")
    with pytest.raises(LayoutError, match="corrupt"):
        layout.read_manifest(descriptor)
    layout.blob_path(descriptor.digest).unlink()
    with pytest.raises(LayoutError, match="missing"):
        list(layout.walk(descriptor))


def test_digests_cannot_escape_the_blob_directory(two_refs: Path) -> None:
    with pytest.raises(LayoutError, match="invalid digest"):
        ImageLayout.open(two_refs).blob_path("sha256:../../etc/passwd")


def test_manifest_parse_checks_digest_and_size() -> None:
    content = b'{"schemaVersion":2}'
    good = Descriptor(MEDIA_TYPE_OCI_MANIFEST, sha(content), len(content))
    assert Manifest.parse(good, content).data == {"schemaVersion": 2}
    with pytest.raises(LayoutError, match="does not match"):
        Manifest.parse(good, content + b" ")


# --- writing ---------------------------------------------------------------------------------


def test_write_a_layout_and_read_it_back(tmp_path: Path) -> None:
    source = tmp_path / "source"
    descriptor, manifest_bytes = make_image(source, b"payload")
    manifest = Manifest.parse(Descriptor.from_json(descriptor, "test"), manifest_bytes)

    layout = ImageLayout.create(tmp_path / "new")
    for blob in ImageLayout.blobs_for(manifest):
        data = (source / "blobs" / "sha256" / blob.digest[7:]).read_bytes()
        assert layout.write_blob(data, blob.digest) == blob.digest
    assert layout.write_blob(manifest_bytes) == descriptor["digest"]
    layout.set_ref(manifest.descriptor, "1.0")

    again = ImageLayout.open(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    assert again.refs() == ["1.0"]
    read_back = again.read_manifest(again.resolve("1.0"))
    assert read_back.content == manifest_bytes
    for blob in again.blobs_for(read_back):
        original = source / "blobs" / "sha256" / blob.digest[7:]
        assert again.read_blob(blob.digest) == original.read_bytes()
    leftovers = [p.name for p in (tmp_path / "new").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_create_opens_an_existing_layout_and_refuses_other_directories(
    two_refs: Path, tmp_path: Path
) -> None:
    assert ImageLayout.create(two_refs).refs() == ["v1", "v2"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LayoutError, match="not empty and is not an OCI layout"):
        ImageLayout.create(busy)


def test_write_blob_refuses_content_that_does_not_match_the_digest(tmp_path: Path) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    with pytest.raises(LayoutError, match="expected"):
        layout.write_blob(b"abc", sha(b"abd"))
    assert not layout.has_blob(sha(b"abd"))


def test_set_ref_replaces_the_same_ref_and_keeps_other_entries_intact(two_refs: Path) -> None:
    layout = ImageLayout.open(two_refs)
    before = json.loads((two_refs / "index.json").read_text())["manifests"]
    new, _ = make_image(two_refs, b"three")

    layout.set_ref(Descriptor.from_json(new, "test"), "v1")

    after = json.loads((two_refs / "index.json").read_text())["manifests"]
    assert layout.refs() == ["v1", "v2"]
    assert after[0] == named(new, "v1")
    assert after[1] == before[1]  # untouched, unknown "urls" field included
    layout.set_ref(Descriptor.from_json(new, "test"), "v3")
    assert layout.refs() == ["v1", "v2", "v3"]


def test_set_ref_without_ref_adds_a_digest_only_once(tmp_path: Path) -> None:
    layout = ImageLayout.create(tmp_path / "l")
    descriptor = Descriptor(MEDIA_TYPE_OCI_MANIFEST, sha(b"m"), 1)
    layout.set_ref(descriptor, None)
    layout.set_ref(descriptor, None)
    assert [d.digest for d in layout.manifests()] == [descriptor.digest]
    assert layout.refs() == []


def test_index_update_is_atomic(two_refs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = ImageLayout.open(two_refs)
    before = (two_refs / "index.json").read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        layout.set_ref(Descriptor(MEDIA_TYPE_OCI_MANIFEST, sha(b"m"), 1), "v1")
    assert (two_refs / "index.json").read_bytes() == before
    assert [p.name for p in two_refs.iterdir() if p.name.endswith(".tmp")] == []


# --- DIR[:REF] -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", ("busybox", None)),
        ("busybox:1.36", ("busybox", "1.36")),
        ("/abs/dir:latest", ("/abs/dir", "latest")),
        ("./a:b:c", ("./a:b", "c")),  # only the last colon splits
        ("./v1:2/img", ("./v1:2/img", None)),  # a '/' after the colon: part of the path
        ("./v1:2/", ("./v1:2/", None)),
        ("./v1:2/:latest", ("./v1:2/", "latest")),
        ("dir:v1.0-rc_1+b@x", ("dir", "v1.0-rc_1+b@x")),
    ],
)
def test_parse_layout_ref(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_layout_ref(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty layout path"),
        (":latest", "no directory before the colon"),
        ("dir:", "invalid layout reference"),
        ("dir:bad ref", "invalid layout reference"),
        ("dir:-x", "invalid layout reference"),
    ],
)
def test_parse_layout_ref_errors(text: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        parse_layout_ref(text)


# --- interoperability (skipped where the tools are not installed) ----------------------------


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_reads_a_written_layout_byte_for_byte(tmp_path: Path) -> None:
    source = tmp_path / "source"
    descriptor, manifest_bytes = make_image(source, b"for skopeo", "arm64")
    layout = ImageLayout.create(tmp_path / "out")
    for path in (source / "blobs" / "sha256").iterdir():
        layout.write_blob(path.read_bytes())
    layout.set_ref(Descriptor.from_json(descriptor, "test"), "1.0")

    reference = f"oci:{tmp_path / 'out'}:1.0"
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", reference], check=True, capture_output=True
    ).stdout
    assert raw == manifest_bytes
    inspected = subprocess.run(
        ["skopeo", "inspect", reference], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(inspected)["Architecture"] == "arm64"
