"""Unpack OCI layer tars from hostile sources, and read layer blobs as uncompressed tar streams.

`extract_layer` reads the tar as a stream (no seeking, so it can sit behind a decompressor and
a hasher) and never writes outside its destination: every path is resolved one component at a
time from a directory fd, refusing symlinks (`lstat`, `O_NOFOLLOW`), and every file is created
relative to its parent's fd. Whiteouts become overlayfs whiteouts, so the destination can be
used as an overlay lower dir as is.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from isal import igzip, igzip_lib

from berthd.common.errors import FailedPrecondition, InvalidArgument
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import Digester, quoted

WHITEOUT_PREFIX = ".wh."
# `.wh..wh.*` names are aufs bookkeeping; only the opaque marker means something to overlay.
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Only whiteout conversion may set overlay xattrs: a layer that carried its own could forge
# opaque dirs or redirects that overlayfs would follow.
_OVERLAY_XATTR_PREFIX = "trusted.overlay."
_PAX_XATTR_PREFIX = "SCHILY.xattr."

# tarfile's stream buffer copies its unread remainder on every header read, so a large buffer
# hurts layers of small files: 64 KiB matched the 10 KiB default there and was a bit faster on
# large files; 1 MiB took twice as long on small files.
_TAR_BUFSIZE = 64 * 1024
_COPY_CHUNK = 1024 * 1024
# Parent directory fds kept open between entries (most entries share a few parents).
_MAX_CACHED_DIRS = 128
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICE_KINDS = {
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}

Progress = Callable[[int, int], None]
"""progress(bytes_done, total) of the compressed blob consumed so far."""


class UnsafeLayer(InvalidArgument):
    """A layer entry that would write outside the destination or through a link."""


@dataclass(frozen=True)
class ExtractResult:
    entries: int  # tar entries processed, whiteouts included
    bytes: int  # regular file content written


class Reader(Protocol):
    """What extraction needs of a stream: sequential reads."""

    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Passes reads through while hashing them: the diff_id of a tar read by `extract_layer`."""

    def __init__(self, stream: Reader) -> None:
        self._stream = stream
        self._digester = Digester()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._digester.update(data)
        return data

    def readable(self) -> bool:
        return True

    @property
    def digest(self) -> str:
        return self._digester.digest

    @property
    def size(self) -> int:
        return self._digester.size


def extract_layer(tar_stream: Reader, dest: Path) -> ExtractResult:
    """Unpack an uncompressed layer tar into the empty directory `dest`.

    The stream is read to its end, past the tar's end-of-archive blocks, so a `HashingReader`
    given as `tar_stream` sees every byte. Raises UnsafeLayer for entries that could escape
    `dest`, InvalidArgument for a malformed tar; `dest` is then left partly filled.
    """
    with os.scandir(dest) as it:
        if any(it):
            raise FailedPrecondition(f"cannot extract a layer into {dest}: it is not empty")
    with _Extractor(dest) as extractor:
        try:
            with tarfile.open(fileobj=tar_stream, mode="r|", bufsize=_TAR_BUFSIZE) as tar:
                for member in tar:
                    extractor.add(tar, member)
        except tarfile.TarError as e:
            raise InvalidArgument(f"layer is not a valid tar archive: {e}") from e
        extractor.set_dir_times()
    while tar_stream.read(_COPY_CHUNK):
        pass
    return ExtractResult(extractor.entries, extractor.bytes)


def open_layer_stream(
    path: str | os.PathLike[str], media_type: str, progress: Progress | None = None
) -> BinaryIO:
    """The uncompressed tar stream of a layer blob file; close it when done.

    `progress`, if given, is called as the compressed file is consumed.
    """
    decoder, errors = _decoder(media_type)
    file = open(path, "rb")  # noqa: SIM115 - the returned stream closes it
    source: Reader = file
    if progress is not None:
        source = _ProgressReader(file, os.fstat(file.fileno()).st_size, progress)
    stream = source if decoder is None else decoder(source)
    return cast(BinaryIO, _LayerStream(stream, file, errors, Path(path).name))


