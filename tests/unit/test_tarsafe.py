"""berthd.common.tarsafe: hostile layers are refused without touching anything outside the
destination; good layers come out exactly as an overlay lower dir needs them."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import uuid
from pathlib import Path

import pytest

from berthd.common.errors import FailedPrecondition, InvalidArgument
from berthd.common.oci import mediatypes as mt
from berthd.common.tarsafe import (
    ExtractResult,
    HashingReader,
    UnsafeLayer,
    check_layer_media_type,
    extract_layer,
    open_layer_stream,
)

Entry = tuple[tarfile.TarInfo, bytes]


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def d(name: str, **attrs) -> Entry:
    return entry(name, tarfile.DIRTYPE, **attrs)


def symlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.SYMTYPE, linkname=target)


def hardlink(name: str, target: str) -> Entry:
    return entry(name, tarfile.LNKTYPE, linkname=target)


def make_tar(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def extract(tar: bytes, dest: Path) -> ExtractResult:
    return extract_layer(io.BytesIO(tar), dest)


def tree(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under root with its type and content, to prove nothing changed."""
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), content)
    return out


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """`tmp_path/work/dest`, next to a sentinel tree `tmp_path/outside` a layer must not touch."""
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "victim").write_bytes(b"original")
    (tmp_path / "work" / "dest").mkdir(parents=True)
    return tmp_path / "work" / "dest"


# --- hostile layers ------------------------------------------------------------------------


def hostile_cases(outside: Path) -> dict[str, tuple[list[Entry], str]]:
    """name -> (entries, text the error must contain)."""
    absolute = f"/tmp/berth-tarsafe-{uuid.uuid4().hex}"
    return {
        "dotdot": ([entry("../x", data=b"pwned")], "'..'"),
        "dotdot-deep": ([d("a"), entry("a/../../x", data=b"pwned")], "'..'"),
        "absolute": ([entry(absolute, data=b"pwned")], "absolute path"),
        "etc": ([entry("/etc/berth-tarsafe-x", data=b"pwned")], "absolute path"),
        "symlink-parent": (
            [symlink("a", str(outside)), entry("a/x", data=b"pwned")],
            '"a" is a symlink',
        ),
        "symlink-to-tmp": ([symlink("a", "/tmp"), entry("a/x", data=b"pwned")], "symlink"),
        "symlink-relative": (
            [symlink("a", "../../outside"), entry("a/victim", data=b"pwned")],
            "symlink",
        ),
        "symlink-chain": (
            [
                symlink("c", str(outside)),
                symlink("b", "c"),
                symlink("a", "b"),
                entry("a/x", data=b"pwned"),
            ],
            "symlink",
        ),
        "symlink-deep": (
            [d("ok"), symlink("ok/link", "../../../outside"), d("ok/link/sub/deeper")],
            '"ok/link" is a symlink',
        ),
        "dir-replaced-by-symlink": (
            [d("d"), entry("d/f"), symlink("d", str(outside)), entry("d/x", data=b"pwned")],
            "symlink",
        ),
        "whiteout-through-symlink": (
            [symlink("a", str(outside)), entry("a/.wh.victim")],
            "symlink",
        ),
        "opaque-through-symlink": (
            [symlink("a", str(outside)), entry("a/.wh..wh..opq")],
            "symlink",
        ),
        "hardlink-etc-passwd": ([hardlink("h", "/etc/passwd")], "absolute path"),
        "hardlink-dotdot": ([hardlink("h", "../x")], "'..'"),
        "hardlink-outside-victim": (
            [hardlink("h", "../../outside/victim")],
            "'..'",
        ),
        "hardlink-not-yet-extracted": (
            [hardlink("h", "later"), entry("later", data=b"x")],
            "not a file extracted earlier",
        ),
        "hardlink-through-symlink": (
            [symlink("s", str(outside)), hardlink("h", "s/victim")],
            "not a file extracted earlier",
        ),
        "hardlink-to-dir": ([d("dir"), hardlink("h", "dir")], "not a file extracted earlier"),
        "nul-name": (
            [entry("x", data=b"pwned", pax_headers={"path": "a\x00/../../x"})],
            "NUL byte",
        ),
        "nul-linkname": (
            [entry("h", tarfile.LNKTYPE, pax_headers={"linkpath": "f\x00oo"})],
            "NUL byte",
        ),
        "whiteout-dotdot": ([entry(".wh..."), entry("x")], "whiteout of an invalid name"),
        "file-as-parent": ([entry("f"), entry("f/x")], '"f" is not a directory'),
    }


