"""The archive formats without servers: tar headers, save plans, manifest.json, names, member
checks, reading layouts and preparing docker-archive layers."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from isal import igzip

from berthd.common.errors import DataLoss, InvalidArgument, ResourceExhausted
from berthd.common.images import ResolvedImage
from berthd.common.oci import mediatypes
from berthd.common.oci.manifest import (
    Descriptor,
    build_image_manifest,
    encode_json,
    parse_image_config,
    parse_manifest,
)
from berthd.image.archive_format import (
    END_OF_ARCHIVE,
    Archive,
    link_target,
    loaded_name,
    member_name,
    parse_docker_manifest,
    prepare_layer,
    tar_header,
    tar_padding,
    user_reference,
)
from berthd.image.archive_load import Naming, layout_naming, name_unnamed, read_layout, spool
from berthd.image.archive_save import plan_save


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """A tar with these members: (name, data) for files, or a TarInfo as it is (links)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def link(name: str, target: str, symbolic: bool = True) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE if symbolic else tarfile.LNKTYPE
    info.linkname = target
    return info


def config_bytes(diff_ids: list[str]) -> bytes:
    return encode_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )


def resolved(repository: str, tag: str | None, layers: list[bytes]) -> ResolvedImage:
    """An image as Catalog.resolve returns it, over gzip layer blobs."""
    config = config_bytes([sha(b) for b in layers])
    descriptors = [Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, sha(b), len(b)) for b in layers]
    manifest = build_image_manifest(
        Descriptor(mediatypes.OCI_IMAGE_CONFIG, sha(config), len(config)), descriptors
    )
    return ResolvedImage(
        repository=repository,
        tag=tag,
        digest=sha(manifest),
        media_type=mediatypes.OCI_IMAGE_MANIFEST,
        manifest=manifest,
        parsed=parse_manifest(manifest, mediatypes.OCI_IMAGE_MANIFEST),
        config_bytes=config,
        config=parse_image_config(config),
    )


# --- tar headers ----------------------------------------------------------------------------


def test_headers_make_a_tar_that_tarfile_reads_back() -> None:
    long_name = "blobs/sha256/" + "a" * 64 + "/" + "b" * 60  # past ustar's 100 characters
    files = {"manifest.json": b"[]", long_name: b"x" * 1000}
    stream = tar_header("blobs/", directory=True)
    for name, data in files.items():
        stream += tar_header(name, len(data)) + data + tar_padding(len(data))
    stream += END_OF_ARCHIVE
    assert len(stream) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["blobs", "manifest.json", long_name]
        assert members[0].isdir() and members[0].mode == 0o755
        for member in members[1:]:
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
            assert (member.uname, member.gname) == ("", "")
            assert tar.extractfile(member).read() == files[member.name]  # type: ignore[union-attr]


def test_headers_are_deterministic() -> None:
    assert tar_header("index.json", 10) == tar_header("index.json", 10)
    assert tar_header("index.json", 10) != tar_header("index.json", 11)
    assert tar_padding(512) == b"" and len(tar_padding(513)) == 511


def test_a_size_past_ustar_limits_gets_a_pax_record() -> None:
    size = 9 << 30  # ustar's octal size field stops at 8 GiB
    header = tar_header("blobs/sha256/big", size)
    info = tarfile.TarInfo.frombuf(header[:512], "utf-8", "strict")
    assert info.type == tarfile.XHDTYPE and b"size=" in header


# --- save plans -------------------------------------------------------------------------------


def test_plan_lists_a_shared_layer_once_and_counts_every_byte() -> None:
    base, extra = igzip.compress(b"base", mtime=0), igzip.compress(b"extra", mtime=0)
    one = resolved("a/one", "1", [base])
    two = resolved("b/two", "2", [base, extra])
    plan = plan_save([one, two], "docker")
    names = [m.name for m in plan.members]
    assert names == sorted(names)
    blobs = [n for n in names if n.startswith("blobs/sha256/") and n != "blobs/sha256/"]
    assert len(blobs) == len(set(blobs)) == 2 + 2 + 2  # manifests, configs, two layers
    assert {"index.json", "oci-layout", "manifest.json", "repositories"} <= set(names)
    layer = next(m for m in plan.members if m.name == f"blobs/sha256/{sha(base)[7:]}")
    assert (layer.repository, layer.digest, layer.data) == ("a/one", sha(base), None)
    body = sum(len(m.header) + m.size + len(tar_padding(m.size)) for m in plan.members)
    assert plan.total_size == body + 1024
    assert plan_save([one, two], "docker") == plan


