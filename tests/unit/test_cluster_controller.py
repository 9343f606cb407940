"""Pure logic of the controller (reconcile decisions, placing them), the election's timing rules
and the event tracker: functions of (services, desired containers, nodes), no etcd."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from berthd.cluster.controller import (
    ACTION_TXN_OPS,
    MOVE,
    REMOVE,
    RETRY,
    START,
    UPDATE,
    WITHDRAW,
    Action,
    Plan,
    realize,
    reconcile,
    split_plan,
)
from berthd.cluster.core import DRAINED, ClusterNode, ContainerView
from berthd.cluster.election import keepalive_interval, lease_lost
from berthd.cluster.events import (
    CONTAINER_CREATE_FAILED,
    CONTAINER_DIED,
    CONTAINER_RESCHEDULED,
    CONTAINER_SCHEDULED,
    CONTAINER_STARTED,
    NODE_AVAILABILITY_CHANGED,
    NODE_DRAIN_COMPLETED,
    NODE_JOINED,
    NODE_LOST,
    SERVICE_CREATED,
    SERVICE_REMOVED,
    SERVICE_SCALED,
    SERVICE_UPDATE_COMPLETED,
    SERVICE_UPDATE_PAUSED,
    SERVICE_UPDATE_STARTED,
    EventFilter,
    EventTracker,
)
from berthd.cluster.services import (
    COMPLETED,
    PAUSED,
    UPDATING,
    ClusterState,
    ServiceRecord,
    validate,
)
from berthd.common.containers import ContainerConfig
from berthd.common.errors import InvalidArgument
from berthd.common.state.containers import ContainerStatus, DesiredContainer
from berthd.common.state.nodes import NodeRecord
from berthd.common.store import Entry, WatchEvent

NOW = 1000.0
GiB = 1 << 30


def service(replicas: int = 3, version: int = 1, **kw) -> ServiceRecord:
    # On a network: the routing mesh and service DNS reach its replicas, so stops drain them.
    network = kw.pop("network_mode", "front")
    template = ContainerConfig(image="busybox", restart_policy="always", network_mode=network)
    return ServiceRecord(
        id="s" * 64, name="web", template=template, replicas=replicas, version=version,
        monitor_seconds=kw.pop("monitor_seconds", 1.0), **kw,
    )  # fmt: skip


def replica(
    slot: int,
    node: str,
    version: int = 1,
    state: str = "running",
    started: float = 0.0,
    network_mode: str = "front",
) -> ContainerView:
    record = service(network_mode=network_mode).replica(slot, node)
    record.service_version = version
    status = ContainerStatus(state=state, started_at=started, exit_code=3) if state else None
    return ContainerView(record, status)


def nodes(*ready: str, lost: tuple[str, ...] = (), drained: tuple[str, ...] = ()) -> dict:
    found = {}
    for node_id in (*ready, *lost):
        found[node_id] = ClusterNode(
            id=node_id,
            record=NodeRecord(node_id, cpus=4, memory_bytes=4 * GiB),
            ready=node_id not in lost,
            availability=DRAINED if node_id in drained else "active",
        )
    return found


def kinds(plan: Plan) -> list[tuple[str, int]]:
    return sorted((a.kind, a.slot) for a in plan.actions)


def test_a_new_service_starts_every_slot() -> None:
    plan = reconcile([service(3)], [], nodes("a", "b", "c"), NOW)
    assert kinds(plan) == [(START, 1), (START, 2), (START, 3)]
    assert plan.update_states == {}


def test_a_true_service_needs_nothing() -> None:
    replicas = [replica(1, "a"), replica(2, "b"), replica(3, "c")]
    plan = reconcile([service(3)], replicas, nodes("a", "b", "c"), NOW)
    assert plan.actions == [] and plan.update_states == {}


def test_replicas_on_a_lost_or_drained_node_move() -> None:
    replicas = [replica(1, "a"), replica(2, "b"), replica(3, "c")]
    plan = reconcile([service(3)], replicas, nodes("a", "c", lost=("b",), drained=("c",)), NOW)
    assert kinds(plan) == [(MOVE, 2), (MOVE, 3)]
    assert {a.reason for a in plan.actions} == {"node b lost", "node c drained"}


def test_scaling_down_removes_the_highest_slots_and_up_fills_gaps() -> None:
    replicas = [replica(s, "a") for s in (1, 2, 4, 5)]
    # The drain: out of traffic first, removed once DRAIN_SECONDS have passed.
    assert kinds(reconcile([service(2)], replicas, nodes("a"), NOW)) == [
        (WITHDRAW, 4),
        (WITHDRAW, 5),
    ]
    replicas[2].desired.withdrawn_at = replicas[3].desired.withdrawn_at = NOW - 1
    assert kinds(reconcile([service(2)], replicas, nodes("a"), NOW)) == []
    replicas[2].desired.withdrawn_at = replicas[3].desired.withdrawn_at = NOW - 2
    assert kinds(reconcile([service(2)], replicas, nodes("a"), NOW)) == [(REMOVE, 4), (REMOVE, 5)]
    assert kinds(reconcile([service(5)], replicas[:2], nodes("a"), NOW)) == [
        (START, 3),
        (START, 4),
        (START, 5),
    ]


def test_duplicate_slot_keeps_the_replica_on_a_ready_node() -> None:
    stale, fresh = replica(1, "b"), replica(1, "a")
    stale.node_ready = False  # nothing to drain: no node reports it
    plan = reconcile([service(1)], [fresh, stale], nodes("a", lost=("b",)), NOW)
    assert [(a.kind, a.container) for a in plan.actions] == [(REMOVE, stale.id)]


def test_replicas_of_a_removed_service_are_removed() -> None:
    plan = reconcile([], [replica(1, "a")], nodes("a"), NOW)
    assert [(a.kind, a.reason) for a in plan.actions] == [(REMOVE, "service removed")]


def test_standalone_always_containers_move_off_lost_nodes_only() -> None:
    def standalone(cid: str, policy: str, node: str) -> ContainerView:
        config = ContainerConfig(image="busybox", name=cid, restart_policy=policy)
        return ContainerView(DesiredContainer(id=cid, name=cid, node=node, config=config))

    views = [
        standalone("x", "always", "b"),
        standalone("y", "no", "b"),
        standalone("z", "always", "c"),
    ]
    plan = reconcile([], views, nodes("a", "c", lost=("b",), drained=("c",)), NOW)
    assert [(a.kind, a.container) for a in plan.actions] == [(MOVE, "x")]


def test_rolling_update_replaces_one_at_a_time_after_each_settles() -> None:
    old = [replica(s, n) for s, n in ((1, "a"), (2, "b"), (3, "c"))]
    record = service(3, version=2, update_state=UPDATING)
    first = reconcile([record], old, nodes("a", "b", "c"), NOW)
    assert kinds(first) == [(WITHDRAW, 1)] and first.update_states == {}
    old[0].desired.withdrawn_at = NOW - 2
    assert kinds(reconcile([record], old, nodes("a", "b", "c"), NOW)) == [(UPDATE, 1)]
    old[0].desired.withdrawn_at = 0
    # The new replica for slot 1 has not run for the monitor time yet: nothing more.
    starting = [replica(1, "a", version=2, started=NOW - 0.5), *old[1:]]
    assert reconcile([record], starting, nodes("a", "b", "c"), NOW).actions == []
    pending = [replica(1, "a", version=2, state=""), *old[1:]]
    assert reconcile([record], pending, nodes("a", "b", "c"), NOW).actions == []
    running = [replica(1, "a", version=2, started=NOW - 2), *old[1:]]
    assert kinds(reconcile([record], running, nodes("a", "b", "c"), NOW)) == [(WITHDRAW, 2)]


def test_rolling_update_parallelism_and_completion() -> None:
    old = [replica(s, "a") for s in (1, 2, 3)]
    record = service(3, version=2, parallelism=2, update_state=UPDATING)
    assert kinds(reconcile([record], old, nodes("a"), NOW)) == [(WITHDRAW, 1), (WITHDRAW, 2)]
    done = [replica(s, "a", version=2, started=NOW - 5) for s in (1, 2, 3)]
    plan = reconcile([record], done, nodes("a"), NOW)
    assert plan.actions == [] and plan.update_states == {record.id: (COMPLETED, "")}


def test_a_new_replica_that_exits_pauses_the_update() -> None:
    views = [replica(1, "a", version=2, state="exited"), replica(2, "a"), replica(3, "a")]
    record = service(3, version=2, update_state=UPDATING)
    plan = reconcile([record], views, nodes("a"), NOW)
    assert plan.actions == []
    assert plan.update_states[record.id][0] == PAUSED
    assert "exited with code 3" in plan.update_states[record.id][1]


def failed_replica(slot: int, node: str, version: int = 1, attempt: int = 0, age: float = 0):
    view = replica(slot, node, version=version, state="")
    view.desired.attempt = attempt
    view.status = ContainerStatus(
        node=node, state="create_failed", failure_reason="IMAGE_NOT_FOUND",
        failure_message="no such image", attempt=attempt, updated_at=NOW - age,
    )  # fmt: skip
    return view


def test_a_replica_its_node_cannot_create_is_retried_with_backoff() -> None:
    record = service(1)
    assert kinds(reconcile([record], [failed_replica(1, "a", age=1)], nodes("a"), NOW)) == []
    plan = reconcile([record], [failed_replica(1, "a", age=6)], nodes("a"), NOW)
    assert kinds(plan) == [(RETRY, 1)]
    # The backoff doubles with each attempt.
    assert (
        kinds(reconcile([record], [failed_replica(1, "a", attempt=2, age=6)], nodes("a"), NOW))
        == []
    )
    assert kinds(
        reconcile([record], [failed_replica(1, "a", attempt=2, age=21)], nodes("a"), NOW)
    ) == [(RETRY, 1)]
    views = [failed_replica(1, "a", age=6)]
    plan = reconcile([record], views, nodes("a"), NOW)
    changes = realize(plan, state_of([record], views, nodes("a")), NOW)
    assert [(c.id, c.attempt) for c in changes.retries] == [(views[0].id, 1)]
    assert changes.adds == [] and changes.removes == []


def test_a_new_replica_its_node_cannot_create_pauses_the_update() -> None:
    views = [failed_replica(1, "a", version=2), replica(2, "a"), replica(3, "a")]
    record = service(3, version=2, update_state=UPDATING)
    plan = reconcile([record], views, nodes("a"), NOW)
    assert plan.update_states[record.id] == (
        PAUSED, "replica web.1 cannot be created: no such image"
    )  # fmt: skip


def test_event_tracker_reports_create_failures_services_and_drains() -> None:
    tracker = EventTracker()
    tracker.load([])
    record = service().replica(1, "a")
    tracker.feed(WatchEvent("put", f"cluster/containers/{record.id}", record.encode()))
    failed = {"node": "a", "name": "web.1", "state": "create_failed", "attempt": 0,
              "failure_reason": "IMAGE_NOT_FOUND", "failure_message": "no such image"}  # fmt: skip
    (event,) = tracker.feed(put(f"containers/{record.id}/status", failed))
    assert (event.type, event.failure_reason, event.container_name) == (
        CONTAINER_CREATE_FAILED, "IMAGE_NOT_FOUND", "web.1",
    )  # fmt: skip
    assert tracker.feed(put(f"containers/{record.id}/status", failed)) == []  # the same report
    again = {**failed, "attempt": 1}  # tried again (StartContainer), failed again
    assert [e.type for e in tracker.feed(put(f"containers/{record.id}/status", again))] == [
        CONTAINER_CREATE_FAILED
    ]
    # Drain: the availability changes, and once the node holds no replica the drain is done.
    (event,) = tracker.feed(put("cluster/availability/a", {"availability": "drained"}))
    assert (event.type, event.availability) == (NODE_AVAILABILITY_CHANGED, "drained")
    (event,) = tracker.feed(WatchEvent("delete", f"cluster/containers/{record.id}", b""))
    assert (event.type, event.node_id) == (NODE_DRAIN_COMPLETED, "a")
    # A service's life: created, update started, paused, completed (with the version), removed.
    key = f"cluster/services/{'s' * 64}"
    assert [e.type for e in tracker.feed(put(key, json.loads(service().to_json())))] == [
        SERVICE_CREATED
    ]
    updating = service(version=2, update_state=UPDATING)
    (event,) = tracker.feed(WatchEvent("put", key, updating.to_json()))
    assert (event.type, event.version) == (SERVICE_UPDATE_STARTED, 2)
    paused = service(version=2, update_state=PAUSED, update_message="replica web.1 exited")
    (event,) = tracker.feed(WatchEvent("put", key, paused.to_json()))
    assert (event.type, event.version) == (SERVICE_UPDATE_PAUSED, 2)
    done = service(version=3, update_state=COMPLETED)
    assert [e.type for e in tracker.feed(WatchEvent("put", key, done.to_json()))] == [
        SERVICE_UPDATE_STARTED, SERVICE_UPDATE_COMPLETED,
    ]  # fmt: skip
    (event,) = tracker.feed(WatchEvent("delete", key, b""))
    assert (event.type, event.service_name, event.version) == (SERVICE_REMOVED, "web", 3)
    assert EventFilter(service="web").matches(event, tracker)


def state_of(records: list[ServiceRecord], views: list[ContainerView], found: dict) -> ClusterState:
    containers = {v.id: v.desired for v in views}
    return ClusterState(
        nodes=found,
        containers=containers,
        revisions={cid: 1 for cid in containers},
        statuses={},
        services={r.id: r for r in records},
        allocations={},
    )


def test_realize_spreads_new_replicas_and_moves_to_ready_nodes() -> None:
    record = service(3)
    found = nodes("a", "b", "c", lost=("d",))
    views = [replica(1, "a"), replica(2, "d")]
    state = state_of([record], views, found)
    for view in views:  # what build_nodes counts from the records
        found[view.desired.node].container_count += 1
    changes = realize(reconcile([record], views, found, NOW), state, NOW)
    placed = Counter(c.node for c in changes.adds)
    # Slot 2 leaves d; slot 3 is new: they go to b and c, not next to slot 1 on a.
    assert placed == {"b": 1, "c": 1}
    moved = [new for new, _ in changes.moved]
    assert [(m.slot, m.previous_node, m.name) for m in moved] == [(2, "d", "web.2")]
    assert [c.node for c in changes.removes] == ["d"]


def test_realize_keeps_a_container_that_has_nowhere_to_go() -> None:
    record = service(1, memory_bytes=8 * GiB)  # fits no node
    views = [replica(1, "b")]
    views[0].desired.memory_bytes = 8 * GiB
    found = nodes("a", lost=("b",))
    changes = realize(reconcile([record], views, found, NOW), state_of([record], views, found), NOW)
    assert changes.adds == [] and changes.removes == []
    assert "insufficient memory" in changes.unplaced[0]


def test_election_timing() -> None:
    assert keepalive_interval(3) == 1.0
    assert not lease_lost(last_refresh=10.0, now=12.0, ttl=3)
    assert lease_lost(last_refresh=10.0, now=12.5, ttl=3)


def put(key: str, value: object) -> WatchEvent:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return WatchEvent("put", key, raw)


def test_event_tracker_derives_docker_style_events() -> None:
    tracker = EventTracker()
    tracker.load([])
    assert [e.type for e in tracker.feed(put("nodes/a", {"id": "a"}))] == [NODE_JOINED]
    assert tracker.feed(put("nodes/a", {"id": "a"})) == []  # re-registration of a known node
    record = service().replica(1, "a")
    (scheduled,) = tracker.feed(
        WatchEvent("put", f"cluster/containers/{record.id}", record.encode())
    )
    assert (scheduled.type, scheduled.node_id, scheduled.service_id) == (
        CONTAINER_SCHEDULED, "a", "s" * 64,
    )  # fmt: skip
    status = {"node": "a", "name": "web.1", "state": "running", "started_at": 5.0}
    assert [e.type for e in tracker.feed(put(f"containers/{record.id}/status", status))] == [
        CONTAINER_STARTED
    ]
    assert tracker.feed(put(f"containers/{record.id}/status", status)) == []
    died = {**status, "state": "exited", "exit_code": 137}
    (event,) = tracker.feed(put(f"containers/{record.id}/status", died))
    assert (event.type, event.exit_code) == (CONTAINER_DIED, 137)
    moved = service().replica(1, "b")
    moved.previous_node = "a"
    (event,) = tracker.feed(WatchEvent("put", f"cluster/containers/{moved.id}", moved.encode()))
    assert (event.type, event.node_id, event.previous_node_id) == (CONTAINER_RESCHEDULED, "b", "a")
    assert [e.type for e in tracker.feed(WatchEvent("delete", "nodes/a", b""))] == [NODE_LOST]
    created = service(3)
    (event,) = tracker.feed(WatchEvent("put", f"cluster/services/{created.id}", created.to_json()))
    assert (event.type, event.service_name, event.version) == (SERVICE_CREATED, "web", 1)
    scaled = service(5)
    (event,) = tracker.feed(WatchEvent("put", f"cluster/services/{scaled.id}", scaled.to_json()))
    assert (event.type, event.replicas) == (SERVICE_SCALED, 5)
    assert EventFilter(service="web").matches(event, tracker)
    assert not EventFilter(service="db").matches(event, tracker)
    assert EventFilter(types={SERVICE_SCALED}).matches(event, tracker)
    assert tracker.feed(put("registry/tags/x/y", {})) == []


def entry(key: str, value: object) -> Entry:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Entry(key, raw, 1, 1, 0)


def test_event_tracker_resync_reports_what_changed_while_the_watch_was_lost() -> None:
    """After a compaction the state is read again: each key that changed counts once, keys
    that did not change mean nothing, keys that vanished are deletions."""
    record = service().replica(1, "a")
    running = {"node": "a", "state": "running", "started_at": 1.0}
    status_key = f"containers/{record.id}/status"
    tracker = EventTracker()
    tracker.load(
        [
            entry("nodes/a", NodeRecord("a").encode()),
            entry("nodes/gone", NodeRecord("gone").encode()),
            entry(f"cluster/containers/{record.id}", record.encode()),
            entry(status_key, running),
        ]
    )
    events = tracker.resync(
        [
            entry("nodes/a", NodeRecord("a").encode()),
            entry("nodes/new", NodeRecord("new").encode()),
            entry(f"cluster/containers/{record.id}", record.encode()),
            entry(status_key, {**running, "state": "exited", "exit_code": 2}),
        ]
    )
    assert sorted((e.type, e.node_id) for e in events) == [
        (CONTAINER_DIED, "a"),
        (NODE_JOINED, "new"),
        (NODE_LOST, "gone"),
    ]
    # The container and its status gone with node "new": only the node's loss is an event.
    events = tracker.resync([entry("nodes/a", NodeRecord("a").encode())])
    assert [(e.type, e.node_id) for e in events] == [(NODE_LOST, "new")]
    assert set(tracker.values) == {"nodes/a"}
    assert tracker.resync([entry("nodes/a", NodeRecord("a").encode())]) == []


@pytest.mark.parametrize("bad", [{"replicas": -1}, {"parallelism": 0}, {"name": "no/slash"}])
def test_service_validation(bad: dict) -> None:
    record = service()
    for key, value in bad.items():
        setattr(record, key, value)
    with pytest.raises(InvalidArgument):
        validate(record)


def test_a_service_template_is_validated_as_its_replicas_are() -> None:
    validate(service())  # a template needs no name: its replicas are web.1, web.2, ...
    record = service()
    record.template.memory_bytes = 1024
    with pytest.raises(InvalidArgument, match="memory limit 1024 bytes is too small"):
        validate(record)


def test_a_plan_past_one_transaction_is_split_into_whole_actions() -> None:
    plan = Plan(
        actions=[Action(MOVE, container="c" * 64)]
        + [Action(START, "s1", slot) for slot in range(1, 101)]
        + [Action(START, "s2", 1)],
        update_states={"s1": ("updating", "")},
    )
    taken, rest = split_plan(plan, 127)
    # The update state, the move and as many starts as fit; the rest is for the next pass.
    used = 1 + ACTION_TXN_OPS[MOVE] + ACTION_TXN_OPS[START] * (len(taken.actions) - 1)
    assert used <= 127 < used + ACTION_TXN_OPS[START]
    assert taken.actions == plan.actions[: len(taken.actions)]
    assert taken.update_states == plan.update_states
    assert (rest.services, rest.containers) == ({"s1", "s2"}, set())
    # A plan that fits is taken whole.
    small = Plan(actions=plan.actions[:10])
    assert split_plan(small, 127) == (small, type(rest)())


def test_a_replica_on_no_network_is_stopped_without_a_drain() -> None:
    """Nothing routes to a replica on network none or host: scaling down stops it at once."""
    old = [replica(s, "a", network_mode="none") for s in (1, 2, 3)]
    plan = reconcile([service(1, network_mode="none")], old, nodes("a"), NOW)
    assert kinds(plan) == [(REMOVE, 2), (REMOVE, 3)]
    drained = [replica(s, "a") for s in (1, 2, 3)]
    assert kinds(reconcile([service(1)], drained, nodes("a"), NOW)) == [
        (WITHDRAW, 2),
        (WITHDRAW, 3),
    ]
