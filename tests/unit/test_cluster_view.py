"""The controller's view (berthd.cluster.view) fed by events, and what each change marks dirty;
`next_check`, when time alone changes a service's decisions. No etcd."""

from __future__ import annotations

import json

from berthd.cluster.controller import RESYNC_SECONDS, Controller, next_check
from berthd.cluster.core import ContainerView, allocation_key, availability_key
from berthd.cluster.services import UPDATING, ServiceRecord, service_key
from berthd.cluster.view import ClusterView, Dirty
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import (
    CONTAINERS,
    STATUSES,
    ContainerStatus,
    DesiredContainer,
)
from berthd.common.state.nodes import NODE_LAYERS, NODES, NodeRecord
from berthd.common.store import Entry, WatchEvent

GiB = 1 << 30
SID = "s" * 64


def web(replicas: int = 2, **kw) -> ServiceRecord:
    template = ContainerConfig(image="busybox", restart_policy="always")
    return ServiceRecord(id=SID, name="web", template=template, replicas=replicas, **kw)


def put(key: str, value: bytes, revision: int) -> WatchEvent:
    return WatchEvent("put", key, value, revision)


def delete(key: str, revision: int) -> WatchEvent:
    return WatchEvent("delete", key, b"", revision)


def node_put(node_id: str, revision: int) -> WatchEvent:
    record = NodeRecord(node_id, cpus=4, memory_bytes=4 * GiB)
    return put(NODES.key(node_id), record.encode(), revision)


def standalone(cid: str, node: str, policy: str = "always") -> DesiredContainer:
    config = ContainerConfig(image="busybox", name=cid, restart_policy=policy)
    return DesiredContainer(id=cid, name=cid, node=node, config=config)


def loaded(*events: WatchEvent) -> ClusterView:
    view = ClusterView()
    view.load(Entry(e.key, e.value, e.mod_revision, e.mod_revision, 0) for e in events)
    view.take_dirty()
    return view


def test_a_listing_makes_everything_dirty() -> None:
    replica = web().replica(1, "a")
    view = ClusterView()
    view.load(
        [
            Entry(NODES.key("a"), NodeRecord("a", cpus=1).encode(), 1, 1, 0),
            Entry(service_key(SID), web().to_json(), 2, 2, 0),
            Entry(CONTAINERS.key(replica.id), replica.encode(), 3, 3, 0),
            Entry(CONTAINERS.key("xx"), standalone("xx", "a").encode(), 4, 4, 0),
            Entry(CONTAINERS.key("yy"), standalone("yy", "a", "no").encode(), 5, 5, 0),
        ]
    )
    assert view.take_dirty() == Dirty({SID}, {"xx"})
    assert view.nodes["a"].ready and view.nodes["a"].container_count == 3
    assert view.revisions == {SID: 2, replica.id: 3, "xx": 4, "yy": 5}


def test_puts_and_deletes_apply_in_revision_order_per_key() -> None:
    view = loaded(node_put("a", 1))
    record = web(replicas=2)
    assert view.apply(put(service_key(SID), record.to_json(), 5))
    assert view.services[SID].replicas == 2 and view.revisions[SID] == 5
    # The view's own write at 6, then the watch brings it again, and an older one late.
    record.replicas = 3
    assert view.apply_write(service_key(SID), record.to_json(), 6)
    assert not view.apply(put(service_key(SID), record.to_json(), 6))
    assert not view.apply(put(service_key(SID), web(replicas=9).to_json(), 5))
    assert view.services[SID].replicas == 3
    assert view.apply(delete(service_key(SID), 7))
    assert SID not in view.services and SID not in view.revisions
    # A point read that found the key absent at revision 9: a put from before is stale.
    assert not view.apply_read(service_key(SID), None, 9)
    assert not view.apply(put(service_key(SID), record.to_json(), 8))
    assert SID not in view.services
    assert view.apply(put(service_key(SID), record.to_json(), 10))


