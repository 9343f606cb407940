"""A container's changes, read from its overlayfs upper dir: `docker diff` and layer export.

overlayfs records a deletion as a char device 0/0 (a whiteout) and a directory whose lower
contents are hidden as a directory with `trusted.overlay.opaque=y`; OCI layers spell the same
things `.wh.NAME` and `.wh..wh..opq`. The upper dir is written by the container, so it is walked
through directory fds with O_NOFOLLOW: a symlink swapped in mid-walk cannot make us read host
files into a layer.

A remapped container (`--userns remap`) writes its upper dir as host ids of its range
(berthd.node.idmap); given its IdMap, both readers map them back to the container's ids, so a
committed layer has the uid 0 files Docker's have.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from isal import igzip

from berthd.common.errors import FailedPrecondition
from berthd.common.oci.digest import Digester
from berthd.node.idmap import IdMap

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XATTRS = "trusted.overlay."
# Mount options that leave data outside the upper dir; a layer made from it would be incomplete.
_UNSUPPORTED_XATTRS = {
    "trusted.overlay.redirect": "redirect_dir",
    "trusted.overlay.metacopy": "metacopy",
}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TAR_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}  # sockets cannot be archived; Docker skips them too


@dataclass(frozen=True)
class ExportResult:
    """diff_id: sha256 of the uncompressed tar; digest and size: of the gzip stream."""

    diff_id: str
    digest: str
    size: int


@dataclass(frozen=True)
class _Entry:
    rel: str  # path relative to the upper dir, no leading slash
    name: str
    dir_fd: int  # the parent directory, open only until the walk moves on
    st: os.stat_result

    @property
    def whiteout(self) -> bool:
        return is_whiteout(self.st)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _sorted_names(fd: int) -> list[str]:
    # Reversed byte order, so pop() yields names in order: byte order keeps tars reproducible.
    return sorted(os.listdir(fd), key=os.fsencode, reverse=True)


def _walk(top: Path) -> Iterator[_Entry]:
    """Every entry under `top` (not `top` itself), parents first, names sorted."""
    root = os.open(top, _DIR_FLAGS)
    stack = [(root, "", _sorted_names(root))]
    try:
        while stack:
            fd, prefix, names = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                continue
            name = names.pop()
            entry = _Entry(prefix + name, name, fd, os.stat(name, dir_fd=fd, follow_symlinks=False))
            yield entry
            if stat.S_ISDIR(entry.st.st_mode):
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                stack.append((child, entry.rel + "/", _sorted_names(child)))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _xattrs(e: _Entry) -> dict[str, bytes]:
    """All xattrs of an entry, without following it if it is a symlink."""
    # Through the parent's fd: xattr calls take no dir_fd, and a path from the upper dir
    # could be redirected by a symlink swapped in by the container.
    path = f"/proc/self/fd/{e.dir_fd}/{e.name}"
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno == errno.ENOTSUP:
            return {}
        raise
    values = {}
    for key in sorted(names):
        try:
            values[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as err:
            if err.errno != errno.ENODATA:  # removed since listxattr
                raise
    for key, option in _UNSUPPORTED_XATTRS.items():
        if key in values:
            raise FailedPrecondition(
                f"/{e.rel} has {key}: the overlay was mounted with {option}=on, which keeps "
                f"data outside the upper dir; mount container overlays with {option}=off"
            )
    return values


def _is_opaque(xattrs: dict[str, bytes]) -> bool:
    return xattrs.get(OPAQUE_XATTR) == b"y"


class _Lowers:
    """The read-only layers merged as overlayfs merges them, for lookups."""

    def __init__(self, lowers: list[Path]) -> None:
        root: list[tuple[Path, os.stat_result]] = []
        for layer in reversed(lowers):  # top first from here on
            root.append((layer, os.lstat(layer)))
            if _path_opaque(layer):
                break
        # rel path -> the layers whose entry there is visible, top first.
        self._visible: dict[str, list[tuple[Path, os.stat_result]]] = {"": root}

    def _layers(self, rel: str) -> list[tuple[Path, os.stat_result]]:
        """One non-directory, or the directories merged at `rel` down to the first opaque one;
        empty if `rel` does not exist in the merged lowers."""
        if rel in self._visible:
            return self._visible[rel]
        found: list[tuple[Path, os.stat_result]] = []
        # Only layers where the parent is a real directory are consulted, so no path below
        # goes through a symlink.
        for layer, parent_st in self._layers(posixpath.dirname(rel)):
            if not stat.S_ISDIR(parent_st.st_mode):
                break
            try:
                st = os.lstat(layer / rel)
            except FileNotFoundError:
                continue
            if is_whiteout(st):
                break
            if not stat.S_ISDIR(st.st_mode):
                # A non-directory hides everything below it, and is hidden by a directory above.
                if not found:
                    found.append((layer, st))
                break
            found.append((layer, st))
            if _path_opaque(layer / rel):
                break
        self._visible[rel] = found
        return found

    def stat(self, rel: str) -> os.stat_result | None:
        layers = self._layers(rel)
        return layers[0][1] if layers else None

    def children(self, rel: str) -> list[str]:
        """Names in the merged lower directory `rel`."""
        names: set[str] = set()
        for layer, st in self._layers(rel):
            if stat.S_ISDIR(st.st_mode):
                names.update(os.listdir(layer / rel))
        prefix = f"{rel}/" if rel else ""
        return sorted(n for n in names if self._layers(prefix + n))


def _path_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise


def _owner(st: os.stat_result, idmap: IdMap | None) -> tuple[int, int]:
    """The uid and gid of an upper dir entry as the container (and a layer) sees them."""
    if idmap is None:
        return st.st_uid, st.st_gid
    return idmap.to_container(st.st_uid), idmap.to_container(st.st_gid)


def _same_dir(upper: os.stat_result, lower: os.stat_result, idmap: IdMap | None) -> bool:
    # Docker skips a directory that was only copied up on the way to a change below it; the
    # change itself brings the directory back as "C".
    return (upper.st_mode, *_owner(upper, idmap), upper.st_mtime_ns) == (
        lower.st_mode,
        lower.st_uid,
        lower.st_gid,
        lower.st_mtime_ns,
    )


def changes(upper: Path, lowers: list[Path], idmap: IdMap | None = None) -> list[tuple[str, str]]:
    """(path, kind) like `docker diff`: A added, C changed, D deleted; sorted by path.

    `lowers` are the read-only layer directories bottom first, in image order (chain ids);
    overlayfs' lowerdir option lists them the other way round. `idmap`: the container's
    remapped user namespace, whose host ids the upper dir holds.
    """
    below = _Lowers(lowers)
    found: dict[str, str] = {}
    seen: set[str] = set()
    hidden: list[str] = []  # lower entries under opaque directories
    for e in _walk(upper):
        seen.add(e.rel)
        path = "/" + e.rel
        if e.whiteout:
            found[path] = "D"
            continue
        old = below.stat(e.rel)
        is_dir = stat.S_ISDIR(e.st.st_mode)
        if old is None:
            found[path] = "A"
        elif is_dir and _is_opaque(_xattrs(e)):
            found[path] = "C"
            hidden += (f"{e.rel}/{name}" for name in below.children(e.rel))
        elif not (is_dir and stat.S_ISDIR(old.st_mode) and _same_dir(e.st, old, idmap)):
            found[path] = "C"
    for rel in hidden:
        if rel not in seen:
            found["/" + rel] = "D"
    # Docker lists the directories that contain a change; those not in a lower are "A" already.
    for path in list(found):
        parent = posixpath.dirname(path)
        while parent != "/" and parent not in found:
            found[parent] = "C"
            parent = posixpath.dirname(parent)
    return sorted(found.items())


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _HashingWriter:
    """A write-only file that digests and counts what passes through to `out`."""

    def __init__(self, out: _Sink) -> None:
        self._out = out
        self.digester = Digester()

    def write(self, data: bytes) -> int:
        self.digester.update(data)
        self._out.write(data)
        return len(data)


def _tarinfo(
    e: _Entry, name: str, xattrs: dict[str, bytes], idmap: IdMap | None
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[stat.S_IFMT(e.st.st_mode)]
    info.mode = stat.S_IMODE(e.st.st_mode)
    info.uid, info.gid = _owner(e.st, idmap)
    if idmap is not None:
        xattrs = {k: idmap.xattr_to_container(k, v) for k, v in xattrs.items()}
    info.uname = info.gname = ""  # numeric owners: names mean nothing across images
    # Whole seconds, as Docker writes them: a fractional mtime costs a PAX header per entry.
    info.mtime = int(e.st.st_mtime)
    info.pax_headers = {
        # Binary values (security.capability) go through as raw bytes; tarfile then
        # marks the header hdrcharset=BINARY.
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
        for k, v in xattrs.items()
        if not k.startswith(_OVERLAY_XATTRS)
    }
    return info


def _marker(e: _Entry, name: str, mode: int, owner: tuple[int, int]) -> tarfile.TarInfo:
    """An empty regular file standing for a whiteout, owned by `owner`, dated like `e`."""
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid, info.gid = owner
    info.uname = info.gname = ""
    info.mtime = int(e.st.st_mtime)
    return info


def _add_entry(
    tar: tarfile.TarFile, e: _Entry, links: dict[tuple[int, int], str], idmap: IdMap | None
) -> None:
    parent = posixpath.dirname(e.rel)
    if e.whiteout:
        # Mode 0600 like Docker's overlay driver; the kernel's whiteouts say nothing useful.
        # overlayfs makes them with the mounter's credentials: host root, which is no one in
        # a remapped container, so they are root's there too.
        owner = (e.st.st_uid, e.st.st_gid) if idmap is None else (0, 0)
        tar.addfile(_marker(e, posixpath.join(parent, WHITEOUT_PREFIX + e.name), 0o600, owner))
        return
    kind = stat.S_IFMT(e.st.st_mode)
    if kind not in _TAR_TYPES:
        return
    xattrs = _xattrs(e)
    info = _tarinfo(e, e.rel, xattrs, idmap)
    if kind == stat.S_IFDIR:
        tar.addfile(info)
        if _is_opaque(xattrs):
            marker = posixpath.join(e.rel, OPAQUE_MARKER)
            tar.addfile(_marker(e, marker, info.mode, (info.uid, info.gid)))
        return
    if e.st.st_nlink > 1:
        key = (e.st.st_dev, e.st.st_ino)
        if key in links:
            info.type, info.linkname = tarfile.LNKTYPE, links[key]
            tar.addfile(info)
            return
        links[key] = e.rel
    if kind == stat.S_IFLNK:
        info.linkname = os.readlink(e.name, dir_fd=e.dir_fd)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        info.devmajor, info.devminor = os.major(e.st.st_rdev), os.minor(e.st.st_rdev)
    if kind != stat.S_IFREG:
        tar.addfile(info)
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with os.fdopen(os.open(e.name, flags, dir_fd=e.dir_fd), "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != (e.st.st_dev, e.st.st_ino):
            raise FailedPrecondition(
                f"/{e.rel} was replaced during the export; pause the container"
            )
        info.size = st.st_size
        tar.addfile(info, f)


def export_layer(
    upper: Path, out: BinaryIO, *, compresslevel: int = 1, idmap: IdMap | None = None
) -> ExportResult:
    """Write the upper dir to `out` as an OCI layer (tar+gzip, whiteouts in `.wh.` form).

    Deterministic for the same tree: sorted entries, whole-second mtimes, no gzip timestamp.
    `idmap`: the container's remapped user namespace; owners (and file capabilities) are
    written as the container's ids, host ids outside its range as the overflow id 65534.
    """
    compressed = _HashingWriter(out)
    with igzip.IGzipFile(fileobj=compressed, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
        raw = _HashingWriter(gz)
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            links: dict[tuple[int, int], str] = {}
            for entry in _walk(upper):
                _add_entry(tar, entry, links, idmap)
    return ExportResult(raw.digester.digest, compressed.digester.digest, compressed.digester.size)
