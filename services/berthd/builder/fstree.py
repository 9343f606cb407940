"""An in-memory index of a filesystem tree read from tars: the build context, an image's files
(layers applied), an `ADD` archive. Only metadata lives in memory; file data stays in files (the
spooled context tar, a spool of copied data) and is read on demand.

Paths follow Docker's rules: relative to the tree's root (a leading `/` changes nothing), and
symlinks resolve inside the root as in a chroot (`..` stops at the root, absolute targets start
from it), so nothing outside the tree is ever reached.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import quoted

from .spool import Data

Parts = tuple[str, ...]

# Entry kinds are tar types; hardlinks are resolved to the entry they name when indexed.
REGULAR = tarfile.REGTYPE
DIRECTORY = tarfile.DIRTYPE
SYMLINK = tarfile.SYMTYPE
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_SPECIAL_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
_XATTR_PREFIX = "SCHILY.xattr."
# Overlay xattrs mean whiteouts and redirects to the node; only whiteout conversion sets them.
_OVERLAY_XATTR_PREFIX = "trusted.overlay."
_MAX_SYMLINKS = 40  # Linux's limit on links followed in one lookup


@dataclass(frozen=True)
class Entry:
    """Metadata of one file, directory, symlink or device, and a regular file's data."""

    type: bytes  # a tarfile type: REGTYPE, DIRTYPE, SYMTYPE, CHRTYPE, BLKTYPE or FIFOTYPE
    mode: int  # permission bits (0o7777)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()  # PAX values, as tarfile decodes them
    data: Data | None = None

    @property
    def is_dir(self) -> bool:
        return self.type == DIRECTORY

    @property
    def is_symlink(self) -> bool:
        return self.type == SYMLINK

    @property
    def is_regular(self) -> bool:
        return self.type == REGULAR

    @property
    def size(self) -> int:
        return self.data.size if self.data is not None else 0

    def tarinfo(self, name: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = self.type
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""  # numeric owners: names mean nothing across images
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.size = self.size
        info.pax_headers = {_XATTR_PREFIX + k: v for k, v in self.xattrs}
        return info


def directory(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> Entry:
    return Entry(DIRECTORY, mode, uid, gid, mtime)


# Directories a tar implies (a member's parents it has no entry for), as tar and Docker make them.
IMPLIED_DIR = directory()


class SymlinkLoop(InvalidArgument):
    """A path that goes through too many symlinks (a loop, most likely)."""


class Node:
    """One path of a tree: its entry, and a directory's children by name."""

    __slots__ = ("children", "entry")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.children: dict[str, Node] | None = {} if entry.is_dir else None


class Tree:
    """A filesystem tree of entries; see the module docstring for how paths resolve."""

    def __init__(self, root: Entry = IMPLIED_DIR, implied_dir: Entry = IMPLIED_DIR) -> None:
        self.root = Node(root)
        self._implied_dir = implied_dir  # what `put` makes of missing parents
        self.count = 0  # entries put, for progress messages

    def get(self, parts: Parts) -> Node | None:
        """The node at `parts` taken literally (no symlink followed)."""
        node = self.root
        for name in parts:
            if node.children is None or (node := node.children.get(name)) is None:  # type: ignore[assignment]
                return None
        return node

    def put(self, parts: Parts, entry: Entry) -> None:
        """Add or replace `parts`, as a later tar member does: a directory over a directory
        keeps the children, anything else replaces the whole subtree. Missing parents, and
        parents that are not directories, become directories."""
        self.count += 1
        if not parts:
            if entry.is_dir:
                self.root.entry = entry
            return
        node = self.root
        for name in parts[:-1]:
            assert node.children is not None
            child = node.children.get(name)
            if child is None or child.children is None:
                child = node.children[name] = Node(self._implied_dir)
            node = child
        assert node.children is not None
        existing = node.children.get(parts[-1])
        if existing is not None and existing.entry.is_dir and entry.is_dir:
            existing.entry = entry
        else:
            node.children[parts[-1]] = Node(entry)

    def remove(self, parts: Parts) -> None:
        """Delete `parts` and everything under it, if present (a whiteout)."""
        parent = self.get(parts[:-1]) if parts else None
        if parent is not None and parent.children is not None:
            parent.children.pop(parts[-1], None)

    def clear(self, parts: Parts) -> None:
        """Delete everything under the directory `parts` (an opaque whiteout)."""
        node = self.get(parts)
        if node is not None and node.children is not None:
            node.children.clear()

    def resolve(self, parts: Parts, follow_last: bool = True) -> tuple[Parts, Node | None]:
        """The canonical path of `parts` with symlinks followed inside the root, and its node
        (None when nothing is there; the path is then completed literally).

        Raises NotADirectoryError when a component other than the last is not a directory,
        and SymlinkLoop past 40 links.
        """
        todo = list(reversed(parts))
        done: list[str] = []
        nodes = [self.root]
        links = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if done:
                    done.pop()
                    nodes.pop()
                continue
            children = nodes[-1].children
            if children is None:
                raise NotADirectoryError("/" + "/".join(done))
            child = children.get(name)
            if child is None:
                return (*done, *clean_parts("/".join([name, *reversed(todo)]))), None
            if child.entry.is_symlink and (todo or follow_last):
                links += 1
                if links > _MAX_SYMLINKS:
                    where = "/" + "/".join(parts)
                    raise SymlinkLoop(f"too many levels of symbolic links in {where}")
                target = child.entry.linkname
                if target.startswith("/"):
                    done, nodes = [], [self.root]
                todo.extend(reversed(target.split("/")))
                continue
            done.append(name)
            nodes.append(child)
        return tuple(done), nodes[-1]

    def walk(self, node: Node) -> Iterator[tuple[str, Entry]]:
        """(path relative to `node`, entry) for `node` ("") and everything under it, sorted so
        that a directory comes before its contents."""
        stack: list[tuple[str, Node]] = [("", node)]
        while stack:
            path, current = stack.pop()
            yield path, current.entry
            if current.children:
                for name in sorted(current.children, reverse=True):
                    child_path = f"{path}/{name}" if path else name
                    stack.append((child_path, current.children[name]))


def clean_parts(path: str) -> Parts:
    """Components of `path` with `.` dropped and `..` applied, stopping at the root."""
    parts: list[str] = []
    for name in path.split("/"):
        if name == "..":
            if parts:
                parts.pop()
        elif name not in ("", "."):
            parts.append(name)
    return tuple(parts)


def escapes(path: str) -> bool:
    """Whether `..` in a relative `path` climbs above its start (`../x`, `a/../../x`)."""
    depth = 0
    for name in path.split("/"):
        if name == "..":
            depth -= 1
            if depth < 0:
                return True
        elif name not in ("", "."):
            depth += 1
    return False


def member_parts(name: str, what: str) -> Parts:
    """The components of a tar member's name; absolute names and `..` are refused."""
    if "\0" in name:
        raise InvalidArgument(f"{what}: member {quoted(name)} has a NUL byte in its name")
    if name.startswith("/"):
        raise InvalidArgument(f"{what}: member {quoted(name)} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{what}: member {quoted(name)} points outside the archive ('..')")
    return parts


def add_member(
    tree: Tree, parts: Parts, info: tarfile.TarInfo, data: Data | None, what: str, preserve: bool
) -> None:
    """Put one tar member into `tree`. A hardlink becomes a copy of the entry it names (which
    must be an earlier file of the tree). `preserve` keeps owners and xattrs (image layers,
    archives); without it everything is root's and plain, as Docker makes the build context."""
    if info.islnk():
        target = tree.get(member_parts(info.linkname, what))
        if target is None or target.entry.is_dir:
            raise InvalidArgument(
                f"{what}: hardlink {quoted(info.name)} points to {quoted(info.linkname)}, "
                "which is not an earlier file of the archive"
            )
        tree.put(parts, target.entry)
        return
    if info.issparse():
        raise InvalidArgument(f"{what}: member {quoted(info.name)} is a sparse file (unsupported)")
    if info.type in _REGULAR_TYPES:
        kind = REGULAR
    elif info.type in (DIRECTORY, SYMLINK, *_SPECIAL_TYPES):
        kind = info.type
    else:
        raise InvalidArgument(
            f"{what}: member {quoted(info.name)} has an unsupported type "
            f"{quoted(info.type.decode(errors='replace'))}"
        )
    xattrs = tuple(
        (key[len(_XATTR_PREFIX) :], value)
        for key, value in sorted(info.pax_headers.items())
        if key.startswith(_XATTR_PREFIX)
        and not key[len(_XATTR_PREFIX) :].startswith(_OVERLAY_XATTR_PREFIX)
    )
    entry = Entry(
        type=kind,
        mode=info.mode & 0o7777,
        uid=info.uid if preserve else 0,
        gid=info.gid if preserve else 0,
        mtime=int(info.mtime),
        linkname=info.linkname if kind == SYMLINK else "",
        devmajor=info.devmajor if kind in _SPECIAL_TYPES else 0,
        devminor=info.devminor if kind in _SPECIAL_TYPES else 0,
        xattrs=xattrs if preserve else (),
        data=data if kind == REGULAR else None,
    )
    tree.put(parts, entry)


def join(*paths: str) -> str:
    """Join relative paths, skipping empty ones ("" is the root)."""
    return posixpath.join(*[p for p in paths if p]) if any(paths) else ""
