"""berthd.builder.layers and .layerfiles: COPY/ADD layers with Docker's destination rules, owners,
modes and archives, made deterministically; and an image's files read from its layers with
whiteouts and opaque directories applied."""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from pathlib import Path

import pytest
from isal import igzip

from berthd.builder.context import BuildContext, sources_digest
from berthd.builder.layerfiles import LayerFiles
from berthd.builder.layers import LayerBlob, copy_layer, resolve_chown
from berthd.builder.sources import SourceMatch
from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import digest_bytes

from .test_tarsafe import Entry, d, entry, hardlink, make_tar, symlink

MTIME = 1_500_000_000
ARCHIVE = make_tar(
    d("pkg"),
    entry("pkg/bin", data=b"#!/bin/sh\n", mode=0o755, uid=7, gid=8),
    symlink("pkg/latest", "bin"),
    hardlink("pkg/again", "pkg/bin"),
)
CONTEXT = (
    entry("a.txt", data=b"alpha", mtime=MTIME),
    entry("b.txt", data=b"beta", mode=0o600, mtime=MTIME),
    d("dir", mode=0o750, mtime=MTIME),
    entry("dir/one", data=b"1", mtime=MTIME),
    d("dir/sub", mtime=MTIME),
    entry("dir/sub/two", data=b"2", mtime=MTIME),
    symlink("dir/link", "one"),
    d("empty"),
    d("other"),
    entry("other/one", data=b"another one", mtime=MTIME),
    entry("pkg.tar.gz", data=gzip.compress(ARCHIVE)),
    entry("pkg.tar.bz2", data=bz2.compress(ARCHIVE)),
    entry("pkg.tar.xz", data=lzma.compress(ARCHIVE)),
    entry("pkg.tar", data=ARCHIVE),
    entry("notes.gz", data=gzip.compress(b"just text, not a tar" * 50)),
    entry("evil.tar.gz", data=gzip.compress(make_tar(entry("../../etc/cron", data=b"x")))),
    entry("abs.tar", data=make_tar(entry("/etc/passwd", data=b"x"))),
)


@pytest.fixture
def context(tmp_path: Path):
    path = tmp_path / "context.tar"
    path.write_bytes(make_tar(*CONTEXT))
    with BuildContext.from_file(path, 1 << 30) as ctx:
        yield ctx


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def members(blob: LayerBlob) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    """name -> (header, data) of a layer, checking the blob's digests on the way."""
    raw = blob.path.read_bytes()
    assert digest_bytes(raw) == blob.digest and len(raw) == blob.size
    tar_bytes = igzip.decompress(raw)
    assert digest_bytes(tar_bytes) == blob.diff_id
    out = {}
    with tarfile.open(blob.path, "r:gz") as tar:
        for info in tar:
            f = tar.extractfile(info) if info.isreg() else None
            out[info.name] = (info, f.read() if f else None)
    return out


def names(blob: LayerBlob) -> list[str]:
    return list(members(blob))


def copy(
    context: BuildContext,
    scratch: Path,
    sources: list[str],
    dest: str,
    workdir: str = "/",
    **options,
) -> LayerBlob:
    options.setdefault("chown", None)
    options.setdefault("chmod", None)
    return copy_layer(context.match(sources, 5), dest, workdir, scratch=scratch, **options)


# --- destinations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "dest", "workdir", "expected"),
    [
        # A file to a file path: renamed; parents created.
        (["a.txt"], "/opt/app/config", "/", ["opt", "opt/app", "opt/app/config"]),
        # A trailing slash makes a directory; the file keeps its name.
        (["a.txt"], "/opt/", "/", ["opt", "opt/a.txt"]),
        # Several sources go into a directory, with or without the slash.
        (["a.txt", "b.txt"], "/opt", "/", ["opt", "opt/a.txt", "opt/b.txt"]),
        (["*.txt"], "/opt", "/", ["opt", "opt/a.txt", "opt/b.txt"]),
        # Relative destinations are under WORKDIR; `.` is the WORKDIR itself.
        (["a.txt"], "conf", "/srv/www", ["srv", "srv/www", "srv/www/conf"]),
        (["a.txt"], ".", "/srv", ["srv", "srv/a.txt"]),
        (["a.txt"], "../etc/", "/srv", ["etc", "etc/a.txt"]),
        # A directory copies its contents, links kept as links.
        (
            ["dir"],
            "/data",
            "/",
            ["data", "data/link", "data/one", "data/sub", "data/sub/two"],
        ),
        (["dir/"], "/", "/", ["link", "one", "sub", "sub/two"]),
    ],
)
def test_destination_rules(
    context: BuildContext,
    scratch: Path,
    sources: list[str],
    dest: str,
    workdir: str,
    expected: list[str],
) -> None:
    assert names(copy(context, scratch, sources, dest, workdir)) == expected


