"""User-namespace remapping (`--userns remap`): the id arithmetic and the idmapped mounts.

A remapped container runs in a user namespace of its own whose ids 0..size-1 are the host ids
start..start+size-1 (the node's `--userns-remap-range`, default 100000:65536): its root is
host uid 100000, which owns nothing on the host.

Layers stay unpacked once, as host ids, and shared. For a remapped container each lower
directory gets an idmapped mount (open_tree(OPEN_TREE_CLONE) + mount_setattr(MOUNT_ATTR_IDMAP)
with a user namespace holding the mapping), so a file the layer has as uid 0 reads as host uid
100000, which is uid 0 in the container. Those mounts are never attached anywhere: overlayfs
takes them as `lowerdir=/proc/self/fd/N` and keeps private clones of its own, so the overlay is
the only mount there is and unmounting it frees them; an agent that dies at any point leaves
nothing but that overlay behind. (Detached mounts as layers need a recent kernel, 6.18 here:
older ones refuse them, and the creation fails with the kernel's error.)

The upper directory cannot be idmapped (overlayfs makes its work directory with the mounter's
host-root credentials, which the mapping does not cover: EOVERFLOW), so it is a plain directory
owned by the mapped root, and what the container writes lands there as host ids start and up.
Every reader of the upper directory (diff, layer export) maps them back with `to_container`.

The system calls go through ctypes with x86_64's numbers; nothing here knows gRPC.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from berthd.common.errors import FailedPrecondition, InvalidArgument

# The kernel's overflow id (/proc/sys/kernel/overflowuid): what a host id outside the range
# reads as in the container, and what it becomes in a layer.
OVERFLOW_ID = 65534
DEFAULT_RANGE = "100000:65536"
_MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"

# x86_64 system call numbers and flags (include/uapi/linux/mount.h, fcntl.h).
SYS_OPEN_TREE = 428
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_IDMAP = 0x00100000

# security.capability: v3 carries the host uid of the namespace root it applies to.
_CAPABILITY_XATTR = "security.capability"
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000


@dataclass(frozen=True)
class IdMap:
    """Container ids 0..size-1 are host ids start..start+size-1, for uids and gids alike."""

    start: int
    size: int

    def __post_init__(self) -> None:
        if self.start < 1 or self.size < 1 or self.start + self.size - 1 > _MAX_ID:
            raise InvalidArgument(
                f"invalid user namespace range {self.start}:{self.size}: it must start above 0 "
                f"(host root stays out) and end at or below {_MAX_ID}"
            )

    @classmethod
    def parse(cls, text: str) -> IdMap:
        """An IdMap from START:SIZE, e.g. 100000:65536."""
        start, sep, size = text.partition(":")
        if not sep or not start.isdigit() or not size.isdigit():
            raise InvalidArgument(
                f"invalid user namespace range {text!r}: expected START:SIZE, e.g. {DEFAULT_RANGE}"
            )
        return cls(int(start), int(size))

    def __str__(self) -> str:
        return f"{self.start}:{self.size}"

    def to_host(self, container_id: int) -> int:
        """The host id of a container id; InvalidArgument when the range has none."""
        if not 0 <= container_id < self.size:
            raise InvalidArgument(
                f"id {container_id} is outside the remapped user namespace, which maps ids "
                f"0 to {self.size - 1} (host {self.start} to {self.start + self.size - 1})"
            )
        return self.start + container_id

    def to_container(self, host_id: int) -> int:
        """The container id of a host id; ids outside the range become the overflow id, as the
        kernel shows them in the container."""
        if self.start <= host_id < self.start + self.size:
            return host_id - self.start
        return OVERFLOW_ID

    def check(self, what: str, ids: Iterable[int]) -> None:
        """InvalidArgument naming `what` when one of the container ids is not mapped."""
        for value in ids:
            if not 0 <= value < self.size:
                raise InvalidArgument(
                    f"{what} {value} is outside the remapped user namespace, which maps ids "
                    f"0 to {self.size - 1}: use --userns host, or a node with a larger "
                    "--userns-remap-range"
                )

    @property
    def root(self) -> tuple[int, int]:
        """The host uid and gid of the container's root."""
        return self.start, self.start

    def oci(self) -> list[dict[str, int]]:
        """config.json's linux.uidMappings (and gidMappings)."""
        return [{"containerID": 0, "hostID": self.start, "size": self.size}]

    def proc_map(self) -> str:
        """A /proc/<pid>/uid_map (and gid_map) line."""
        return f"0 {self.start} {self.size}\n"

    def xattr_to_container(self, name: str, value: bytes) -> bytes:
        """An xattr read from the upper directory as a layer must carry it.

        File capabilities set by the container's root are stored in revision 3 with the host
        uid of that root (the kernel does it); in an image they must apply to any root, as
        revision 2, the form `setcap` writes on a host. Other xattrs are copied as they are.
        """
        if name != _CAPABILITY_XATTR or len(value) != 24:
            return value
        (magic,) = struct.unpack_from("<I", value)
        if magic & _VFS_CAP_REVISION_MASK != _VFS_CAP_REVISION_3:
            return value
        (rootid,) = struct.unpack_from("<I", value, 20)
        owner = self.to_container(rootid)
        if owner == 0:
            flags = magic & ~_VFS_CAP_REVISION_MASK
            return struct.pack("<I", _VFS_CAP_REVISION_2 | flags) + value[4:20]
        return value[:20] + struct.pack("<I", owner)