def test_docker_plan_writes_manifest_json_and_repositories() -> None:
    layer = igzip.compress(b"layer", mtime=0)
    image = resolved("a/one", "1", [layer])
    by_digest = resolved("a/one", None, [layer])  # the same image, asked for by digest
    plan = plan_save([image, by_digest, resolved("a/one", "2", [layer])], "docker")
    files = {m.name: m.data for m in plan.members if m.data is not None}
    entries = json.loads(files["manifest.json"])  # type: ignore[arg-type]
    assert (
        entries
        == [
            {
                "Config": f"blobs/sha256/{image.parsed.config.digest[7:]}",  # type: ignore[union-attr]
                "RepoTags": ["a/one:1", "a/one:2"],
                "Layers": [f"blobs/sha256/{sha(layer)[7:]}"],
            }
        ]
    )
    assert (
        json.loads(files["repositories"])
        == {  # type: ignore[arg-type]
            "a/one": {"1": sha(layer)[7:], "2": sha(layer)[7:]}
        }
    )
    index = json.loads(files["index.json"])  # type: ignore[arg-type]
    assert [m.get("annotations") for m in index["manifests"]] == [
        {"io.containerd.image.name": "a/one:1", "org.opencontainers.image.ref.name": "1"},
        None,
        {"io.containerd.image.name": "a/one:2", "org.opencontainers.image.ref.name": "2"},
    ]


def test_oci_plan_is_a_layout_only() -> None:
    plan = plan_save([resolved("a/one", "1", [])], "oci")
    names = {m.name for m in plan.members}
    assert "manifest.json" not in names and "repositories" not in names
    layout = next(m for m in plan.members if m.name == "oci-layout")
    assert json.loads(layout.data) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unknown archive format"):
        plan_save([], "zip")  # type: ignore[arg-type]


# --- manifest.json ----------------------------------------------------------------------------


def test_manifest_json_in_all_three_layer_naming_styles() -> None:
    hex_ = "ab" * 32
    content = json.dumps(
        [
            # docker save before 25: a directory per layer
            {"Config": f"{hex_}.json", "RepoTags": ["x:1"], "Layers": [f"{hex_}/layer.tar"]},
            # podman and skopeo: files named by diff_id
            {"Config": f"{hex_}.json", "RepoTags": None, "Layers": [f"./{hex_}.tar"]},
            # docker save 25 and berth: the OCI layout's blobs
            {"Config": f"blobs/sha256/{hex_}", "Layers": [f"blobs/sha256/{hex_}"]},
        ]
    ).encode()
    entries = parse_docker_manifest(content)
    assert [e.layers for e in entries] == [
        (f"{hex_}/layer.tar",),
        (f"{hex_}.tar",),
        (f"blobs/sha256/{hex_}",),
    ]
    assert [e.repo_tags for e in entries] == [("x:1",), (), ()]
    assert entries[2].config == f"blobs/sha256/{hex_}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "manifest.json is not valid JSON"),
        (b"{}", "non-empty array"),
        (b"[]", "non-empty array"),
        (b'[{"Layers": []}]', r"manifest.json\[0\].Config must be a member name"),
        (b'[{"Config": "c", "Layers": [1]}]', r"manifest.json\[0\].Layers must be"),
        (b'[{"Config": "c", "Layers": [], "RepoTags": "x"}]', r"\[0\].RepoTags must be"),
        (b'[{"Config": "c", "Layers": ["../../etc/shadow"]}]', "'..' component"),
        (b'[{"Config": "/etc/passwd", "Layers": []}]', "absolute path"),
    ],
)
def test_bad_manifest_json_is_refused(content: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_docker_manifest(content)


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("docker.io/library/busybox:1.36", ("busybox", "1.36")),
        ("library/busybox", ("busybox", "latest")),
        ("busybox:latest", ("busybox", "latest")),
        ("docker.io/someone/tool:2", ("someone/tool", "2")),
        ("localhost/test/other:2", ("test/other", "2")),
        ("quay.io/org/app:3", ("org/app", "3")),
        ("127.0.0.1:5000/library/x:1", ("library/x", "1")),
    ],
)
def test_archive_names_become_catalog_names(text: str, name: tuple[str, str]) -> None:
    assert loaded_name(text, "here") == name