def check_layer_media_type(media_type: str) -> None:
    """Raise InvalidArgument unless `open_layer_stream` can read layers of this media type."""
    _decoder(media_type)


Decoder = Callable[[Reader], Reader]


def _decoder(media_type: str) -> tuple[Decoder | None, tuple[type[Exception], ...]]:
    """How to decompress a layer of this media type, and the errors corrupt data raises."""
    if mediatypes.is_gzip_layer(media_type):
        # ISA-L inflates several times faster than zlib (figures in berthd.node.layers).
        return _gunzip, (igzip.BadGzipFile, igzip_lib.IsalError, EOFError)
    if mediatypes.is_zstd_layer(media_type):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            raise InvalidArgument(
                f"zstd layers are not supported yet ({media_type}); push the image with gzip layers"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader, (zstandard.ZstdError,)
    if media_type in mediatypes.LAYER_TYPES:
        return None, ()
    raise InvalidArgument(f"unsupported layer media type {quoted(media_type)}")


def _gunzip(source: Reader) -> Reader:
    return igzip.IGzipFile(fileobj=source, mode="rb")


class _ProgressReader:
    def __init__(self, stream: BinaryIO, total: int, progress: Progress) -> None:
        self._stream = stream
        self._total = total
        self._done = 0
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._count(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # isal's reader uses this
        n = self._stream.readinto(buffer)
        self._count(n)
        return n

    def readable(self) -> bool:
        return True

    def _count(self, n: int) -> None:
        self._done += n
        self._progress(self._done, self._total)


class _LayerStream:
    """A decompressed layer that reports corrupt data as InvalidArgument and closes its file."""

    def __init__(
        self, stream: Reader, file: BinaryIO, errors: tuple[type[Exception], ...], name: str
    ) -> None:
        self._stream = stream
        self._file = file
        self._errors = errors
        self._name = name

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except self._errors as e:
            raise InvalidArgument(
                f"layer blob {self._name} is not valid compressed data: {e}"
            ) from e

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None and self._stream is not self._file:
                close()
        finally:
            self._file.close()

    def __enter__(self) -> _LayerStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Parts = tuple[str, ...]


class _Extractor:
    """Writes tar entries under one root directory fd; see the module docstring."""

    def __init__(self, dest: Path) -> None:
        self._root = os.open(dest, _DIR_FLAGS)
        self._dirs: dict[Parts, int] = {}  # cached parent fds
        self._files: set[Parts] = set()  # non-directories written: valid hardlink targets
        self._dir_times: dict[Parts, int] = {}  # set last: writing entries changes dir mtimes
        self.entries = 0
        self.bytes = 0

    def __enter__(self) -> _Extractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close_dirs()
        os.close(self._root)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if len(self._dirs) >= _MAX_CACHED_DIRS:
            self._close_dirs()
        try:
            self._add(tar, member)
        except (ValueError, OverflowError) as e:  # e.g. an mtime out of range
            raise InvalidArgument(f"layer entry {quoted(member.name)}: {e}") from e
        except OSError as e:
            if e.errno not in (errno.ENAMETOOLONG, errno.EINVAL):
                raise
            raise InvalidArgument(f"layer entry {quoted(member.name)}: {e.strerror}") from e

    def _add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = split_path(member.name, member.name)
        if not parts:  # "./": the layer root itself
            if not member.isdir():
                raise UnsafeLayer(f"layer entry {quoted(member.name)}: the root must be a dir")
            _set_metadata(self._root, member)
            self._dir_times[()] = _mtime_ns(member)
            return
        parent, base = parts[:-1], parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, member)
            return
        with self._opendir(parent, member.name) as dir_fd:
            kept_dir = self._make_room(dir_fd, parts, keep_dir=member.isdir())
            if member.isdir():
                self._directory(dir_fd, parts, member, kept_dir)
            elif member.isreg():
                self._regular(tar, dir_fd, parts, member)
            elif member.issym():
                self._symlink(dir_fd, parts, member)
            elif member.islnk():
                self._hardlink(dir_fd, parts, member)
            elif member.type in _DEVICE_KINDS:
                kind = _DEVICE_KINDS[member.type]
                device = os.makedev(member.devmajor, member.devminor)
                os.mknod(base, kind | 0o600, device, dir_fd=dir_fd)
                _set_metadata_at(dir_fd, base, member)
                self._files.add(parts)
            else:
                raise InvalidArgument(
                    f"layer entry {quoted(member.name)}: unsupported tar entry type "
                    f"{quoted(member.type.decode(errors='replace'))}"
                )

    def _whiteout(self, parent: Parts, base: str, member: tarfile.TarInfo) -> None:
        if base == OPAQUE_MARKER:
            with self._opendir(parent, member.name) as dir_fd:
                os.setxattr(dir_fd, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise UnsafeLayer(f"layer entry {quoted(member.name)}: whiteout of an invalid name")
        with self._opendir(parent, member.name) as dir_fd:
            self._make_room(dir_fd, (*parent, name), keep_dir=False)
            # overlayfs hides a lower file behind a 0/0 char device of the same name.
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
            os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)

    def _directory(self, dir_fd: int, parts: Parts, member: tarfile.TarInfo, exists: bool) -> None:
        if not exists:
            os.mkdir(parts[-1], 0o700, dir_fd=dir_fd)
        fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=dir_fd)
        try:
            _set_metadata(fd, member)
        finally:
            os.close(fd)
        self._dir_times[parts] = _mtime_ns(member)

    def _regular(
        self, tar: tarfile.TarFile, dir_fd: int, parts: Parts, member: tarfile.TarInfo
    ) -> None:
        fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            if member.size:
                self.bytes += _copy_data(tar, member, fd)
            _set_metadata(fd, member)
            os.utime(fd, ns=(_mtime_ns(member),) * 2)
        finally:
            os.close(fd)
        self._files.add(parts)

    def _symlink(self, dir_fd: int, parts: Parts, member: tarfile.TarInfo) -> None:
        if not member.linkname or "\0" in member.linkname:
            raise InvalidArgument(
                f"layer entry {quoted(member.name)}: invalid symlink target "
                f"{quoted(member.linkname)}"
            )
        # The target may be anything (absolute ones are resolved inside the container);
        # what is refused is writing through the link, when resolving later entries.
        os.symlink(member.linkname, parts[-1], dir_fd=dir_fd)
        _set_metadata_at(dir_fd, parts[-1], member)
        self._files.add(parts)

    def _hardlink(self, dir_fd: int, parts: Parts, member: tarfile.TarInfo) -> None:
        target = split_path(member.linkname, member.name)
        unsafe = UnsafeLayer(
            f"layer entry {quoted(member.name)}: hardlink target {quoted(member.linkname)} is "
            "not a file extracted earlier from this layer"
        )
        if target not in self._files:
            raise unsafe
        try:
            with self._opendir(target[:-1], member.name, create=False) as target_dir:
                # follow_symlinks=False: link the entry itself, even if it is a symlink.
                os.link(
                    target[-1],
                    parts[-1],
                    src_dir_fd=target_dir,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
        except FileNotFoundError:
            raise unsafe from None
        self._files.add(parts)

    def _make_room(self, dir_fd: int, parts: Parts, keep_dir: bool) -> bool:
        """Remove what `parts` names, as a later tar entry replaces an earlier one.

        An existing directory is kept (True) when the new entry is a directory too.
        """
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        self._forget(parts)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(parts[-1], dir_fd=dir_fd)
        else:
            os.unlink(parts[-1], dir_fd=dir_fd)
        return False

    def _forget(self, parts: Parts) -> None:
        """Drop what is known about `parts` and everything under it, which is being removed."""
        n = len(parts)
        for key in [k for k in self._dirs if k[:n] == parts]:
            os.close(self._dirs.pop(key))
        self._files = {k for k in self._files if k[:n] != parts}
        for key in [k for k in self._dir_times if k[:n] == parts]:
            del self._dir_times[key]

    @contextmanager
    def _opendir(self, parts: Parts, entry: str, create: bool = True) -> Iterator[int]:
        """An fd of the directory `parts`, reached without following any symlink.

        Missing directories are created (mode 0755, as tar does) when `create` is set.
        """
        depth = len(parts)
        while depth and parts[:depth] not in self._dirs:
            depth -= 1
        fd = self._dirs[parts[:depth]] if depth else self._root
        owned = False  # whether fd is ours to close (not cached)
        try:
            for i in range(depth, len(parts)):
                child = _open_child(fd, parts[: i + 1], entry, create)
                if owned:
                    os.close(fd)
                fd, owned = child, len(self._dirs) >= _MAX_CACHED_DIRS
                if not owned:
                    self._dirs[parts[: i + 1]] = fd
            yield fd
        finally:
            if owned:
                os.close(fd)

    def set_dir_times(self) -> None:
        """Directory mtimes, deepest first, once nothing more is written into them."""
        for parts, ns in sorted(self._dir_times.items(), key=lambda kv: -len(kv[0])):
            if not parts:
                os.utime(self._root, ns=(ns, ns))
                continue
            with self._opendir(parts[:-1], "/".join(parts), create=False) as dir_fd:
                os.utime(parts[-1], ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)

    def _close_dirs(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()


def split_path(name: str, entry: str, where: str = "layer") -> Parts:
    """The components of a tar path (a member's name or link target) inside a layer or a root
    filesystem tarball; refuses absolute paths and `..`, naming `entry` and `where` it is."""
    if "\0" in name:
        raise UnsafeLayer(f"{where} entry {quoted(entry)}: NUL byte in path {quoted(name)}")
    if name.startswith("/"):
        raise UnsafeLayer(f"{where} entry {quoted(entry)}: absolute path {quoted(name)}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(f"{where} entry {quoted(entry)}: path {quoted(name)} contains '..'")
    return parts


def _open_child(dir_fd: int, parts: Parts, entry: str, create: bool) -> int:
    """Open directory `parts[-1]` in `dir_fd`; a symlink there is an attempt to escape."""
    name = parts[-1]
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    else:
        where = quoted("/".join(parts))
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeLayer(
                f"layer entry {quoted(entry)}: {where} is a symlink; writing through it "
                "could escape the layer"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"layer entry {quoted(entry)}: {where} is not a directory")
    # O_NOFOLLOW: even if the entry changed since the lstat, a link is never followed.
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _copy_data(tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> int:
    source = tar.extractfile(member)
    assert source is not None  # regular files always have data
    # A short tar raises tarfile.ReadError here ("unexpected end of data").
    while chunk := source.read(_COPY_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    return member.size


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return round(member.mtime * 1_000_000_000)


def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in member.pax_headers.items():
        if key.startswith(_PAX_XATTR_PREFIX):
            name = key[len(_PAX_XATTR_PREFIX) :]
            if not name.startswith(_OVERLAY_XATTR_PREFIX):
                # tarfile decoded the value with surrogateescape; this restores the bytes.
                yield name, value.encode("utf-8", "surrogateescape")


def _setxattr(target: int | str, name: str, value: bytes) -> None:
    """Set an xattr on an fd, or on a path without following a final symlink."""
    try:
        if isinstance(target, int):
            os.setxattr(target, name, value)
        else:
            os.setxattr(target, name, value, follow_symlinks=False)
    except OSError as e:
        # A namespace this filesystem lacks (e.g. security.selinux): Docker skips them too.
        if e.errno != errno.EOPNOTSUPP:
            raise


def _set_metadata(fd: int, member: tarfile.TarInfo) -> None:
    """Owner, mode and xattrs of an open file or dir. chown first: it clears setuid bits."""
    os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, member.mode & 0o7777)
    for name, value in _xattrs(member):
        _setxattr(fd, name, value)


def _set_metadata_at(dir_fd: int, name: str, member: tarfile.TarInfo) -> None:
    """Metadata of a symlink or device node, which must not be opened."""
    os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
    if not member.issym():  # Linux has no symlink modes
        os.chmod(name, member.mode & 0o7777, dir_fd=dir_fd)
    # setxattr has no dir_fd form; the /proc path goes through the trusted dir fd.
    for key, value in _xattrs(member):
        _setxattr(f"/proc/self/fd/{dir_fd}/{name}", key, value)
    ns = _mtime_ns(member)
    os.utime(name, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)