def test_copied_entries_keep_modes_and_times_created_dirs_are_root_0755(
    context: BuildContext, scratch: Path
) -> None:
    layer = members(copy(context, scratch, ["b.txt", "dir"], "/opt/app/"))
    parent, _ = layer["opt"]
    assert parent.isdir() and (parent.mode, parent.uid, parent.gid, parent.mtime) == (
        0o755,
        0,
        0,
        0,
    )
    info, data = layer["opt/app/b.txt"]
    assert (info.mode, info.mtime, info.uid, data) == (0o600, MTIME, 0, b"beta")
    assert layer["opt/app/link"][0].issym() and layer["opt/app/link"][0].linkname == "one"
    # A directory copied to a new path gives it its own metadata.
    data_dir = members(copy(context, scratch, ["dir"], "/data"))["data"][0]
    assert (data_dir.mode, data_dir.mtime) == (0o750, MTIME)


def test_chown_and_chmod_set_the_headers(context: BuildContext, scratch: Path) -> None:
    layer = members(copy(context, scratch, ["dir"], "/data", chown=(1000, 100), chmod=0o640))
    for name in ("data", "data/one", "data/sub", "data/sub/two", "data/link"):
        assert (layer[name][0].uid, layer[name][0].gid) == (1000, 100), name
    assert layer["data/one"][0].mode == 0o640 and layer["data/sub"][0].mode == 0o640
    assert layer["data/link"][0].mode == 0o644  # --chmod leaves symlinks as they were
    # Parents above the destination are created root's.
    nested = members(copy(context, scratch, ["a.txt"], "/x/y/", chown=(5, 6)))
    assert (nested["x"][0].uid, nested["x/y"][0].uid, nested["x/y/a.txt"][0].uid) == (0, 5, 5)


def test_layers_are_deterministic(context: BuildContext, scratch: Path) -> None:
    first = copy(context, scratch, ["."], "/app/")
    second = copy(context, scratch, ["."], "/app/")
    assert first.path != second.path
    assert (first.digest, first.diff_id, first.size) == (second.digest, second.diff_id, second.size)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert not first.empty
    assert names(first) == sorted(names(first), key=lambda n: n.split("/"))


def test_a_copy_that_adds_nothing_is_an_empty_layer(context: BuildContext, scratch: Path) -> None:
    blob = copy(context, scratch, ["empty"], "/")
    assert blob.empty and names(blob) == []
    assert not copy(context, scratch, ["empty"], "/new").empty  # creates /new


def test_whiteout_names_are_refused(context: BuildContext, scratch: Path, tmp_path: Path) -> None:
    path = tmp_path / "whiteout.tar"
    path.write_bytes(make_tar(d("d"), entry("d/.wh.passwd")))
    with BuildContext.from_file(path, 1 << 30) as whiteout:
        with pytest.raises(InvalidArgument, match=r'^Dockerfile:5: COPY failed: cannot copy ".wh'):
            copy(whiteout, scratch, ["."], "/etc/")
        assert copy(whiteout, scratch, ["d/.wh.passwd"], "/etc/passwd").empty is False
    with pytest.raises(InvalidArgument, match=r'cannot copy ".wh.x": names starting with .wh.'):
        copy(context, scratch, ["a.txt"], "/.wh.x")


def test_later_sources_replace_earlier_ones(context: BuildContext, scratch: Path) -> None:
    layer = members(copy(context, scratch, ["dir", "other"], "/x/"))
    assert layer["x/one"][1] == b"another one" and layer["x/sub/two"][1] == b"2"
    assert members(copy(context, scratch, ["other", "dir"], "/x/"))["x/one"][1] == b"1"


# --- ADD archives ---------------------------------------------------------------------------


@pytest.mark.parametrize("archive", ["pkg.tar.gz", "pkg.tar.bz2", "pkg.tar.xz", "pkg.tar"])
def test_add_unpacks_local_archives(context: BuildContext, scratch: Path, archive: str) -> None:
    matches = context.match([archive], 9, "ADD")
    layer = members(copy_layer(matches, "/opt", "/", None, None, scratch, extract_archives=True))
    assert list(layer) == ["opt", "opt/pkg", "opt/pkg/again", "opt/pkg/bin", "opt/pkg/latest"]
    info, data = layer["opt/pkg/bin"]
    assert (data, info.mode, info.uid, info.gid) == (b"#!/bin/sh\n", 0o755, 7, 8)
    assert layer["opt/pkg/again"][1] == b"#!/bin/sh\n"  # a hardlink, resolved
    assert layer["opt/pkg/latest"][0].linkname == "bin"
    # Only the layer is left: the spool of unpacked data is gone.
    assert [p.name.startswith("layer-") for p in scratch.iterdir()] == [True]