def test_bad_archive_names_say_where_they_are() -> None:
    with pytest.raises(InvalidArgument, match=r"^manifest.json\[0\].RepoTags\[1\]: .*lowercase"):
        loaded_name("Busybox:1", "manifest.json[0].RepoTags[1]")
    with pytest.raises(InvalidArgument, match="names a digest"):
        loaded_name("x@sha256:" + "0" * 64, "here")


def test_the_reference_option_has_no_host_or_digest() -> None:
    assert user_reference("a/b") == ("a/b", None)
    assert user_reference("a/b:3") == ("a/b", "3")
    for bad in ("127.0.0.1:5000/a:1", "a@sha256:" + "0" * 64):
        with pytest.raises(InvalidArgument, match="without a registry host or digest"):
            user_reference(bad)


def test_layout_names_from_annotations() -> None:
    full = {
        "io.containerd.image.name": "docker.io/library/x:1",
        "org.opencontainers.image.ref.name": "1",
    }
    assert layout_naming(full, "w").names == [("x", "1")]
    assert layout_naming({"org.opencontainers.image.ref.name": "y/z:2"}, "w").names == [
        ("y/z", "2")
    ]
    bare = layout_naming({"org.opencontainers.image.ref.name": "3"}, "w")
    assert (bare.names, bare.bare_tag) == ([], "3")
    assert layout_naming({}, "w") == Naming("w")
    with pytest.raises(
        InvalidArgument, match=r"^w annotation org\.opencontainers\.image\.ref\.name"
    ):
        layout_naming({"org.opencontainers.image.ref.name": "-bad"}, "w")


def test_unnamed_images_take_the_reference() -> None:
    named = Naming("a", [("x", "1")])
    name_unnamed([named], "")  # nothing unnamed: no reference needed
    with pytest.raises(InvalidArgument, match="have no name; pass a reference"):
        name_unnamed([named, Naming("b")], "")

    only = Naming("b", bare_tag="7")
    name_unnamed([only], "r/s")
    assert only.names == [("r/s", "7")]
    only = Naming("b", bare_tag="7")
    name_unnamed([only], "r/s:8")  # an explicit tag wins for a single image
    assert only.names == [("r/s", "8")]

    several = [Naming("b", bare_tag="7"), Naming("c")]
    name_unnamed(several, "r/s")
    assert [n.names for n in several] == [[("r/s", "7")], [("r/s", "latest")]]
    with pytest.raises(InvalidArgument, match="one reference can name only one"):
        name_unnamed([Naming("b"), Naming("c")], "r/s")
    with pytest.raises(InvalidArgument, match="one reference can name only one"):
        name_unnamed([Naming("b", bare_tag="7"), Naming("c")], "r/s:1")


# --- members --------------------------------------------------------------------------------


def test_member_names_are_normalized_and_hostile_ones_refused() -> None:
    assert member_name("./blobs/sha256/ab") == "blobs/sha256/ab"
    assert member_name("a/./b") == "a/b"
    with pytest.raises(InvalidArgument, match=r'archive member "/etc/passwd" has an absolute'):
        member_name("/etc/passwd")
    with pytest.raises(InvalidArgument, match=r'"a/../../x" has a \'..\' component'):
        member_name("a/../../x")


def test_link_targets_stay_inside() -> None:
    assert link_target("id2/layer.tar", "../id1/layer.tar", symbolic=True) == "id1/layer.tar"
    assert link_target("id2/layer.tar", "id1/layer.tar", symbolic=False) == "id1/layer.tar"
    with pytest.raises(InvalidArgument, match="links outside the archive"):
        link_target("id2/layer.tar", "../../etc/shadow", symbolic=True)
    with pytest.raises(InvalidArgument, match="absolute path"):
        link_target("id2/layer.tar", "/etc/shadow", symbolic=True)


