"""berthd.node.diff on hand-made overlayfs dirs: whiteouts (char 0/0, needs root) and opaque
directories (trusted.overlay.opaque, needs root), without mounting anything."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from berthd.common.errors import FailedPrecondition
from berthd.node.diff import changes, export_layer
from berthd.node.idmap import IdMap


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def copy_dir_meta(lower: Path, upper: Path) -> None:
    """What a copy-up leaves: the upper directory looks exactly like the lower one."""
    shutil.copystat(lower, upper)
    st = os.stat(lower)
    os.chown(upper, st.st_uid, st.st_gid)


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two image layers and a container's upper dir. Returns (upper, lowers bottom first)."""
    base, top, upper = tmp_path / "base", tmp_path / "top", tmp_path / "upper"
    for f in ("etc/passwd", "etc/hostname", "bin/sh", "usr/share/doc/readme", "tmp/keep"):
        write(base / f)
    for f in ("data/one", "data/two", "data/sub/three"):
        write(base / f)
    write(top / "etc/motd")
    write(top / "data/two", "newer")
    whiteout(top / "usr/share/doc/readme")  # deleted by the top image layer

    write(upper / "etc/passwd", "changed")
    whiteout(upper / "etc/hostname")
    opaque(upper / "data")
    write(upper / "data/one", "replaced")
    write(upper / "data/new")
    write(upper / "usr/share/doc/readme", "back again")
    write(upper / "root/.ash_history")
    (upper / "tmp").mkdir()
    # Copied-up directories with nothing changed about them: Docker lists them only as the
    # parents of a change. Set last, as creating children changes their mtimes.
    for d in ("usr/share/doc", "usr/share", "usr", "tmp"):
        copy_dir_meta(base / d, upper / d)
    return upper, [base, top]


def test_changes_like_docker_diff(layers: tuple[Path, list[Path]]) -> None:
    upper, lowers = layers
    assert changes(upper, lowers) == [
        ("/data", "C"),  # opaque: its lower contents are gone...
        ("/data/new", "A"),
        ("/data/one", "C"),
        ("/data/sub", "D"),  # ...each listed once, like a deleted directory
        ("/data/two", "D"),
        ("/etc", "C"),
        ("/etc/hostname", "D"),
        ("/etc/passwd", "C"),
        ("/root", "A"),
        ("/root/.ash_history", "A"),
        ("/usr", "C"),
        ("/usr/share", "C"),
        ("/usr/share/doc", "C"),
        ("/usr/share/doc/readme", "A"),  # the top layer had deleted it
    ]


def test_lower_order_matters(layers: tuple[Path, list[Path]]) -> None:
    upper, (base, top) = layers
    # With the layers swapped, the top layer's whiteout no longer hides base's readme.
    assert ("/usr/share/doc/readme", "C") in changes(upper, [top, base])


def test_a_directory_with_new_metadata_is_changed(layers: tuple[Path, list[Path]]) -> None:
    upper, lowers = layers
    os.chmod(upper / "tmp", 0o1777)
    assert ("/tmp", "C") in changes(upper, lowers)


def test_an_empty_upper_dir_has_no_changes(tmp_path: Path) -> None:
    (tmp_path / "upper").mkdir()
    write(tmp_path / "lower" / "a")
    assert changes(tmp_path / "upper", [tmp_path / "lower"]) == []


def test_a_lower_file_hides_what_a_lower_directory_held(tmp_path: Path) -> None:
    base, top, upper = tmp_path / "base", tmp_path / "top", tmp_path / "upper"
    write(base / "x" / "inner")
    write(top / "x", "now a file")
    write(upper / "x" / "inner")  # a directory again, in the container
    assert changes(upper, [base, top]) == [("/x", "C"), ("/x/inner", "A")]


def export(
    upper: Path, idmap: IdMap | None = None
) -> tuple[bytes, list[tarfile.TarInfo], dict[str, bytes]]:
    """(compressed layer, its tar entries, contents of its regular files)."""
    out = io.BytesIO()
    result = export_layer(upper, out, idmap=idmap)
    compressed = out.getvalue()
    raw = gzip.decompress(compressed)
    # The digests are computed in the same pass as the write.
    assert result.digest == "sha256:" + hashlib.sha256(compressed).hexdigest()
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.size == len(compressed)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        contents = {m.name: tar.extractfile(m).read() for m in members if m.isreg()}
    return compressed, members, contents