def test_a_status_change_marks_its_service_only() -> None:
    other = "t" * 64
    mine, theirs = web().replica(1, "a"), web().replica(1, "a")
    theirs.service = other
    view = loaded(
        node_put("a", 1),
        put(CONTAINERS.key(mine.id), mine.encode(), 2),
        put(CONTAINERS.key(theirs.id), theirs.encode(), 3),
    )
    status = ContainerStatus(node="a", state="running")
    view.apply(put(STATUSES.key(mine.id), status.encode(), 4))
    assert view.take_dirty() == Dirty({SID}, set())
    assert view.statuses[mine.id].state == "running"
    # The status of a standalone container changes nothing the controller decides.
    alone = standalone("xx", "a")
    view.apply(put(CONTAINERS.key("xx"), alone.encode(), 5))
    view.take_dirty()
    view.apply(put(STATUSES.key("xx"), status.encode(), 6))
    assert not view.take_dirty()


def test_a_lost_node_marks_what_runs_on_it() -> None:
    on_a, on_b = web().replica(1, "a"), web().replica(2, "b")
    on_b.service = "t" * 64
    view = loaded(
        node_put("a", 1),
        node_put("b", 2),
        put(CONTAINERS.key(on_a.id), on_a.encode(), 3),
        put(CONTAINERS.key(on_b.id), on_b.encode(), 4),
        put(CONTAINERS.key("xx"), standalone("xx", "a").encode(), 5),
        put(CONTAINERS.key("yy"), standalone("yy", "a", "no").encode(), 6),
    )
    view.apply(delete(NODES.key("a"), 7))
    assert view.take_dirty() == Dirty({SID}, {"xx"})
    assert not view.nodes["a"].ready  # still known: it holds containers
    assert [v.node_ready for v in view.replicas(SID)] == [False]
    view.apply(put("cluster/availability/b", json.dumps({"availability": "drained"}).encode(), 8))
    assert view.take_dirty() == Dirty({"t" * 64}, set())
    assert view.nodes["b"].availability == "drained"


def test_capacity_changes_wake_what_found_no_room() -> None:
    view = loaded(node_put("a", 1))
    view.blocked = Dirty({SID}, {"xx"})
    view.apply(put("cluster/allocations/a", b'{"cpu_millis":0,"containers":0}', 2))
    assert view.take_dirty() == Dirty({SID}, {"xx"})
    view.blocked = Dirty()
    view.apply(put("cluster/allocations/a", b'{"cpu_millis":5,"containers":1}', 3))
    assert not view.take_dirty()
    assert view.nodes["a"].allocated_cpu_millis == 5


def test_a_deleted_container_leaves_the_indexes() -> None:
    replica = web().replica(1, "a")
    view = loaded(node_put("a", 1), put(CONTAINERS.key(replica.id), replica.encode(), 2))
    view.apply(delete(CONTAINERS.key(replica.id), 3))
    assert view.take_dirty() == Dirty({SID}, set())
    assert view.by_service == {} and view.by_node == {} and view.replicas(SID) == []
    assert view.nodes["a"].container_count == 0


def test_unreadable_records_are_skipped() -> None:
    view = loaded(node_put("a", 1))
    assert view.apply(put(service_key(SID), b"{not json", 2))
    assert SID not in view.services
    assert view.apply(put(CONTAINERS.key("xx"), b"[]", 3))
    assert "xx" not in view.containers


def test_a_new_listing_forgets_the_old_view() -> None:
    """After a compaction or a lost watch the controller lists again: nothing of the old view
    (a key deleted meanwhile, its indexes, its marks) survives."""
    replica = web().replica(1, "a")
    view = loaded(node_put("a", 1), put(CONTAINERS.key(replica.id), replica.encode(), 2))
    view.blocked = Dirty({SID}, set())
    view.load([Entry(NODES.key("b"), NodeRecord("b").encode(), 9, 9, 0)])
    assert set(view.nodes) == {"b"} and view.containers == {} and view.by_node == {}
    assert not view.blocked and not view.take_dirty()