def test_an_archive_with_a_hostile_member_is_refused(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [("manifest.json", b"[]"), ("../evil", b"x")])
    with pytest.raises(InvalidArgument, match=r'archive member "../evil"'):
        Archive.open(path)


def test_archive_members_follow_links_to_regular_files(tmp_path: Path) -> None:
    path = write_tar(
        tmp_path / "a.tar",
        [
            ("id1/layer.tar", b"layer bytes"),
            link("id2/layer.tar", "../id1/layer.tar"),
            link("id3/layer.tar", "id2/layer.tar", symbolic=False),
            link("loop", "loop"),
            link("out", "../../etc/passwd"),
        ],
    )
    archive = Archive.open(path)
    for name in ("id1/layer.tar", "id2/layer.tar", "id3/layer.tar"):
        entry = archive.entry(name, "a layer")
        assert entry.name == "id1/layer.tar"
        assert archive.read(entry) == b"layer bytes"
    with pytest.raises(InvalidArgument, match="too many links"):
        archive.entry("loop", "a layer")
    with pytest.raises(InvalidArgument, match="links outside"):
        archive.entry("out", "a layer")
    with pytest.raises(InvalidArgument, match=r'no member "missing" \(layer 2 of x\)'):
        archive.entry("missing", "layer 2 of x")


def test_a_truncated_archive_or_not_a_tar_is_invalid(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [("big", b"x" * 4096)])
    path.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(InvalidArgument, match="truncated"):
        Archive.open(path)
    path.write_bytes(b"\x00junk" * 300)
    with pytest.raises(InvalidArgument, match="not a tar file"):
        Archive.open(path)


# --- OCI layouts ------------------------------------------------------------------------------


def layout_members(manifests: list[bytes], index: dict) -> list[tuple[str, bytes]]:
    return [
        *((f"blobs/sha256/{sha(m)[7:]}", m) for m in manifests),
        ("index.json", json.dumps(index).encode()),
    ]


def descriptor(content: bytes, media_type: str, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": sha(content), "size": len(content), **extra}


def test_a_layout_with_a_nested_index_keeps_the_index_when_complete(tmp_path: Path) -> None:
    amd64 = resolved("r", "1", []).manifest
    arm64 = resolved("r", "1", [igzip.compress(b"arm", mtime=0)]).manifest
    platforms = [{"os": "linux", "architecture": a} for a in ("amd64", "arm64")]
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_IMAGE_INDEX,
            "manifests": [
                descriptor(m, mediatypes.OCI_IMAGE_MANIFEST, platform=p)
                for m, p in zip((amd64, arm64), platforms, strict=True)
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            descriptor(
                nested, mediatypes.OCI_IMAGE_INDEX, annotations={"io.containerd.image.name": "r:1"}
            )
        ],
    }
    complete = Archive.open(
        write_tar(tmp_path / "all.tar", layout_members([amd64, arm64, nested], index))
    )
    [target] = read_layout(complete)
    assert (target.media_type, target.content) == (mediatypes.OCI_IMAGE_INDEX, nested)
    assert [i.content for i in target.images] == [amd64, arm64]
    assert target.naming.names == [("r", "1")]

    # One platform's manifest left out: the index cannot be stored, its one image is named.
    partial = Archive.open(write_tar(tmp_path / "one.tar", layout_members([amd64, nested], index)))
    [target] = read_layout(partial)
    assert (target.media_type, target.content) == (mediatypes.OCI_IMAGE_MANIFEST, amd64)


def test_a_layout_manifest_that_does_not_match_its_digest_is_data_loss(tmp_path: Path) -> None:
    image = resolved("r", "1", [])
    manifest = image.manifest
    index = {"schemaVersion": 2, "manifests": [descriptor(manifest, mediatypes.OCI_IMAGE_MANIFEST)]}
    members = layout_members([manifest], index)
    config = image.parsed.config.digest.encode()  # type: ignore[union-attr]
    other = config[:-1] + (b"0" if config[-1:] != b"0" else b"1")
    members[0] = (members[0][0], manifest.replace(config, other))  # still a manifest
    archive = Archive.open(write_tar(tmp_path / "a.tar", members))
    with pytest.raises(DataLoss, match=rf"archive member \"blobs/sha256/{sha(manifest)[7:]}\""):
        read_layout(archive)