def test_export_converts_whiteouts(layers: tuple[Path, list[Path]]) -> None:
    upper, _ = layers
    os.link(upper / "data/new", upper / "data/new-link")
    (upper / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.setxattr(upper / "etc/passwd", "user.note", b"kept")
    os.setxattr(upper / "etc/passwd", "trusted.overlay.origin", b"\x00\xff")
    os.chown(upper / "root/.ash_history", 1000, 1001)
    os.utime(upper / "etc/passwd", (1_700_000_000.75, 1_700_000_000.75))

    _, members, contents = export(upper)
    names = [m.name for m in members]
    assert names == [
        "data",
        "data/.wh..wh..opq",  # right after its directory, before anything inside
        "data/new",
        "data/new-link",
        "data/one",
        "etc",
        "etc/.wh.hostname",
        "etc/localtime",
        "etc/passwd",
        "root",
        "root/.ash_history",
        "tmp",
        "usr",
        "usr/share",
        "usr/share/doc",
        "usr/share/doc/readme",
    ]
    by_name = {m.name: m for m in members}
    for marker in ("data/.wh..wh..opq", "etc/.wh.hostname"):
        assert by_name[marker].isreg()
        assert by_name[marker].size == 0
    assert by_name["etc/.wh.hostname"].mode == 0o600
    assert by_name["data"].isdir()
    assert not any("trusted.overlay" in k for m in members for k in m.pax_headers)

    link = by_name["data/new-link"]
    assert link.islnk() and link.linkname == "data/new"
    assert by_name["etc/localtime"].issym()
    assert by_name["etc/localtime"].linkname == "/usr/share/zoneinfo/UTC"

    passwd = by_name["etc/passwd"]
    assert passwd.pax_headers["SCHILY.xattr.user.note"] == "kept"
    assert passwd.mtime == 1_700_000_000
    assert passwd.mode == stat.S_IMODE(os.stat(upper / "etc/passwd").st_mode)
    assert contents["etc/passwd"] == b"changed"
    assert contents["data/new"] == b"x"

    history = by_name["root/.ash_history"]
    assert (history.uid, history.gid, history.uname, history.gname) == (1000, 1001, "", "")


def test_export_is_reproducible(layers: tuple[Path, list[Path]]) -> None:
    upper, _ = layers
    assert export(upper)[0] == export(upper)[0]


def test_binary_xattrs_survive(tmp_path: Path) -> None:
    f = write(tmp_path / "upper" / "ping")
    value = bytes([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF])
    os.setxattr(f, "security.capability", value)
    _, members, _ = export(tmp_path / "upper")
    header = members[0].pax_headers["SCHILY.xattr.security.capability"]
    assert header.encode("utf-8", "surrogateescape") == value


def test_an_empty_upper_dir_exports_an_empty_tar(tmp_path: Path) -> None:
    (tmp_path / "upper").mkdir()
    _, members, _ = export(tmp_path / "upper")
    assert members == []


@pytest.mark.parametrize(
    ("xattr", "option"),
    [("trusted.overlay.redirect", "redirect_dir"), ("trusted.overlay.metacopy", "metacopy")],
)
def test_overlay_features_that_keep_data_below_are_refused(
    tmp_path: Path, xattr: str, option: str
) -> None:
    (tmp_path / "upper" / "moved").mkdir(parents=True)
    os.setxattr(tmp_path / "upper" / "moved", xattr, b"/old")
    with pytest.raises(FailedPrecondition, match=f"{option}=off"):
        export_layer(tmp_path / "upper", io.BytesIO())


# --- a remapped container's upper dir (--userns remap) ----------------------------------------

REMAP = IdMap(100000, 65536)


def remap_tree(upper: Path) -> None:
    """What a remapped container leaves: every owner in its range, whiteouts the kernel's."""
    for path in [upper, *upper.rglob("*")]:
        st = os.lstat(path)
        if not stat.S_ISCHR(st.st_mode):
            os.lchown(path, REMAP.start + st.st_uid, REMAP.start + st.st_gid)


def test_changes_of_a_remapped_upper_dir_are_the_same(layers: tuple[Path, list[Path]]) -> None:
    upper, lowers = layers
    expected = changes(upper, lowers)
    remap_tree(upper)
    # Copied-up directories owned by host 100000 are root's, as in the lowers.
    assert changes(upper, lowers, REMAP) == expected
    # Without the mapping they would all look changed.
    assert ("/tmp", "C") in changes(upper, lowers)


def test_export_of_a_remapped_upper_dir_has_the_containers_owners(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    write(upper / "root/new")
    write(upper / "home/app/file")
    write(upper / "odd")
    whiteout(upper / "etc/hostname")
    opaque(upper / "data")
    remap_tree(upper)
    os.chown(upper / "home/app/file", 101000, 101001)
    os.chown(upper / "odd", 0, 200000)  # not the container's: overflow, as it sees them
    _, members, _ = export(upper, REMAP)
    owners = {m.name: (m.uid, m.gid) for m in members}
    assert owners == {
        "data": (0, 0),
        "data/.wh..wh..opq": (0, 0),
        "etc": (0, 0),
        "etc/.wh.hostname": (0, 0),
        "home": (0, 0),
        "home/app": (0, 0),
        "home/app/file": (1000, 1001),
        "odd": (65534, 65534),
        "root": (0, 0),
        "root/new": (0, 0),
    }
    # The same upper dir read as the host's: host ids as they are.
    _, members, _ = export(upper)
    assert {m.name: m.uid for m in members}["root/new"] == 100000
