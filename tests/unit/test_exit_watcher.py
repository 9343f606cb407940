"""berthd.node.exits: a pidfd per watched process, one event per exit, no polling."""

from __future__ import annotations

import asyncio
import os
import subprocess

from berthd.node.exits import ExitWatcher


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_exit_is_reported_once_and_its_pidfd_closed() -> None:
    exits: asyncio.Queue[str] = asyncio.Queue()
    watcher = ExitWatcher(exits.put_nowait)
    sleepers = [subprocess.Popen(["sleep", "1000"]) for _ in range(2)]
    try:
        opened = fd_count()
        for number, proc in enumerate(sleepers):
            assert watcher.watch(f"c{number}", lambda pid=proc.pid: pid)
        assert len(watcher) == 2 and "c1" in watcher
        assert fd_count() == opened + 2  # one pidfd per watched process
        sleepers[1].kill()
        # The guard bounds a hang; the event itself is what is awaited.
        assert await asyncio.wait_for(exits.get(), 30) == "c1"
        assert "c1" not in watcher and len(watcher) == 1 and fd_count() == opened + 1
        watcher.close()
        assert len(watcher) == 0 and fd_count() == opened
        sleepers[0].kill()
        sleepers[0].wait()
        await asyncio.sleep(0)  # a closed watch reports nothing
        assert exits.empty()
    finally:
        watcher.close()
        for proc in sleepers:
            proc.kill()
            proc.wait()


async def test_a_process_already_gone_or_replaced_is_not_watched() -> None:
    watcher = ExitWatcher(lambda _: None)
    gone = subprocess.Popen(["true"])
    gone.wait()
    opened = fd_count()
    assert not watcher.watch("gone", lambda: gone.pid)  # reaped: no such process
    assert not watcher.watch("none", lambda: None)  # no live conmon at all
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        # The pid file names another process by the time the pidfd is open: not watched.
        answers = iter([sleeper.pid, None])
        assert not watcher.watch("replaced", lambda: next(answers))
        assert len(watcher) == 0 and fd_count() == opened
    finally:
        sleeper.kill()
        sleeper.wait()