def test_add_copies_what_is_not_a_tar_and_copy_never_unpacks(
    context: BuildContext, scratch: Path
) -> None:
    add = context.match(["notes.gz"], 2, "ADD")
    assert names(copy_layer(add, "/n/", "/", None, None, scratch, extract_archives=True)) == [
        "n",
        "n/notes.gz",
    ]
    assert names(copy(context, scratch, ["pkg.tar"], "/n/")) == ["n", "n/pkg.tar"]


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        ("evil.tar.gz", r'archive evil.tar.gz: member "../../etc/cron" points outside'),
        ("abs.tar", r'archive abs.tar: member "/etc/passwd" has an absolute path'),
    ],
)
def test_add_refuses_hostile_archives(
    context: BuildContext, scratch: Path, archive: str, message: str
) -> None:
    matches = context.match([archive], 4, "ADD")
    with pytest.raises(InvalidArgument, match=f"^Dockerfile:4: ADD failed: {message}"):
        copy_layer(matches, "/", "/", None, None, scratch, extract_archives=True)
    assert list(scratch.iterdir()) == []


# --- an image's files -----------------------------------------------------------------------


def gz_layer(tmp_path: Path, name: str, *entries: Entry) -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(make_tar(*entries)))
    return path


@pytest.fixture
def three_layers(tmp_path: Path) -> list[Path]:
    return [
        gz_layer(
            tmp_path,
            "base",
            d("etc"),
            entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\napp:x:1000:50::/app:/bin/sh\n"),
            entry("etc/group", data=b"root:x:0:\nstaff:x:50:\n"),
            d("tmp", mode=0o1777),
            d("usr"),
            d("usr/lib"),
            entry("usr/lib/old.so", data=b"old"),
            entry("usr/lib/keep.so", data=b"keep"),
            d("opt"),
            entry("opt/gone", data=b"gone"),
            symlink("lib", "usr/lib"),
        ),
        gz_layer(
            tmp_path,
            "middle",
            # Opaque: hides what the base put in usr/lib; the new file stays.
            d("usr/lib"),
            entry("usr/lib/.wh..wh..opq"),
            entry("usr/lib/new.so", data=b"new"),
            entry("opt/.wh.gone"),
            d("app", uid=1000, gid=50),
            entry("app/bin", data=b"v1", mode=0o755, uid=1000, gid=50),
        ),
        gz_layer(
            tmp_path,
            "top",
            entry("app/bin", data=b"v2", mode=0o755, uid=1000, gid=50),
            # A whiteout hides lower layers only: the file of this layer stays.
            entry("etc/.wh.group"),
            entry("etc/group", data=b"root:x:0:\nstaff:x:51:\n"),
            entry("etc/.wh.passwd"),
            entry("app/.wh..wh.plnk"),  # aufs bookkeeping, ignored
        ),
    ]


def test_layer_files_apply_whiteouts_and_opaque_dirs(tmp_path: Path, three_layers) -> None:
    with LayerFiles(three_layers, scratch=tmp_path, where="stage build") as image:
        assert image.read_file("/etc/passwd") is None
        assert image.read_file("/etc/group") == b"root:x:0:\nstaff:x:51:\n"
        assert image.read_file("/lib/new.so") == b"new"  # through the symlink
        assert image.read_file("/usr/lib/old.so") is None
        assert image.read_file("/opt/gone") is None
        assert image.read_file("app/bin") == b"v2"
        [lib] = image.match(["/usr/lib"], 3)
        assert [rel for rel, _ in lib.entries] == ["", "new.so"]
        [app] = image.match(["/app/*"], 3)
        assert (app.path, app.entry.uid, app.entry.gid) == ("app/bin", 1000, 50)
        with pytest.raises(InvalidArgument, match=r"file not found in stage build: /opt/gone$"):
            image.match(["/opt/gone"], 3)
        with pytest.raises(InvalidArgument, match="forbidden path outside the stage build"):
            image.match(["/../x"], 3)


