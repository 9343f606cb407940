"""The controller: keeps every service's replicas, and `always` containers, true to the spec.

Only the elected instance runs it (`berthd.cluster.election`). It keeps an in-memory view of the
families it decides on (`berthd.cluster.view`: nodes, allocations, availability, desired
containers, statuses, services; nothing else wakes it): listed once at one revision, then fed
by a watch of those prefixes from the next revision, listed again only when the watch is lost
or its revision compacted. Each change marks the services (and standalone `always` containers)
it can affect dirty; a pass decides, with the pure `reconcile`, what to do for the dirty ones
only: start, remove, move and roll; places what needs a node and writes it all in one
transaction that compares every record and allocation it read and that this instance still
holds the election key: a deposed leader's late pass is refused by etcd rather than racing the
new leader. The committed writes are applied to the view at once; a refused transaction re-reads
the keys it wrote (not the world) and the pass runs again. Decisions that wait on time alone (a
replica settling during a rolling update, the backoff of a replica its node could not create)
are looked at again by a timer for those services only (`next_check`). A pass over the whole
view runs every RESYNC_SECONDS all the same, from memory (no etcd read), as Kubernetes'
informers resync: a change the dirty rules missed is not missed for ever.

Decisions, per service:
- a replica whose node's lease expired (the node is not ready) or whose node is drained is
  moved: a new record on another node, the old one deleted in the same transaction; an agent
  that comes back then removes its stale copy (it is no longer assigned there);
- slots 1..replicas with no replica get one; replicas with a higher slot are removed;
- replicas of an older spec version are replaced `parallelism` at a time, and only while no
  newer replica is still starting: one counts once it has been running for the update's
  monitor time (plus its delay). Stop-first (Swarm's default) stops the old replica, then
  starts the new one; start-first starts the new one beside it (named SERVICE.SLOT.<short id>:
  the old one holds SERVICE.SLOT) and stops the old one once the new one serves (running, and
  healthy with a health check). One that fails pauses or rolls back the update (the failure
  action); replicas of a removed service are removed;
- the drain: a replica that serves is taken out of traffic before it is stopped (update,
  scale-down, a duplicate): its record is first marked withdrawn (`withdrawn_at`), its node
  marks its status so (every node's routing mesh drops it) and takes it out of its service's
  DNS names, and the stop waits DRAIN_SECONDS;
- a replica its node could not create (CREATE_FAILED: the node does not try again by itself) is
  tried again with backoff (RETRY_BACKOFF), by raising its record's attempt.
Standalone containers with restart policy `always` are moved off lost nodes too (not drained
ones: drain moves service replicas only). What finds no room is looked at again when a node,
its availability or an allocation changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from berthd.cluster import metrics
from berthd.cluster.assignments import backfill_assignments
from berthd.cluster.core import DRAINED, MAX_TXN_OPS, ClusterNode, ContainerView
from berthd.cluster.follow import list_families, watch_family
from berthd.cluster.rollout import (
    CONTINUE,
    PAUSE,
    ROLLBACK,
    ROLLBACK_COMPLETED,
    ROLLBACK_PAUSED,
    ROLLBACK_STARTED,
    START_FIRST,
    active_config,
    current_version,
    too_many_failures,
)
from berthd.cluster.scheduler import NodeView, Request, parse_constraints, place_replicas
from berthd.cluster.services import (
    COMPLETED,
    CONTROLLER,
    PAUSED,
    UPDATING,
    ClusterState,
    ServiceCore,
    ServiceRecord,
    commit_ops,
    service_key,
)
from berthd.cluster.view import WATCHED, ClusterView, Dirty
from berthd.common.containers import NETWORK_MODES
from berthd.common.errors import BerthError, FailedPrecondition
from berthd.common.state.containers import (
    CONTAINERS,
    RUNNING,
    DesiredContainer,
    op_put_desired,
)
from berthd.common.store import Compare, Op, RevisionCompacted, Store, WatchEvent

log = logging.getLogger("berthd.cluster.controller")

START = "start"
REMOVE = "remove"
MOVE = "move"
UPDATE = "update"
RETRY = "retry"
# A running replica its health check found unhealthy: a new one takes its slot (Swarm replaces
# unhealthy tasks; a standalone container is left running, as Docker leaves it).
REPLACE = "replace"
# Start-first: a new replica for a slot, beside its old one (which goes once the new serves).
SURGE = "surge"
# The drain's first step: the replica's record marked withdrawn, out of traffic.
WITHDRAW = "withdraw"

# Seconds between taking a replica out of traffic and stopping it: a status write and every
# node's watch and ruleset update take well under a second; what is left lets requests in
# flight on the replica finish (a new connection no longer reaches it).
DRAIN_SECONDS = 2.0

# Rollouts under way, and stopped ones (a new update or a rollback starts them again).
IN_PROGRESS = (UPDATING, ROLLBACK_STARTED)
PAUSED_STATES = (PAUSED, ROLLBACK_PAUSED)

# Seconds before a replica its node could not create is tried again, doubling per attempt.
RETRY_BACKOFF = 5.0
MAX_RETRY_BACKOFF = 300.0

# Before a pass that failed (etcd unreachable) or lost its transaction to a change the view
# cannot see (a name taken by a standalone container, the fence) is tried again.
RETRY_SECONDS = 1.0
RESYNC_SECONDS = 30.0
# Past a due time, so that the comparison it waited for (`settled`, the backoff) holds.
DUE_MARGIN_SECONDS = 0.001
# The most compares, or writes, one action adds to a pass's transaction (`commit_ops`; etcd
# bounds each apart): a start compares its record's and name's absence and its node's
# allocation, and writes the record, its assignment key, its name and the allocation; a remove
# compares the record and its node's allocation, and deletes the record, its assignment key,
# its status and its name and writes the allocation; a move or update is both, on two nodes; a
# retry compares its record and writes it and its assignment key.
ACTION_TXN_OPS = {
    START: 4,
    SURGE: 4,
    REMOVE: 5,
    MOVE: 9,
    UPDATE: 9,
    RETRY: 2,
    WITHDRAW: 2,
    REPLACE: 9,
}


@dataclass(frozen=True)
class Action:
    """One decision: start a replica for a slot, or remove, move or update a container."""

    kind: str
    service: str = ""
    slot: int = 0
    container: str = ""  # id of the container removed, moved or replaced
    reason: str = ""


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    # Service id -> (update state, message) for the services whose update state changes.
    update_states: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Service id -> the replicas failed in its rollout, when new ones failed (with an entry
    # in update_states: written together).
    failures: dict[str, list[str]] = field(default_factory=dict)
    # Service id -> (version, message): too many failures, back to the previous spec.
    rollbacks: dict[str, tuple[int, str]] = field(default_factory=dict)


def node_problem(node: ClusterNode | None, node_id: str, drained_too: bool) -> str:
    """Why a container cannot stay on its node ("" if it can)."""
    if node is None or not node.ready:
        return f"node {node_id} lost"
    if drained_too and node.availability == DRAINED:
        return f"node {node_id} drained"
    return ""


def settled(view: ContainerView, record: ServiceRecord, now: float) -> bool:
    """A replica counts as updated once it has run for the monitor time (and the delay)."""
    started = view.status.started_at if view.status else None
    if view.state != "running" or not started:
        return False
    if unhealthy(view) or (view.status and view.status.health_status == "starting"):
        return False  # with a health check, a replica counts once it is healthy
    config = active_config(record)
    return now - float(started) >= config.monitor_seconds + config.delay_seconds


def unhealthy(view: ContainerView) -> bool:
    """A replica that runs and whose health check failed `retries` times in a row."""
    return (
        view.state == "running"
        and view.status is not None
        and view.status.health_status == "unhealthy"
        and view.desired.desired == RUNNING
    )


def serving(view: ContainerView) -> bool:
    """A replica that gets traffic: running, healthy if it has a health check, not withdrawn."""
    return (
        view.state == "running"
        and view.status is not None
        and view.status.health_status in ("", "healthy")
        and not view.desired.withdrawn_at
    )


def _keep(
    group: list[ContainerView], nodes: dict[str, ClusterNode], record: ServiceRecord
) -> ContainerView:
    """Of several replicas for one slot, the one to keep: on a ready node, current, newest."""

    def rank(v: ContainerView) -> tuple[bool, bool, float]:
        node = nodes.get(v.desired.node)
        ready = node is not None and node.ready
        return (ready, current_version(record, v.desired.service_version), v.desired.scheduled_at)

    return max(group, key=rank)


def stop(view: ContainerView, action: Action, plan: Plan, now: float) -> None:
    """Plan an action that stops `view`, through the drain: a replica that serves on a network
    is first withdrawn, and the action waits DRAIN_SECONDS after that (`next_check` comes back
    then). One on no network (none, host) is stopped at once: neither the routing mesh nor
    service DNS sends it anything."""
    withdrawn = view.desired.withdrawn_at
    on_network = view.desired.config.network_mode not in NETWORK_MODES
    if not withdrawn and on_network and serving(view) and view.node_ready:
        plan.actions.append(dataclasses.replace(action, kind=WITHDRAW))
    elif not withdrawn or now - withdrawn >= DRAIN_SECONDS:
        plan.actions.append(action)


def reconcile_service(
    record: ServiceRecord,
    replicas: list[ContainerView],
    nodes: dict[str, ClusterNode],
    now: float,
    plan: Plan,
) -> None:
    by_slot: dict[int, list[ContainerView]] = {}
    for view in replicas:
        by_slot.setdefault(view.desired.slot, []).append(view)
    kept: list[ContainerView] = []
    leaving = 0  # replicas of kept slots still to go
    for slot, group in sorted(by_slot.items()):
        if not 1 <= slot <= record.replicas:
            for v in group:
                stop(v, Action(REMOVE, record.id, slot, v.id, "scaled down"), plan, now)
            continue
        keep = _keep(group, nodes, record)
        kept.append(keep)
        new = current_version(record, keep.desired.service_version)
        for v in group:
            if v is keep:
                continue
            leaving += 1
            if new and not current_version(record, v.desired.service_version):
                if not serving(keep):
                    continue  # start-first: the old replica serves until the new one does
                stop(v, Action(REMOVE, record.id, slot, v.id, "replaced"), plan, now)
            else:
                stop(v, Action(REMOVE, record.id, slot, v.id, "duplicate replica"), plan, now)
    starts = [s for s in range(1, record.replicas + 1) if s not in by_slot]
    plan.actions += [Action(START, record.id, s, reason="missing replica") for s in starts]

    staying: list[ContainerView] = []
    for view in kept:
        problem = node_problem(nodes.get(view.desired.node), view.desired.node, drained_too=True)
        if problem:
            plan.actions.append(Action(MOVE, record.id, view.desired.slot, view.id, problem))
        else:
            staying.append(view)

    current = [v for v in staying if current_version(record, v.desired.service_version)]
    outdated = [v for v in staying if not current_version(record, v.desired.service_version)]
    for view in current:
        if view.state == "create_failed" and view.desired.desired == RUNNING and view.status:
            wait = min(RETRY_BACKOFF * 2**view.desired.attempt, MAX_RETRY_BACKOFF)
            if now - view.status.updated_at >= wait:
                plan.actions.append(
                    Action(RETRY, record.id, view.desired.slot, view.id, "create failed")
                )
        elif unhealthy(view):
            plan.actions.append(Action(REPLACE, record.id, view.desired.slot, view.id, "unhealthy"))
    # A replica withdrawn but kept (a rollback or a scale-up during its drain) serves no more:
    # it is replaced once drained, whatever the update's state and budget.
    withdrawn = [v for v in staying if v.desired.withdrawn_at]
    for view in withdrawn:
        stop(view, Action(UPDATE, record.id, view.desired.slot, view.id, "withdrawn"), plan, now)
    state, message = record.update_state, record.update_message
    config = active_config(record)
    failed = [
        v
        for v in current
        if (v.state in ("exited", "create_failed") and v.desired.desired == RUNNING) or unhealthy(v)
    ]
    failures = list(record.update_failures)
    if state in IN_PROGRESS:
        fresh = [v for v in failed if v.id not in failures]
        failures += [v.id for v in fresh]
        if fresh and too_many_failures(len(failures), record.replicas, config.max_failure_ratio):
            action = config.failure_action
            if action == ROLLBACK and state == ROLLBACK_STARTED:
                action = PAUSE  # a rollback that fails stops (Swarm's)
            if action == ROLLBACK and record.previous is not None:
                plan.rollbacks[record.id] = (record.version, f"rolled back: {failure(fresh[0])}")
                return
            if action != CONTINUE:
                state = ROLLBACK_PAUSED if state == ROLLBACK_STARTED else PAUSED
                message = failure(fresh[0])
        if fresh:
            plan.failures[record.id] = failures
    if state not in PAUSED_STATES and outdated:
        if state not in IN_PROGRESS:
            state = UPDATING
        # A failure the update went on past (below the ratio, or CONTINUE) holds no slot.
        in_flight = (
            len(starts)
            + len(withdrawn)
            + sum(
                1
                for v in current
                if not settled(v, record, now) and v.id not in failures and v not in withdrawn
            )
        )
        budget = max(config.parallelism - in_flight, 0)
        waiting = [v for v in outdated if v not in withdrawn]
        for view in sorted(waiting, key=lambda v: v.desired.slot)[:budget]:
            action = Action(
                UPDATE, record.id, view.desired.slot, view.id, f"to version {record.version}"
            )
            if config.order == START_FIRST:
                # The old replica stays (and serves) until the new one does: no container.
                plan.actions.append(dataclasses.replace(action, kind=SURGE, container=""))
            else:
                stop(view, action, plan, now)
    elif (
        state in IN_PROGRESS
        and not starts
        and not leaving
        and all(settled(v, record, now) for v in current)
    ):
        if state == ROLLBACK_STARTED:
            state, message = ROLLBACK_COMPLETED, "rollback completed"  # Swarm's words
        else:
            state = COMPLETED
    if (state, message) != (record.update_state, record.update_message) or (
        record.id in plan.failures
    ):
        plan.update_states[record.id] = (state, message)


def failure(view: ContainerView) -> str:
    """Why a new replica counts as failed, for a person."""
    status = view.status
    if status is not None and status.create_failed:
        return f"replica {view.name} cannot be created: {status.failure_message}"
    if unhealthy(view):
        return f"replica {view.name} is unhealthy"
    code = status.exit_code if status else None
    return f"replica {view.name} exited with code {code}"


def reconcile(
    services: Iterable[ServiceRecord],
    containers: Iterable[ContainerView],
    nodes: dict[str, ClusterNode],
    now: float,
) -> Plan:
    """What to do so that the containers match the services: a pure function of one read."""
    plan = Plan()
    records = {s.id: s for s in services}
    replicas: dict[str, list[ContainerView]] = {sid: [] for sid in records}
    for view in containers:
        desired = view.desired
        if desired.service:
            if desired.service in replicas:
                replicas[desired.service].append(view)
            else:
                plan.actions.append(
                    Action(REMOVE, desired.service, desired.slot, view.id, "service removed")
                )
        elif desired.config.restart_policy == "always" and desired.desired == RUNNING:
            problem = node_problem(nodes.get(desired.node), desired.node, drained_too=False)
            if problem:
                plan.actions.append(Action(MOVE, container=view.id, reason=problem))
    for sid, record in sorted(records.items(), key=lambda item: item[1].name):
        reconcile_service(record, replicas[sid], nodes, now, plan)
    return plan


def split_plan(plan: Plan, budget: int) -> tuple[Plan, Dirty]:
    """The first actions of `plan` (whole actions, in order) and update states whose writes fit
    in `budget` compares and writes, and what is left for the next pass: etcd refuses a
    transaction past --max-txn-ops, so a pass that scales by hundreds writes in chunks, each
    one transaction that compares all it read."""
    taken, rest = Plan(), Dirty()
    used = 0
    for sid, update in plan.update_states.items():
        if used + 1 > budget:
            rest.services.add(sid)
            continue
        taken.update_states[sid] = update
        used += 1
    for n, action in enumerate(plan.actions):
        used += ACTION_TXN_OPS[action.kind]
        if used > budget:
            for left in plan.actions[n:]:
                if left.service:
                    rest.services.add(left.service)
                else:
                    rest.containers.add(left.container)
            break
        taken.actions.append(action)
    return taken, rest


def next_check(record: ServiceRecord, replicas: list[ContainerView], now: float) -> float | None:
    """When time alone can change what `reconcile_service` decides for this service (None:
    only a change can): a current replica settling while an update may wait on it, a replica
    its node could not create reaching the end of its backoff."""
    rolling = record.update_state in IN_PROGRESS or any(
        not current_version(record, v.desired.service_version) for v in replicas
    )
    config = active_config(record)
    times = [v.desired.withdrawn_at + DRAIN_SECONDS for v in replicas if v.desired.withdrawn_at]
    for view in replicas:
        if not current_version(record, view.desired.service_version) or view.status is None:
            continue
        started = view.status.started_at
        if rolling and view.state == "running" and started:
            times.append(float(started) + config.monitor_seconds + config.delay_seconds)
        if view.state == "create_failed" and view.desired.desired == RUNNING:
            wait = min(RETRY_BACKOFF * 2**view.desired.attempt, MAX_RETRY_BACKOFF)
            times.append(view.status.updated_at + wait)
    later = [t + DUE_MARGIN_SECONDS for t in times if t > now]
    return min(later, default=None)


# Carrying a plan out -----------------------------------------------------------------------------


@dataclass
class Changes:
    adds: list[DesiredContainer] = field(default_factory=list)
    removes: list[DesiredContainer] = field(default_factory=list)
    moved: list[tuple[DesiredContainer, str]] = field(default_factory=list)  # (new, reason)
    unplaced: list[str] = field(default_factory=list)
    # Records put back with a higher attempt: their node tries to create them again.
    retries: list[DesiredContainer] = field(default_factory=list)
    # Records put back withdrawn (the drain): their node takes them out of traffic.
    withdrawals: list[DesiredContainer] = field(default_factory=list)
    # What found no room (service ids, standalone container ids): tried again when capacity
    # may have changed.
    blocked: Dirty = field(default_factory=Dirty)


def _request(container: DesiredContainer) -> Request:
    return Request(
        cpu_millis=container.cpu_millis,
        memory_bytes=container.memory_bytes,
        constraints=parse_constraints(container.constraints),
    )


def realize(plan: Plan, state: ClusterState, now: float) -> Changes:
    """Place what the plan needs placed, on working copies of the nodes that account for every
    record removed or added before, so one pass never overbooks a node either."""
    changes = Changes()
    working = {n.id: n.view() for n in state.nodes.values()}

    def account(container: DesiredContainer, sign: int) -> None:
        view = working.get(container.node)
        if view is not None:
            view.allocated_cpu_millis += sign * container.cpu_millis
            view.allocated_memory_bytes += sign * container.memory_bytes
            view.container_count += sign

    # Actions that put a record back rather than replace it.
    puts = (RETRY, WITHDRAW)
    leaving = {a.container for a in plan.actions if a.container and a.kind not in puts}
    for action in plan.actions:
        if action.container and action.kind not in puts:
            old = state.containers[action.container]
            changes.removes.append(old)
            account(old, -1)
    # Spread each service's new replicas over the nodes holding fewest of its remaining ones.
    spread: dict[str, Counter[str]] = {}
    for sid in {a.service for a in plan.actions if a.service and a.kind not in (REMOVE, *puts)}:
        spread[sid] = Counter(
            state.containers[cid].node for cid in state.replica_ids(sid) if cid not in leaving
        )

    for action in plan.actions:
        if action.kind == RETRY:
            changes.retries.append(
                dataclasses.replace(
                    state.containers[action.container],
                    attempt=state.containers[action.container].attempt + 1,
                    changed_by=CONTROLLER,
                )
            )
            continue
        if action.kind == WITHDRAW:
            changes.withdrawals.append(
                dataclasses.replace(
                    state.containers[action.container], withdrawn_at=now, changed_by=CONTROLLER
                )
            )
            continue
        if action.kind == REMOVE:
            continue
        old = state.containers.get(action.container)
        if action.kind == MOVE:
            assert old is not None
            # The admission stamp moves with it; the actor is the controller.
            new = dataclasses.replace(
                old,
                id=secrets.token_hex(32),
                previous_node=old.node,
                scheduled_at=now,
                changed_by=CONTROLLER,
            )
        else:
            new = state.services[action.service].replica(
                action.slot, node="", beside=action.kind == SURGE
            )
            new.scheduled_at = now
        try:
            node = _place(working.values(), _request(new), spread.get(new.service))
        except FailedPrecondition as exc:
            metrics.PLACEMENTS.labels("unschedulable").inc()
            changes.unplaced.append(f"{new.name}: {exc}")
            if action.service:
                changes.blocked.services.add(action.service)
            else:
                changes.blocked.containers.add(action.container)
            if old is not None:
                # Keep the old record rather than lose the container with nowhere to go.
                changes.removes.remove(old)
                account(old, 1)
            continue
        new.node = node.id
        account(new, 1)
        if new.service:
            spread.setdefault(new.service, Counter())[node.id] += 1
        changes.adds.append(new)
        if action.kind == MOVE:
            changes.moved.append((new, action.reason))
    return changes


def _place(nodes: Iterable[NodeView], request: Request, existing: Counter[str] | None) -> NodeView:
    return place_replicas(nodes, request, 1, existing)[0]


class Controller:
    def __init__(self, store: Store, fence: Compare | None = None) -> None:
        self.store = store
        # Compare that holds only while this instance leads (the election key is ours).
        self.fence = fence
        self.view = ClusterView()
        # Service id -> when time alone may change its decisions (`next_check`).
        self._due: dict[str, float] = {}
        # (when, what): passes to try again, after a failure or a conflict the view cannot see.
        self._later: list[tuple[float, int, Dirty]] = []
        self._next_resync = time.time() + RESYNC_SECONDS
        self._later_seq = 0

    async def run(self) -> None:
        """List, watch and reconcile until cancelled; list again after a lost watch or a
        compaction."""
        ready = False
        while True:
            try:
                if not ready:
                    # Once per term: records written before the per-node index get their keys.
                    await backfill_assignments(self.store, self.fence)
                    ready = True
                await self._follow()
            except RevisionCompacted as exc:
                log.info("controller view compacted away, listing again: %s", exc)
            except BerthError as exc:
                log.warning("controller watch failed: %s", exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def load(self) -> int:
        """List every watched family at one revision into the view (all of it dirty); that
        revision."""
        entries, revision = await list_families(self.store, WATCHED)
        self.view.load(entries)
        self._due.clear()
        self._later.clear()
        metrics.CONTROLLER_LISTINGS.inc()
        return revision

    async def _follow(self) -> None:
        revision = await self.load()
        queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        watchers = [
            asyncio.create_task(watch_family(self.store, prefix, revision + 1, queue))
            for prefix in WATCHED
        ]
        try:
            while True:
                try:
                    await self.reconcile_once()
                except BerthError as exc:
                    log.warning("reconcile pass failed: %s", exc)
                except Exception:  # a bad record must not end the controller: next pass
                    log.exception("reconcile pass failed")
                await self._next(queue)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _next(self, queue: asyncio.Queue[WatchEvent | BaseException]) -> None:
        """Wait for a change or for the next due time; apply every change that arrived."""
        timeout = None
        if self.view.dirty:
            timeout = 0.0
        else:
            times = [*self._due.values(), *(t for t, _, _ in self._later[:1])]
            timeout = max(min([*times, self._next_resync]) - time.time(), 0.0)
        try:
            # Not wait_for: Python 3.11's drops a cancellation that arrives with an item.
            async with asyncio.timeout(timeout):
                item = await queue.get()
        except TimeoutError:
            return
        # The rest of a transaction's events arrive with it: take them in the same pass.
        await asyncio.sleep(0)
        while True:
            if isinstance(item, BaseException):
                raise item
            self.view.apply(item)
            if queue.empty():
                return
            item = queue.get_nowait()

    def _take_due(self, now: float) -> Dirty:
        if now >= self._next_resync:
            self.view.mark_all_dirty()
            self._next_resync = now + RESYNC_SECONDS
        dirty = self.view.take_dirty()
        for sid, when in list(self._due.items()):
            if when <= now:
                dirty.services.add(sid)
                del self._due[sid]
        while self._later and self._later[0][0] <= now:
            dirty.update(heapq.heappop(self._later)[2])
        return dirty

    def _retry_later(self, dirty: Dirty, now: float) -> None:
        self._later_seq += 1
        heapq.heappush(self._later, (now + RETRY_SECONDS, self._later_seq, dirty))

    async def reconcile_once(self) -> bool:
        """One pass over what is dirty (everything, the first time); True when something was
        written."""
        if not self.view.loaded:
            await self.load()
        now = time.time()
        dirty = self._take_due(now)
        if not dirty:
            return False
        metrics.CONTROLLER_PASSES.inc()
        try:
            return await self._reconcile(dirty, now)
        except BaseException:
            self._retry_later(dirty, now)
            raise

    async def _reconcile(self, dirty: Dirty, now: float) -> bool:
        view = self.view
        metrics.NODES.labels("ready").set(len(view.registered))
        metrics.NODES.labels("not_ready").set(len(view.nodes) - len(view.registered))
        records = [view.services[sid] for sid in dirty.services if sid in view.services]
        containers = view.views(dirty)
        plan = reconcile(records, containers, view.nodes, now)
        replicas: dict[str, list[ContainerView]] = {}
        for v in containers:
            replicas.setdefault(v.desired.service, []).append(v)
        for sid in dirty.services:
            record = view.services.get(sid)
            when = next_check(record, replicas.get(sid, []), now) if record else None
            if when is None:
                self._due.pop(sid, None)
            else:
                self._due[sid] = when
        view.blocked.services -= dirty.services
        view.blocked.containers -= dirty.containers
        rolled = await self._roll_back(plan.rollbacks)
        if not plan.actions and not plan.update_states:
            return rolled
        plan, deferred = split_plan(plan, MAX_TXN_OPS - (self.fence is not None))
        started = time.monotonic()
        state = view.state()
        changes = realize(plan, state, now)
        view.blocked.update(changes.blocked)
        # The next pass goes on with the rest (at once: the view is dirty), unless this one
        # found no room for that service: the rest would not fit either.
        deferred.services -= changes.blocked.services
        deferred.containers -= changes.blocked.containers
        for reason in changes.unplaced:
            log.warning("cannot place replica: %s", reason)
        compares = [self.fence] if self.fence is not None else []
        ops: list[Op] = []
        for sid, (update_state, message) in plan.update_states.items():
            record = dataclasses.replace(
                state.services[sid],
                update_state=update_state,
                update_message=message,
                changed_by=CONTROLLER,
            )
            record.update_failures = plan.failures.get(sid, record.update_failures)
            compares.append(self.store.unchanged(service_key(sid), state.revisions[sid]))
            ops.append(self.store.op_put(service_key(sid), record.to_json()))
        for put in [*changes.retries, *changes.withdrawals]:
            compares.append(CONTAINERS.unchanged(self.store, put.id, state.revisions[put.id]))
            ops += op_put_desired(self.store, put, state.containers.get(put.id))
        if not (changes.adds or changes.removes or ops):
            view.dirty.update(deferred)
            return False
        checks, writes = commit_ops(self.store, state, changes.adds, changes.removes, compares, ops)
        ok, revision = await self.store.txn_at(checks, writes)
        if changes.adds:
            metrics.SCHEDULING_SECONDS.observe(time.monotonic() - started)
            metrics.PLACEMENTS.labels("placed" if ok else "conflict").inc(len(changes.adds))
        if not ok:
            await self._refresh(writes, dirty, now)
            return False
        for op in writes:
            view.apply_write(*self.store.written(op), revision)
        view.dirty.update(deferred)
        for new, reason in changes.moved:
            kind = "node_drained" if reason.endswith("drained") else "node_lost"
            metrics.RESCHEDULES.labels(kind).inc()
            log.info(
                "rescheduled",
                extra={"container": new.name, "node": new.node, "reason": reason},
            )
        return True

    async def _roll_back(self, rollbacks: dict[str, tuple[int, str]]) -> bool:
        """Swap in the previous spec of each service whose rollout failed too often. Through
        the service core, as a user's rollback (its ports and secrets checked and claimed),
        bound to the version the decision saw: a change since wins, and the watch brings the
        new record back to the next pass."""
        core = ServiceCore(self.store)
        done = False
        for sid, (version, message) in rollbacks.items():
            try:
                await core.rollback(sid, message, expected_version=version, actor=CONTROLLER)
                done = True
            except BerthError as exc:
                log.warning("automatic rollback of %s failed: %s", sid, exc)
                self._retry_later(Dirty(services={sid}), time.time())
        return done

    async def _refresh(self, writes: list[Op], dirty: Dirty, now: float) -> None:
        """After a refused transaction: read again the keys it would have written (not the
        world). When that changed the view, the pass runs again at once; otherwise what refused
        it is outside the view (a name in use, the fence) and it is tried again later."""
        metrics.CONTROLLER_CONFLICTS.inc()
        # Name claims are not in the view: a taken one is a conflict the view cannot see.
        keys = sorted({k for k, _ in map(self.store.written, writes) if k.startswith(WATCHED)})
        reads = await asyncio.gather(*(self.store.get_at(key) for key in keys))
        changed = [self.view.apply_read(k, e, rev) for k, (e, rev) in zip(keys, reads, strict=True)]
        if any(changed):
            self.view.dirty.update(dirty)
        else:
            self._retry_later(dirty, now)
