"""Learning of container exits without polling: a pidfd per running container's conmon.

conmon writes the container's exit code to its exit file and then exits itself, so the moment
its conmon is gone is the moment a container's exit can be read. A pidfd (pidfd_open(2), Linux
5.3) becomes readable when its process exits, also for a process that is not our child (conmon
is re-parented to PID 1) and also while it is a zombie nobody reaped; the event loop watches
every pidfd with epoll (`add_reader`), so a node with no exits does no work at all.

Why a pidfd and not inotify on the exit files: each container has its own exit directory
(`<data>/containers/<id>/exit`, kept by adoption across agent versions), so inotify would need
a watch per container too, and it would never hear of a conmon that died without writing the
file (SIGKILL); a pidfd does, and needs no library and no ctypes. The cost is one file
descriptor per running container (the node's systemd unit allows 1048576).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger("berthd.node.exits")


def open_conmon(conmon_pid: Callable[[], int | None]) -> int | None:
    """A pidfd of a container's live conmon, or None when it is gone.

    `conmon_pid` reads the pid file and checks that the process is a conmon that has not
    exited; it is asked again once the pidfd is open, so a pid reused between the first look
    and pidfd_open is never watched in conmon's place.
    """
    pid = conmon_pid()
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if conmon_pid() != pid:
        os.close(pidfd)
        return None
    return pidfd


class ExitWatcher:
    """One pidfd per watched container, each registered with the running event loop.

    `on_exit(container_id)` is called (in the loop, once) when that container's conmon exits;
    the watch is gone by then. Errors opening a pidfd (EMFILE) are logged and reported as
    "not watched": the caller's safety sweep covers such a container.
    """

    def __init__(self, on_exit: Callable[[str], None]) -> None:
        self._on_exit = on_exit
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._fds)

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._fds

    def watch(self, container_id: str, conmon_pid: Callable[[], int | None]) -> bool:
        """Watch the container's conmon; False when it is already gone or cannot be watched
        (the caller then looks at the exit file itself)."""
        self.unwatch(container_id)
        try:
            pidfd = open_conmon(conmon_pid)
        except OSError as exc:
            log.warning(
                "cannot watch conmon: %s", exc.strerror or exc, extra={"container": container_id}
            )
            return False
        if pidfd is None:
            return False
        self._fds[container_id] = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._fired, container_id)
        return True

    def unwatch(self, container_id: str) -> None:
        pidfd = self._fds.pop(container_id, None)
        if pidfd is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)

    def close(self) -> None:
        for container_id in list(self._fds):
            self.unwatch(container_id)

    def _fired(self, container_id: str) -> None:
        # A pidfd stays readable once its process has exited: stop watching before anything.
        self.unwatch(container_id)
        self._on_exit(container_id)