def test_copy_from_an_image_keeps_owners_and_reads_data_once(
    tmp_path: Path, scratch: Path, three_layers
) -> None:
    with LayerFiles(three_layers, scratch=tmp_path) as image:
        matches = image.match(["/app", "/usr/lib"], 8)
        digest = sources_digest(matches)
        spooled = _spool_sizes(tmp_path)
        again = image.match(["/app"], 8)  # already spooled: nothing more is copied
        assert _spool_sizes(tmp_path) == spooled
        layer = members(copy_layer(matches, "/out", "/", None, None, scratch))
        assert layer["out"][0].uid == 1000 and layer["out/bin"][1] == b"v2"
        assert layer["out/new.so"][1] == b"new"
        assert sources_digest(again) != digest
    assert _spool_sizes(tmp_path) == []  # close removed the spool


def _spool_sizes(tmp_path: Path) -> list[int]:
    return [p.stat().st_size for p in tmp_path.glob("layerfiles-*")]


def test_add_layer_stacks_a_copy_layer_on_top(
    context: BuildContext, tmp_path: Path, scratch: Path, three_layers
) -> None:
    with LayerFiles(three_layers[:1], scratch=tmp_path) as image:
        blob = copy(context, scratch, ["dir"], "/opt")
        image.add_layer(blob.path)
        [opt] = image.match(["/opt"], 1)
        assert [rel for rel, _ in opt.entries] == ["", "gone", "link", "one", "sub", "sub/two"]


def test_existing_directories_keep_their_metadata_with_a_base(
    context: BuildContext, scratch: Path, tmp_path: Path, three_layers
) -> None:
    with LayerFiles(three_layers, scratch=tmp_path) as image:
        base = image.tree
        # /tmp stays 1777; /tmp exists as a directory, so a file is copied into it.
        layer = members(copy(context, scratch, ["a.txt"], "/tmp", base=base))
        assert list(layer) == ["tmp", "tmp/a.txt"] and layer["tmp"][0].mode == 0o1777
        # The destination's symlinks are followed inside the image: /lib -> usr/lib.
        linked = members(copy(context, scratch, ["a.txt"], "/lib/a.so", base=base))
        assert list(linked) == ["usr", "usr/lib", "usr/lib/a.so"]
        # An existing directory keeps its owner, even with --chown.
        app = members(copy(context, scratch, ["dir"], "/app", base=base, chown=(1, 1)))
        assert (app["app"][0].uid, app["app/one"][0].uid) == (1000, 1)
        # Without a base, /tmp can only be written as a created directory.
        assert members(copy(context, scratch, ["a.txt"], "/tmp/"))["tmp"][0].mode == 0o755
        with pytest.raises(InvalidArgument, match=r"cannot copy to /etc/group/x: /etc/group is"):
            copy(context, scratch, ["a.txt"], "/etc/group/x", base=base)


def test_resolve_chown_reads_the_images_accounts(tmp_path: Path, three_layers) -> None:
    with LayerFiles(three_layers[:1], scratch=tmp_path) as image:
        read = image.read_file
        assert resolve_chown("1000", None, 1, "COPY") == (1000, 1000)
        assert resolve_chown("1000:7", None, 1, "COPY") == (1000, 7)
        assert resolve_chown("app", read, 1, "COPY") == (1000, 50)
        assert resolve_chown("app:root", read, 1, "COPY") == (1000, 0)
        assert resolve_chown("0:staff", read, 1, "COPY") == (0, 50)
        with pytest.raises(InvalidArgument, match=r"^Dockerfile:4: COPY failed: unable to find"):
            resolve_chown("nobody", read, 4, "COPY")
        with pytest.raises(InvalidArgument, match="no matching entries in group file"):
            resolve_chown("app:wheel", read, 4, "COPY")
        with pytest.raises(InvalidArgument, match="invalid --chown"):
            resolve_chown("app:", read, 4, "COPY")


def test_hostile_or_broken_layers_are_refused(tmp_path: Path) -> None:
    evil = gz_layer(tmp_path, "evil", entry("../x", data=b"x"))
    with pytest.raises(InvalidArgument, match=r'layer evil: member "../x" points outside'):
        LayerFiles([evil], scratch=tmp_path)
    broken = tmp_path / "broken"
    broken.write_bytes(gzip.compress(make_tar(entry("a", data=b"a" * 5000)))[:-200])
    with pytest.raises(InvalidArgument, match="layer broken"):
        LayerFiles([broken], scratch=tmp_path)


def test_source_matches_from_either_tree_have_one_shape(
    context: BuildContext, tmp_path: Path, three_layers
) -> None:
    with LayerFiles(three_layers, scratch=tmp_path) as image:
        for match in (*context.match(["a.txt"], 1), *image.match(["/app/bin"], 1)):
            assert isinstance(match, SourceMatch) and match.entry.data is not None
            with match.entry.data.open() as f:
                assert f.read() in (b"alpha", b"v2")
