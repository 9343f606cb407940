"""Who did what: each cluster event names the principal that caused it (the `changed_by` of the
record it comes from, the node for what a node reports), through the API, the client and
`berth events`."""

from __future__ import annotations

import dataclasses
import json

from berth.cli.cluster_cmds import event_line
from berth.client.cluster import Event, event_info
from berthd.cluster.events import (
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
    EventTracker,
)
from berthd.cluster.service import event_message
from berthd.cluster.services import COMPLETED, CONTROLLER, ServiceRecord
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import DesiredContainer
from berthd.common.store import WatchEvent


def put(key: str, value: object) -> WatchEvent:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return WatchEvent("put", key, raw)


def actors(tracker: EventTracker, event: WatchEvent) -> list[tuple[str, str]]:
    return [(e.type, e.actor) for e in tracker.feed(event)]


def test_container_and_node_events_name_their_actor() -> None:
    tracker = EventTracker()
    assert actors(tracker, put("nodes/a", {"id": "a"})) == [(NODE_JOINED, "node:a")]
    run = DesiredContainer("c" * 64, "box", "a", ContainerConfig("busybox"), changed_by="user:dev")
    assert actors(tracker, put(f"cluster/containers/{run.id}", run.encode())) == [
        (CONTAINER_SCHEDULED, "user:dev")
    ]
    status = {"node": "a", "name": "box", "state": "running", "started_at": 5.0}
    assert actors(tracker, put(f"containers/{run.id}/status", status)) == [
        (CONTAINER_STARTED, "node:a")
    ]
    moved = dataclasses.replace(
        run, id="d" * 64, node="b", previous_node="a", changed_by=CONTROLLER
    )
    assert actors(tracker, put(f"cluster/containers/{moved.id}", moved.encode())) == [
        (CONTAINER_RESCHEDULED, "service:cluster")
    ]
    # Nobody made the lease expire.
    assert actors(tracker, WatchEvent("delete", "nodes/a", b"")) == [(NODE_LOST, "")]
    # Records written before actors existed: no actor.
    old = json.loads(run.encode())
    del old["changed_by"]
    old["id"] = "e" * 64
    (event,) = tracker.feed(put(f"cluster/containers/{'e' * 64}", old))
    assert event.actor == ""


def test_a_drain_is_the_drainers_until_it_completes() -> None:
    tracker = EventTracker()
    replica = DesiredContainer(
        "c" * 64, "web.1", "a", ContainerConfig("busybox"), service="s", changed_by=CONTROLLER
    )
    tracker.feed(put(f"cluster/containers/{replica.id}", replica.encode()))
    drained = {"availability": "drained", "changed_by": "user:ops"}
    assert actors(tracker, put("cluster/availability/a", drained)) == [
        (NODE_AVAILABILITY_CHANGED, "user:ops")
    ]
    assert actors(tracker, WatchEvent("delete", f"cluster/containers/{replica.id}", b"")) == [
        (NODE_DRAIN_COMPLETED, "user:ops")
    ]
    # An availability record without changed_by (written before actors).
    assert actors(tracker, put("cluster/availability/a", {"availability": "active"})) == [
        (NODE_AVAILABILITY_CHANGED, "")
    ]


def test_service_events_name_the_user_or_the_controller() -> None:
    tracker = EventTracker()
    record = ServiceRecord("s" * 64, "web", ContainerConfig("busybox"), 1, changed_by="user:dev")
    key = f"cluster/services/{record.id}"
    assert actors(tracker, put(key, record.to_json())) == [(SERVICE_CREATED, "user:dev")]
    scaled = dataclasses.replace(record, replicas=3, changed_by="user:ops")
    assert actors(tracker, put(key, scaled.to_json())) == [(SERVICE_SCALED, "user:ops")]
    done = dataclasses.replace(scaled, update_state=COMPLETED, changed_by=CONTROLLER)
    assert actors(tracker, put(key, done.to_json())) == [
        (SERVICE_UPDATE_COMPLETED, "service:cluster")
    ]
    # RemoveService rewrites the record naming the remover (no event), then deletes it.
    marked = dataclasses.replace(done, changed_by="user:admin")
    assert actors(tracker, put(key, marked.to_json())) == []
    assert actors(tracker, WatchEvent("delete", key, b"")) == [(SERVICE_REMOVED, "user:admin")]


def test_the_actor_reaches_the_client_and_berth_events() -> None:
    tracker = EventTracker()
    run = DesiredContainer("c" * 64, "box", "a", ContainerConfig("busybox"), changed_by="user:dev")
    (event,) = tracker.feed(put(f"cluster/containers/{run.id}", run.encode()))
    message = event_message(event)
    assert message.actor == "user:dev"
    info = event_info(message)
    assert info.actor == "user:dev"
    assert event_line(dataclasses.replace(info, occurred_at=None)) == (
        f"- container schedule {run.id} (actor=user:dev, name=box, node=a)"
    )
    # No actor: no attribute.
    assert event_line(Event("node_lost", None, "", node_id="a")) == "- node lost a"