# --- docker-archive layers -----------------------------------------------------------------------


def test_a_plain_layer_is_compressed_and_its_diff_id_computed(tmp_path: Path) -> None:
    plain = layer_tar({"a.txt": b"a" * 100_000})
    archive = Archive.open(write_tar(tmp_path / "a.tar", [("l/layer.tar", plain)]))
    layer = prepare_layer(archive, archive.entry("l/layer.tar", "layer"), tmp_path)
    assert layer.diff_id == sha(plain) and layer.member is None and layer.path is not None
    blob = layer.path.read_bytes()
    assert igzip.decompress(blob) == plain
    assert layer.descriptor == Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, sha(blob), len(blob))


def test_a_gzip_layer_is_kept_as_it_is(tmp_path: Path) -> None:
    plain = layer_tar({"a.txt": b"a" * 100_000, "b.txt": bytes(range(256)) * 4000})
    # Two gzip members in a row, as pigz writes: one stream to gzip(1).
    blob = igzip.compress(plain[:5000], mtime=0) + igzip.compress(plain[5000:], mtime=0)
    archive = Archive.open(write_tar(tmp_path / "a.tar", [(f"{sha(plain)[7:]}.tar", blob)]))
    entry = archive.entry(f"{sha(plain)[7:]}.tar", "layer")
    layer = prepare_layer(archive, entry, tmp_path)
    assert (layer.diff_id, layer.member, layer.path) == (sha(plain), entry, None)
    assert layer.descriptor.digest == sha(blob)


def test_a_broken_gzip_layer_is_data_loss(tmp_path: Path) -> None:
    blob = igzip.compress(layer_tar({"a.txt": bytes(range(256)) * 4000}), mtime=0)
    archive = Archive.open(
        write_tar(
            tmp_path / "a.tar",
            [("cut.tar", blob[: len(blob) // 2]), ("bad.tar", blob[:10] + b"\xff" * 100)],
        )
    )
    with pytest.raises(DataLoss, match=r'"cut\.tar" is a truncated gzip stream'):
        prepare_layer(archive, archive.entry("cut.tar", "layer"), tmp_path)
    with pytest.raises(DataLoss, match=r'"bad\.tar" is not a valid gzip stream'):
        prepare_layer(archive, archive.entry("bad.tar", "layer"), tmp_path)


def test_other_compressions_are_refused_by_name(tmp_path: Path) -> None:
    archive = Archive.open(write_tar(tmp_path / "a.tar", [("z.tar", b"\x28\xb5\x2f\xfd rest")]))
    with pytest.raises(InvalidArgument, match=r'"z\.tar" is a zstd-compressed layer'):
        prepare_layer(archive, archive.entry("z.tar", "layer"), tmp_path)


# --- the upload -------------------------------------------------------------------------------


async def chunks_of(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_the_upload_is_spooled_under_a_cap(tmp_path: Path) -> None:
    data = b"x" * 10_000
    path = await spool(chunks_of(data), tmp_path / "a", max_bytes=10_000)
    assert path.read_bytes() == data
    with pytest.raises(ResourceExhausted, match="larger than the 9999-byte limit"):
        await spool(chunks_of(data), tmp_path / "b", max_bytes=9_999)
    with pytest.raises(InvalidArgument, match="the archive is empty"):
        await spool(chunks_of(b""), tmp_path / "c", max_bytes=10)


async def test_a_gzip_compressed_upload_is_decompressed_under_the_cap(tmp_path: Path) -> None:
    data = bytes(range(256)) * 100
    path = await spool(chunks_of(igzip.compress(data)), tmp_path / "a", max_bytes=len(data))
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(ResourceExhausted, match="decompressed archive is larger"):
        await spool(chunks_of(igzip.compress(data)), tmp_path / "b", max_bytes=len(data) - 1)
    with pytest.raises(InvalidArgument, match="gzip-compressed but corrupt"):
        await spool(chunks_of(igzip.compress(data)[:100]), tmp_path / "c", max_bytes=len(data))