HOSTILE = sorted(hostile_cases(Path("/")))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_entry_is_refused_and_nothing_is_written_outside(
    case: str, dest: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    entries, message = hostile_cases(outside)[case]
    before = tree(tmp_path / "outside")
    absolute = [info.name for info, _ in entries if info.name.startswith("/")]

    with pytest.raises(UnsafeLayer) as err:
        extract(make_tar(*entries), dest)

    assert message in str(err.value)
    assert isinstance(err.value, InvalidArgument)
    assert "layer entry" in str(err.value)  # names the entry
    assert tree(tmp_path / "outside") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "work"]
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["dest"]
    assert not Path("/x").exists()
    for name in absolute:
        assert not Path(name).exists()


def test_file_over_a_symlink_replaces_the_link_and_leaves_its_target(
    dest: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "outside" / "victim"
    extract(make_tar(symlink("evil", str(victim)), entry("evil", data=b"new")), dest)
    assert (dest / "evil").read_bytes() == b"new"
    assert not (dest / "evil").is_symlink()
    assert victim.read_bytes() == b"original"


def test_dir_over_a_symlink_replaces_the_link(dest: Path, tmp_path: Path) -> None:
    extract(make_tar(symlink("d", str(tmp_path / "outside")), d("d"), entry("d/x")), dest)
    assert (dest / "d").is_dir() and not (dest / "d").is_symlink()
    assert not (tmp_path / "outside" / "x").exists()


@pytest.mark.parametrize(
    ("tar", "message"),
    [
        (b"", "not a valid tar archive: empty file"),
        (make_tar(entry("f", data=b"x" * 5000))[:2048], "unexpected end of data"),
        (make_tar(entry("odd", b"Z")), "unsupported tar entry type"),
    ],
)
def test_malformed_tars_are_invalid_arguments(tar: bytes, message: str, dest: Path) -> None:
    with pytest.raises(InvalidArgument, match=message):
        extract(tar, dest)


def test_destination_must_be_empty(dest: Path) -> None:
    (dest / "leftover").touch()
    with pytest.raises(FailedPrecondition, match="not empty"):
        extract(make_tar(entry("f")), dest)


# --- good layers ---------------------------------------------------------------------------


def test_owners_modes_setuid_sticky_and_xattrs(dest: Path) -> None:
    binary = b"\x00\x01\xff value"
    tar = make_tar(
        d("tmp", mode=0o1777),
        d("ro", mode=0o555, uid=7, gid=8),
        entry("ro/f", data=b"x", mode=0o440),
        entry("bin/su", data=b"ELF", mode=0o4755, uid=0, gid=0),
        entry("usr/bin/sg", data=b"ELF", mode=0o2711, uid=1000, gid=1001),
        entry(
            "owned",
            data=b"data",
            mode=0o640,
            uid=1234,
            gid=5678,
            pax_headers={
                "SCHILY.xattr.user.comment": "hello",
                "SCHILY.xattr.user.bin": binary.decode("utf-8", "surrogateescape"),
                "SCHILY.xattr.trusted.overlay.redirect": "/forged",
            },
        ),
    )
    extract(tar, dest)

    def mode(p: str) -> int:
        return stat.S_IMODE((dest / p).lstat().st_mode)

    assert mode("tmp") == 0o1777
    assert mode("ro") == 0o555 and mode("ro/f") == 0o440
    assert ((dest / "ro").stat().st_uid, (dest / "ro").stat().st_gid) == (7, 8)
    assert mode("bin/su") == 0o4755
    assert mode("usr/bin/sg") == 0o2711
    assert ((dest / "usr/bin/sg").stat().st_uid, (dest / "usr/bin/sg").stat().st_gid) == (
        1000,
        1001,
    )
    assert mode("bin") == 0o755  # implied parents, as tar makes them
    st = (dest / "owned").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert os.getxattr(dest / "owned", "user.comment") == b"hello"
    assert os.getxattr(dest / "owned", "user.bin") == binary
    # Only whiteout conversion may set overlay xattrs.
    assert "trusted.overlay.redirect" not in os.listxattr(dest / "owned")


def test_mtimes_including_dirs_written_into_later(dest: Path) -> None:
    tar = make_tar(
        d("a", mtime=1_500_000_000),
        d("a/b", mtime=1_400_000_000),
        entry("a/b/f", data=b"x", mtime=1_300_000_000),
        entry("a/g", data=b"y", mtime=1_200_000_000),
        symlink("a/l", "g"),
    )
    extract(tar, dest)
    assert (dest / "a").stat().st_mtime == 1_500_000_000
    assert (dest / "a/b").stat().st_mtime == 1_400_000_000
    assert (dest / "a/b/f").stat().st_mtime == 1_300_000_000
    assert (dest / "a/g").stat().st_mtime == 1_200_000_000
    assert (dest / "a/l").lstat().st_mtime == 1_600_000_000


def test_symlinks_and_hardlinks_inside(dest: Path) -> None:
    tar = make_tar(
        entry("bin/busybox", data=b"ELF", mode=0o755),
        symlink("bin/sh", "busybox"),
        symlink("abs", "/bin/busybox"),  # absolute targets are fine: resolved in the container
        symlink("dangling", "../../nowhere"),
        hardlink("usr/bin/env", "bin/busybox"),
        hardlink("./bin/link-to-link", "./bin/sh"),
    )
    result = extract(tar, dest)
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert os.readlink(dest / "abs") == "/bin/busybox"
    assert os.readlink(dest / "dangling") == "../../nowhere"
    original, linked = (dest / "bin/busybox").stat(), (dest / "usr/bin/env").stat()
    assert original.st_ino == linked.st_ino and original.st_nlink == 2
    assert (dest / "bin/link-to-link").is_symlink()
    assert (dest / "bin/link-to-link").lstat().st_ino == (dest / "bin/sh").lstat().st_ino
    assert result == ExtractResult(entries=6, bytes=3)


def test_whiteouts_become_overlay_whiteouts(dest: Path) -> None:
    tar = make_tar(
        d("etc"),
        entry("etc/.wh.gone", uid=5, gid=6),
        entry(".wh.toplevel"),
        d("var/cache"),
        entry("var/cache/.wh..wh..opq"),
        entry("var/cache/new", data=b"n"),
        entry("newdir/.wh..wh..opq"),  # a marker may come before (or without) its dir entry
        entry(".wh..wh.plnk"),  # aufs bookkeeping: ignored
    )
    extract(tar, dest)
    for path in (dest / "etc/gone", dest / "toplevel"):
        st = path.lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert ((dest / "etc/gone").lstat().st_uid, (dest / "etc/gone").lstat().st_gid) == (5, 6)
    assert os.getxattr(dest / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(dest / "newdir", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "etc")
    names = {p.name for p in dest.rglob("*")}
    assert not any(name.startswith(".wh.") for name in names)
    assert (dest / "var/cache/new").read_bytes() == b"n"


def test_device_nodes_and_fifos_are_kept(dest: Path) -> None:
    tar = make_tar(
        entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660),
        entry("run/fifo", tarfile.FIFOTYPE, mode=0o600),
    )
    extract(tar, dest)
    null = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3 and stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK((dest / "dev/loop0").lstat().st_mode)
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)


