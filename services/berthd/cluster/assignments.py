"""Backfill of the per-node assignment index (`cluster/assignments/<node>/<id>`).

Every write of a desired record writes its node's assignment key in the same transaction
(berthd.common.state.containers), so node agents watch only their own keys. Records written
before the index existed have none: the leader, when it takes office, writes the missing keys
(and deletes ones naming a record that is gone or on another node) and then the marker
`cluster/assignments-ready`. Agents follow the whole `cluster/containers/` family until the
marker exists, so an upgraded cluster never has an agent that misses its records.

Every batch compares each record's revision and the leader's fence: a record changed meanwhile
was written by an instance that keeps the index itself, and a scan that lost a race is run again.
"""

from __future__ import annotations

import logging
import time

from berthd.cluster.follow import list_families
from berthd.common.errors import Aborted
from berthd.common.state.containers import (
    ASSIGNMENTS,
    ASSIGNMENTS_READY,
    CONTAINERS,
    assignment_key,
)
from berthd.common.store import Compare, Op, Store, encode

log = logging.getLogger("berthd.cluster.assignments")

# Record compares and key writes per transaction, well under etcd's --max-txn-ops (128).
BATCH = 50
ATTEMPTS = 5


async def backfill_assignments(store: Store, fence: Compare | None = None) -> int:
    """Make the index whole and set the ready marker, unless it is set already; the number of
    keys written or deleted. Aborted when records keep changing under the scan."""
    if await store.get(ASSIGNMENTS_READY) is not None:
        return 0
    fixed = 0
    for _ in range(ATTEMPTS):
        done, count = await _pass(store, fence)
        fixed += count
        if done:
            guards = [fence] if fence is not None else []
            marker = store.op_put(ASSIGNMENTS_READY, encode({"written_at": time.time()}))
            ok, _ = await store.txn(guards, [marker])
            if ok:
                log.info("assignment index ready (%d keys written or deleted)", fixed)
                return fixed
    raise Aborted("the assignment index could not be completed: records kept changing")


async def _pass(store: Store, fence: Compare | None) -> tuple[bool, int]:
    """One scan of the records and the index, read at one revision: every missing key written
    and every stray one deleted, in batches; True when every batch committed (nothing changed
    under it), and the number of keys the committed batches wrote or deleted."""
    entries, _ = await list_families(store, (ASSIGNMENTS, CONTAINERS.prefix))
    present = {e.key: e for e in entries if e.key.startswith(ASSIGNMENTS)}
    wanted = {
        assignment_key(v.record.node, v.id): v
        for v in filter(None, map(CONTAINERS.versioned, entries))
        if v.record.node and "/" not in v.record.node
    }
    work: list[tuple[list[Compare], Op]] = []
    for key, found in wanted.items():
        if key not in present:
            compares = [CONTAINERS.unchanged(store, found.id, found.mod_revision)]
            work.append((compares, store.op_put(key, b"")))
    for key, entry in present.items():
        if key not in wanted:
            work.append(([store.unchanged(key, entry.mod_revision)], store.op_delete(key)))
    complete, count = True, 0
    for start in range(0, len(work), BATCH):
        batch = work[start : start + BATCH]
        compares = [c for cs, _ in batch for c in cs]
        if fence is not None:
            compares.append(fence)
        ok, _ = await store.txn(compares, [op for _, op in batch])
        complete = complete and bool(ok)
        count += len(batch) if ok else 0
    return complete, count