def running(slot: int, version: int, started: float) -> ContainerView:
    record = web().replica(slot, "a")
    record.service_version = version
    return ContainerView(record, ContainerStatus(state="running", started_at=started))


def test_next_check_is_when_an_update_can_go_on_or_a_retry_is_due() -> None:
    now = 1000.0
    record = web(version=2, update_state=UPDATING, monitor_seconds=5.0)
    # Slot 1 runs the new version since 2 s: it settles in 3 s, when slot 2 may be replaced.
    views = [running(1, 2, now - 2), running(2, 1, now - 100)]
    assert abs(next_check(record, views, now) - (now + 3)) < 0.01
    # Nothing waits on time once every replica is current and settled.
    settled = web(version=2, monitor_seconds=5.0)
    assert next_check(settled, [running(1, 2, now - 10), running(2, 2, now - 10)], now) is None
    failed = web().replica(1, "a")
    failed.attempt = 1
    status = ContainerStatus(state="create_failed", updated_at=now - 1)
    # The backoff after attempt 1 is 10 s.
    due = next_check(web(), [ContainerView(failed, status)], now)
    assert due is not None and abs(due - (now + 9)) < 0.01


def test_the_periodic_resync_looks_at_everything_from_memory() -> None:
    replica = web().replica(1, "a")
    view = loaded(
        put(service_key(SID), web().to_json(), 2),
        put(CONTAINERS.key(replica.id), replica.encode(), 3),
        node_put("a", 4),
    )
    controller = Controller(store=None)  # type: ignore[arg-type]  # the resync reads no store
    controller.view = view
    now = controller._next_resync - 1
    assert not controller._take_due(now)
    taken = controller._take_due(now + 1 + RESYNC_SECONDS / 2)
    assert taken.services == {SID}
    assert not controller._take_due(now + 2 + RESYNC_SECONDS / 2)  # the next one is a period on


def test_the_placement_view_counts_from_allocations_and_rebuilds_only_what_changed() -> None:
    view = ClusterView(counts_from_allocations=True)
    alloc = json.dumps({"cpu_millis": 500, "memory_bytes": 0, "containers": 3}).encode()
    layers = json.dumps({"sha256:l1": 100}).encode()
    view.load(
        Entry(e.key, e.value, e.mod_revision, e.mod_revision, 0)
        for e in (
            node_put("a", 1),
            node_put("b", 2),
            put(allocation_key("a"), alloc, 3),
            put(NODE_LAYERS.key("b"), layers, 4),
        )
    )
    first = {v.id: v for v in view.node_views()}
    assert (first["a"].container_count, first["a"].allocated_cpu_millis) == (3, 500)
    assert (first["b"].container_count, first["b"].layer_bytes) == (0, {"sha256:l1": 100})
    assert view.revision(allocation_key("a")) == 3 and view.revision(availability_key("a")) == 0
    # A change rebuilds that node's view alone; the others are the same objects.
    view.apply(put(availability_key("b"), b'{"availability": "cordoned"}', 5))
    second = {v.id: v for v in view.node_views()}
    assert second["a"] is first["a"] and second["b"].cordoned
    # A write this instance made is seen at once; the watch bringing it later changes nothing.
    grown = json.dumps({"cpu_millis": 500, "memory_bytes": 0, "containers": 4}).encode()
    assert view.apply_write(allocation_key("a"), grown, 6)
    assert not view.apply(put(allocation_key("a"), grown, 6))
    assert {v.id: v for v in view.node_views()}["a"].container_count == 4
    # A lost node is kept, not ready, while it holds an allocation.
    view.apply(delete(NODES.key("a"), 7))
    assert not {v.id: v for v in view.node_views()}["a"].ready
    assert not view.dirty