# --- system calls ---------------------------------------------------------------------------


class _MountAttr(ctypes.Structure):
    # struct mount_attr (MOUNT_ATTR_SIZE_VER0, 32 bytes).
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_userns_lock = threading.Lock()
_userns_fds: dict[IdMap, int] = {}


def _failed(what: str, path: str | Path = "") -> FailedPrecondition:
    err = ctypes.get_errno()
    where = f" {path}" if path else ""
    return FailedPrecondition(
        f"cannot mount the remapped container's root filesystem: {what}{where}: {os.strerror(err)}"
    )


def userns_fd(idmap: IdMap) -> int:
    """An fd of a user namespace with `idmap` as its uid and gid maps, made once per agent.

    A user namespace is made by a process: unshare(1) (util-linux) makes one and waits on its
    stdin; the agent writes the maps as host root, opens the namespace and ends the process.
    The fd keeps the namespace alive; it is close-on-exec, so no child inherits it.
    """
    with _userns_lock:
        if idmap not in _userns_fds:
            _userns_fds[idmap] = _make_userns(idmap)
        return _userns_fds[idmap]


def _make_userns(idmap: IdMap) -> int:
    own = os.readlink("/proc/self/ns/user")
    try:
        proc = subprocess.Popen(
            ["unshare", "--user", "--", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise FailedPrecondition("unshare (util-linux) is not installed") from None
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                error = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise FailedPrecondition(f"cannot make a user namespace: {error or 'no message'}")
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/user") != own:
                    break
            except FileNotFoundError:
                pass  # between fork and exec
            if time.monotonic() > deadline:
                raise FailedPrecondition("cannot make a user namespace: unshare did not start")
            time.sleep(0.001)
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{name}").write_text(idmap.proc_map())
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stderr):
            if stream is not None:
                stream.close()


def idmapped_tree(path: Path, ns_fd: int) -> int:
    """A detached clone of the mount at `path`, idmapped through the user namespace `ns_fd`;
    returns its fd (close it once overlayfs has it)."""
    # syscall(2) is variadic: every argument gets its C type, so none is passed half-set.
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPEN_TREE),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )
    if fd < 0:
        raise _failed("open_tree", path)
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=ns_fd)
    done = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if done < 0:
        error = _failed("mount_setattr(MOUNT_ATTR_IDMAP)", path)
        os.close(fd)
        raise error
    return fd


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path, idmap: IdMap) -> None:
    """Mount at `target` an overlay of idmapped `lowers` (bottom first) under the plain
    `upper`; the lowers' idmapped mounts live on only inside the overlay."""
    ns = userns_fd(idmap)
    fds: list[int] = []
    try:
        for lower in lowers:
            fds.append(idmapped_tree(lower, ns))
        # overlayfs lists lowerdirs top first; /proc/self/fd paths are short, too, so many
        # layers fit in the one page mount options may take.
        lowerdir = ":".join(f"/proc/self/fd/{fd}" for fd in reversed(fds))
        options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
        if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
            raise _failed("mount overlay", target)
    finally:
        for fd in fds:
            os.close(fd)
