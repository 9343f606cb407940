"""A new network namespace bound to a file, with its loopback up, made inside the agent.

What `unshare --net=FILE` and CNI's `loopback` plugin do, without their two execs (about 18 ms
of a start on a network, measured under load): a thread of its own unshares its network
namespace (a per-thread property on Linux), bind-mounts `/proc/thread-self/ns/net` on the
file so the namespace outlives the thread, and sets `lo` up through a socket it opens there
(a socket belongs to the namespace of the thread that made it). The thread then ends: it must
never go back to a pool in another namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

__all__ = ["new_netns"]

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# struct ifreq: the interface's name (16 bytes), then the union whose first member is the
# flags (a short), padded to 24 bytes: 40 bytes in all.
IFREQ = "16sh22x"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(IFREQ, b"lo", 0)
        _, flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def _make(path: Path) -> None:
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    source = b"/proc/thread-self/ns/net"
    _check(_libc.mount(source, os.fsencode(path), None, MS_BIND, None), f"bind mount on {path}")
    _loopback_up()


def new_netns(path: Path) -> None:
    """A new network namespace bound to `path` (created empty if absent), loopback up.
    OSError when the kernel refuses (no CAP_SYS_ADMIN, a path on a read-only mount)."""
    path.touch()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _make(path)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
