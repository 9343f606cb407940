"""The node's converger stops when it is told to, even when a change wakes it at that moment.

Python 3.11's `asyncio.wait_for` returns the inner result and drops a cancellation that
arrives in the same turn as the inner wait completes (fixed in 3.12): a reconcile loop waiting
with it on its wake event ran on after `stop()` cancelled it, and `stop()` (and the agent's
shutdown, and a resynchronization) waited forever. Seen as a hang in
test_watch_compaction.py, about one run in eight.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from berthd.node.converge import Converger


async def test_a_wake_at_the_moment_of_cancellation_does_not_keep_the_loop_running() -> None:
    manager: Any = SimpleNamespace(records={})
    converger = Converger(None, "n1", manager, None)  # type: ignore[arg-type]
    loop_task = asyncio.create_task(converger._reconcile_loop())
    for _ in range(5):  # into its wait for a wake
        await asyncio.sleep(0)
    # A change and a stop in the same turn: the wake completes the inner wait first.
    converger._wake.set()
    loop_task.cancel()
    done, _ = await asyncio.wait([loop_task], timeout=5)
    assert loop_task in done and loop_task.cancelled()
