"""Cluster events, derived from etcd watches, so any cluster instance can serve the stream.

Nothing writes events: they are what changes of the keys mean. `EventTracker` remembers the
last value of each key that matters and turns each watch event into zero or more events:

    nodes/<id>                    put of an unknown node: joined; delete: lost (lease expired)
    cluster/containers/<id>       put of a new id: scheduled, or rescheduled when the record
                                  names the node it left (`previous_node`)
    containers/<id>/status        running with a new start time: started; exited: died
    cluster/services/<id>         a new replica count: service scaled
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from berthd.cluster.services import SERVICES, ServiceRecord
from berthd.common.state.containers import (
    CONTAINERS,
    STATUSES,
    ContainerStatus,
    DesiredContainer,
)
from berthd.common.state.family import Change
from berthd.common.state.nodes import NODES
from berthd.common.store import Entry, Store, WatchEvent

NODE_JOINED = "node_joined"
NODE_LOST = "node_lost"
CONTAINER_SCHEDULED = "container_scheduled"
CONTAINER_STARTED = "container_started"
CONTAINER_DIED = "container_died"
CONTAINER_RESCHEDULED = "container_rescheduled"
SERVICE_SCALED = "service_scaled"


@dataclass
class Event:
    type: str
    node_id: str = ""
    container_id: str = ""
    container_name: str = ""
    service_id: str = ""
    previous_node_id: str = ""
    exit_code: int = 0
    replicas: int = 0
    message: str = ""
    time: float = field(default_factory=time.time)


@dataclass
class EventFilter:
    """EventsRequest's filters; each one that is set must hold. References to containers and
    services (id, id prefix or name) are matched against what the tracker knows."""

    types: set[str] = field(default_factory=set)
    node_id: str = ""
    container: str = ""
    service: str = ""

    def matches(self, event: Event, tracker: EventTracker) -> bool:
        if self.types and event.type not in self.types:
            return False
        if self.node_id and self.node_id not in (event.node_id, event.previous_node_id):
            return False
        if self.container and not _refers(self.container, event.container_id, event.container_name):
            return False
        if self.service:
            name = tracker.service_names.get(event.service_id, "")
            if not event.service_id or not _refers(self.service, event.service_id, name):
                return False
        return True


def _refers(ref: str, object_id: str, name: str) -> bool:
    return ref == name or (bool(object_id) and object_id.startswith(ref))


class EventTracker:
    """The last known value of every key events are derived from."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.containers: dict[str, DesiredContainer] = {}
        self.states: dict[str, tuple[str, Any]] = {}  # id -> (state, started_at)
        self.replicas: dict[str, int] = {}
        self.service_names: dict[str, str] = {}

    def load(self, entries: Iterable[Entry]) -> None:
        """Take the current values as known, without events (the stream starts now)."""
        for entry in entries:
            self.feed(WatchEvent("put", entry.key, entry.value))

    def feed(self, event: WatchEvent) -> list[Event]:
        """The events one watch event (of any key) means; unreadable records mean none."""
        if node := NODES.change(event):
            return self._node(node.id, node.kind)
        if container := CONTAINERS.change(event):
            return self._container(container)
        if status := STATUSES.change(event):
            return self._status(status)
        if event.key.startswith(SERVICES):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return self._service(event.key.removeprefix(SERVICES), event)
        return []

    def _node(self, node_id: str, kind: str) -> list[Event]:
        if kind == "delete":
            self.nodes.discard(node_id)
            return [Event(NODE_LOST, node_id, message=f"node {node_id} lost: lease expired")]
        if node_id in self.nodes:
            return []
        self.nodes.add(node_id)
        return [Event(NODE_JOINED, node_id, message=f"node {node_id} joined")]

    def _container(self, change: Change[DesiredContainer]) -> list[Event]:
        cid, desired = change.id, change.record
        if desired is None:
            self.containers.pop(cid, None)
            self.states.pop(cid, None)
            return []
        known = cid in self.containers
        self.containers[cid] = desired
        if known:
            return []
        common = dict(
            node_id=desired.node,
            container_id=cid,
            container_name=desired.name,
            service_id=desired.service,
        )
        if desired.previous_node:
            return [
                Event(
                    CONTAINER_RESCHEDULED,
                    previous_node_id=desired.previous_node,
                    message=f"{desired.name} rescheduled from {desired.previous_node} "
                    f"to {desired.node}",
                    **common,
                )
            ]
        message = f"{desired.name} scheduled on {desired.node}"
        return [Event(CONTAINER_SCHEDULED, message=message, **common)]

    def _status(self, change: Change[ContainerStatus]) -> list[Event]:
        cid, status = change.id, change.record
        if status is None:
            self.states.pop(cid, None)
            return []
        state, started = status.state, status.started_at
        before = self.states.get(cid)
        self.states[cid] = (state, started)
        desired = self.containers.get(cid)
        common = dict(
            node_id=status.node,
            container_id=cid,
            container_name=status.name or (desired.name if desired else ""),
            service_id=desired.service if desired else "",
        )
        name = common["container_name"]
        if state == "running" and before != (state, started):
            return [Event(CONTAINER_STARTED, message=f"{name} started", **common)]
        if state == "exited" and (before is None or before[0] != "exited"):
            code = status.exit_code
            return [
                Event(CONTAINER_DIED, exit_code=code, message=f"{name} died ({code})", **common)
            ]
        return []

    def _service(self, sid: str, event: WatchEvent) -> list[Event]:
        if event.kind == "delete":
            self.replicas.pop(sid, None)
            return []
        record = ServiceRecord.from_json(event.value)
        self.service_names[sid] = record.name
        before = self.replicas.get(sid)
        self.replicas[sid] = record.replicas
        if before == record.replicas:
            return []
        return [
            Event(
                SERVICE_SCALED,
                service_id=sid,
                replicas=record.replicas,
                message=f"service {record.name} scaled to {record.replicas}",
            )
        ]


async def watch_events(store: Store, wanted: EventFilter) -> AsyncIterator[Event]:
    """Events from now on, until the caller stops iterating."""
    tracker = EventTracker()
    first_revision = 0
    for prefix in (NODES.prefix, CONTAINERS.prefix, SERVICES, STATUSES.prefix):
        entries, revision = await store.snapshot(prefix)
        first_revision = first_revision or revision
        tracker.load(entries)
    # From the first snapshot on: changes made while the others were read replay onto values
    # already known, so they produce no event twice.
    async for event in store.watch_prefix("", first_revision + 1):
        for found in tracker.feed(event):
            if wanted.matches(found, tracker):
                yield found