def test_later_entries_replace_earlier_ones(dest: Path) -> None:
    tar = make_tar(
        entry("f", data=b"one"),
        entry("f", data=b"two", mode=0o600),
        d("d", mode=0o700),
        entry("d/child", data=b"kept"),
        d("d", mode=0o750),  # a dir over a dir keeps its contents
        d("gone"),
        entry("gone/x"),
        symlink("gone", "f"),  # anything else over a dir replaces the whole dir
        symlink("l", "f"),
        entry("l", data=b"file now"),
        entry("w", data=b"w"),
        entry(".wh.w"),  # a whiteout replaces an entry of the same layer too
    )
    extract(tar, dest)
    assert (dest / "f").read_bytes() == b"two"
    assert stat.S_IMODE((dest / "f").stat().st_mode) == 0o600
    assert (dest / "d/child").read_bytes() == b"kept"
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o750
    assert os.readlink(dest / "gone") == "f"
    assert (dest / "l").read_bytes() == b"file now" and not (dest / "l").is_symlink()
    assert stat.S_ISCHR((dest / "w").lstat().st_mode)


def test_root_entry_sets_the_destination_metadata(dest: Path) -> None:
    extract(make_tar(d("./", mode=0o711, mtime=1_234_567_890), entry("./f")), dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o711
    assert dest.stat().st_mtime == 1_234_567_890
    assert (dest / "f").exists()


def test_many_entries_in_many_dirs(dest: Path) -> None:
    """More directories than the fd cache holds, deep paths, and file data of all sizes."""
    entries = [entry(f"d{i % 300}/sub/f{i}", data=bytes([i % 256]) * (i * 37)) for i in range(900)]
    deep = "/".join(["deep"] * 200)
    entries.append(entry(f"{deep}/leaf", data=b"bottom"))
    result = extract(make_tar(*entries), dest)
    assert (dest / "d7/sub/f307").read_bytes() == bytes([307 % 256]) * (307 * 37)
    assert (dest / deep / "leaf").read_bytes() == b"bottom"
    assert result.entries == 901
    assert result.bytes == sum(i * 37 for i in range(900)) + 6
    assert len(os.listdir("/proc/self/fd")) < 50  # no fd left open


def test_hashing_reader_digest_covers_the_whole_stream(dest: Path) -> None:
    tar = make_tar(entry("f", data=b"content")) + b"\0" * 4096  # extra padding after the end
    reader = HashingReader(io.BytesIO(tar))
    extract_layer(reader, dest)
    assert reader.digest == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert reader.size == len(tar)


# --- blob streams ------------------------------------------------------------------------


def test_open_layer_stream_gzip_and_plain_with_progress(tmp_path: Path) -> None:
    tar = make_tar(entry("f", data=os.urandom(300_000)))
    gz = tmp_path / "layer.tar.gz"
    gz.write_bytes(gzip.compress(tar))
    plain = tmp_path / "layer.tar"
    plain.write_bytes(tar)
    seen: list[tuple[int, int]] = []
    with open_layer_stream(gz, mt.OCI_LAYER_TAR_GZIP, lambda d, t: seen.append((d, t))) as s:
        assert HashingReader(s).read() == tar
    assert seen[-1] == (gz.stat().st_size, gz.stat().st_size)
    with open_layer_stream(plain, mt.OCI_LAYER_TAR) as s:
        assert s.read() == tar
    with open_layer_stream(gz, mt.DOCKER_LAYER_TAR_GZIP) as s:
        assert s.read() == tar


def test_open_layer_stream_refuses_zstd_unknown_types_and_corrupt_gzip(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(make_tar(entry("f", data=b"x" * 1000)))[:-20])
    with pytest.raises(InvalidArgument, match="zstd layers are not supported yet"):
        open_layer_stream(blob, mt.OCI_LAYER_TAR_ZSTD)
    with pytest.raises(InvalidArgument, match="zstd layers are not supported yet"):
        check_layer_media_type(mt.OCI_LAYER_TAR_ZSTD)
    with pytest.raises(InvalidArgument, match="unsupported layer media type"):
        open_layer_stream(blob, "application/octet-stream")
    (tmp_path / "out").mkdir()
    with (
        pytest.raises(InvalidArgument, match="not valid compressed data"),
        open_layer_stream(blob, mt.OCI_LAYER_TAR_GZIP) as s,
    ):
        extract_layer(s, tmp_path / "out")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not gzip at all" * 100)
    with (
        pytest.raises(InvalidArgument, match="not valid compressed data"),
        open_layer_stream(garbage, mt.OCI_LAYER_TAR_GZIP) as s,
    ):
        s.read()
