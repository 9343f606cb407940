"""Cluster events, derived from etcd watches, so any cluster instance can serve the stream.

Nothing writes events: they are what changes of the keys mean. `EventTracker` remembers the
last value of each key that matters and turns each watch event into zero or more events:

    nodes/<id>                    put of an unknown node: joined; delete: lost (lease expired)
    cluster/availability/<id>     a new availability: availability changed; a drained node
                                  left with no service replica: drain completed
    cluster/containers/<id>       put of a new id: scheduled, or rescheduled when the record
                                  names the node it left (`previous_node`)
    containers/<id>/status        running with a new start time: started; exited: died;
                                  create_failed (at a new attempt): create failed;
                                  a new health status healthy or unhealthy: health_status
    cluster/services/<id>         new: created; a new replica count: scaled; a new version:
                                  update started; update state completed or paused: update
                                  completed or paused (with the version); delete: removed;
                                  a new pinned image written by the controller: follow

Each event names its actor, the principal that caused it: the `changed_by` of the desired
container, service or availability record (the user of the request, `service:cluster` for the
controller's own writes), `node:<id>` for what a node reports (joined, container statuses),
and nobody ("") for a node whose lease expired.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from berthd.cluster.core import AVAILABILITY
from berthd.cluster.rollout import ROLLBACK_COMPLETED, ROLLBACK_PAUSED, ROLLBACK_STARTED
from berthd.cluster.services import COMPLETED, CONTROLLER, PAUSED, SERVICES, ServiceRecord
from berthd.common.state.containers import (
    CONTAINERS,
    CREATE_FAILED,
    STATUSES,
    ContainerStatus,
    DesiredContainer,
)
from berthd.common.state.family import Change
from berthd.common.state.nodes import NODES
from berthd.common.store import Entry, RevisionCompacted, Store, WatchEvent, prefix_end

log = logging.getLogger("berthd.cluster.events")

NODE_JOINED = "node_joined"
NODE_LOST = "node_lost"
CONTAINER_SCHEDULED = "container_scheduled"
CONTAINER_STARTED = "container_started"
CONTAINER_DIED = "container_died"
CONTAINER_RESCHEDULED = "container_rescheduled"
SERVICE_SCALED = "service_scaled"
CONTAINER_CREATE_FAILED = "container_create_failed"
NODE_AVAILABILITY_CHANGED = "node_availability_changed"
NODE_DRAIN_COMPLETED = "node_drain_completed"
SERVICE_CREATED = "service_created"
SERVICE_UPDATE_STARTED = "service_update_started"
SERVICE_UPDATE_COMPLETED = "service_update_completed"
SERVICE_UPDATE_PAUSED = "service_update_paused"
SERVICE_REMOVED = "service_removed"
CONTAINER_HEALTH_STATUS = "health_status"
SERVICE_ROLLBACK_STARTED = "service_rollback_started"
SERVICE_ROLLBACK_COMPLETED = "service_rollback_completed"
SERVICE_ROLLBACK_PAUSED = "service_rollback_paused"
SERVICE_FOLLOW = "service_follow"

# The key families events are derived from, in the order they are read.
TRACKED = (NODES.prefix, AVAILABILITY, CONTAINERS.prefix, SERVICES, STATUSES.prefix)
# What the stream watches: one watch, so that changes keep their order across families (a node
# lost before its replicas are rescheduled, a record before its status), over the one key range
# from the first tracked family to the end of the last. It holds every tracked family and leaves
# out the busy ones around them: the registry's keys, allocations, assignments, secrets, tokens,
# requests, builds and the build cache (what it still holds, names, node layers, endpoints,
# images, is passed over by the tracker).
WATCH_START = min(TRACKED)
WATCH_END = prefix_end(max(TRACKED))

NODE_EVENTS = (NODE_JOINED, NODE_LOST, NODE_AVAILABILITY_CHANGED, NODE_DRAIN_COMPLETED)
SERVICE_EVENTS = (
    SERVICE_SCALED,
    SERVICE_CREATED,
    SERVICE_UPDATE_STARTED,
    SERVICE_UPDATE_COMPLETED,
    SERVICE_UPDATE_PAUSED,
    SERVICE_REMOVED,
    SERVICE_ROLLBACK_STARTED,
    SERVICE_ROLLBACK_COMPLETED,
    SERVICE_ROLLBACK_PAUSED,
    SERVICE_FOLLOW,
)
# An update state a record reaches -> the event that says so, and its words.
_OUTCOMES = {
    COMPLETED: (SERVICE_UPDATE_COMPLETED, "updated to version {version}"),
    PAUSED: (SERVICE_UPDATE_PAUSED, "update to version {version} paused: {message}"),
    ROLLBACK_COMPLETED: (SERVICE_ROLLBACK_COMPLETED, "rolled back (version {version})"),
    ROLLBACK_PAUSED: (SERVICE_ROLLBACK_PAUSED, "rollback paused: {message}"),
}


@dataclass
class Event:
    """One event; which fields are set depends on its type's family (node, container or
    service), as EventsResponse's payload."""

    type: str
    node_id: str = ""
    container_id: str = ""
    container_name: str = ""
    service_id: str = ""
    previous_node_id: str = ""
    # For container_died: how it exited.
    exit_code: int = 0
    oom_killed: bool = False
    # For container_create_failed: why.
    failure_reason: str = ""
    failure_message: str = ""
    # For service events: the service's name, replica count and version after the event.
    service_name: str = ""
    replicas: int = 0
    version: int = 0
    # For health_status: healthy or unhealthy.
    health_status: str = ""
    # For node_availability_changed.
    availability: str = ""
    message: str = ""
    # Who caused it: `user:<name>`, `node:<id>`, `service:cluster`; "" when unknown.
    actor: str = ""
    time: float = field(default_factory=time.time)

    @property
    def family(self) -> str:
        if self.type in NODE_EVENTS:
            return "node"
        if self.type in SERVICE_EVENTS:
            return "service"
        return "container"


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
            name = event.service_name or tracker.service_names.get(event.service_id, "")
            if not event.service_id or not _refers(self.service, event.service_id, name):
                return False
        return True


def _refers(ref: str, object_id: str, name: str) -> bool:
    return ref == name or (bool(object_id) and object_id.startswith(ref))


class EventTracker:
    """The last known value of every key events are derived from."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.availability: dict[str, str] = {}
        self.availability_by: dict[str, str] = {}  # node id -> who set its availability
        self.containers: dict[str, DesiredContainer] = {}
        self.states: dict[str, tuple[str, Any, int]] = {}  # id -> (state, started_at, attempt)
        self.health: dict[str, str] = {}  # id -> health status ("" without a health check)
        self.services: dict[str, ServiceRecord] = {}
        self.service_names: dict[str, str] = {}
        # The raw value of every key under TRACKED, for a resynchronization to compare.
        self.values: dict[str, bytes] = {}

    def load(self, entries: Iterable[Entry]) -> None:
        """Take the current values as known, without events (the stream starts now)."""
        for entry in entries:
            self.feed(WatchEvent("put", entry.key, entry.value))

    def resync(self, entries: Iterable[Entry]) -> list[Event]:
        """The events that turn the known values into `entries` (every key under TRACKED, read
        after the watch lost its place): what changed meanwhile, as if each key had changed
        once (a container that started and died in between shows its death only)."""
        now = {e.key: e.value for e in entries}
        events = []
        for key in sorted(self.values.keys() - now.keys()):
            events += self.feed(WatchEvent("delete", key, b""))
        for key, value in now.items():
            if self.values.get(key) != value:
                events += self.feed(WatchEvent("put", key, value))
        return events

    def feed(self, event: WatchEvent) -> list[Event]:
        """The events one watch event (of any key) means; unreadable records mean none."""
        if event.key.startswith(TRACKED):
            if event.kind == "delete":
                self.values.pop(event.key, None)
            else:
                self.values[event.key] = event.value
        return self._events(event)

    def _events(self, event: WatchEvent) -> list[Event]:
        if node := NODES.change(event):
            return self._node(node.id, node.kind)
        if container := CONTAINERS.change(event):
            return self._container(container)
        if status := STATUSES.change(event):
            return self._status(status)
        if event.key.startswith(SERVICES):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return self._service(event.key.removeprefix(SERVICES), event)
        if event.key.startswith(AVAILABILITY):
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                return self._availability(event.key.removeprefix(AVAILABILITY), event)
        return []

    def _replicas_on(self, node_id: str) -> int:
        return sum(1 for c in self.containers.values() if c.service and c.node == node_id)

    def _drain_completed(self, node_id: str) -> list[Event]:
        if self.availability.get(node_id) != "drained" or self._replicas_on(node_id):
            return []
        return [
            Event(
                NODE_DRAIN_COMPLETED,
                node_id,
                message=f"node {node_id} drained: no service replica is left on it",
                # Whoever drained it: the controller only carried the drain out.
                actor=self.availability_by.get(node_id, ""),
            )
        ]

    def _availability(self, node_id: str, event: WatchEvent) -> list[Event]:
        value, actor = "active", ""
        if event.kind != "delete":
            data = json.loads(event.value)
            value, actor = str(data["availability"]), str(data.get("changed_by") or "")
        self.availability_by[node_id] = actor
        if self.availability.get(node_id, "active") == value:
            self.availability[node_id] = value
            return []
        self.availability[node_id] = value
        changed = Event(
            NODE_AVAILABILITY_CHANGED,
            node_id,
            availability=value,
            message=f"node {node_id} is {value}",
            actor=actor,
        )
        return [changed, *self._drain_completed(node_id)]

    def _node(self, node_id: str, kind: str) -> list[Event]:
        if kind == "delete":
            self.nodes.discard(node_id)
            return [Event(NODE_LOST, node_id, message=f"node {node_id} lost: lease expired")]
        if node_id in self.nodes:
            return []
        self.nodes.add(node_id)
        return [
            Event(NODE_JOINED, node_id, message=f"node {node_id} joined", actor=f"node:{node_id}")
        ]

    def _container(self, change: Change[DesiredContainer]) -> list[Event]:
        cid, desired = change.id, change.record
        if desired is None:
            gone = self.containers.pop(cid, None)
            self.states.pop(cid, None)
            if gone is not None and gone.service:
                return self._drain_completed(gone.node)
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
            actor=desired.changed_by,
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
            self.health.pop(cid, None)
            return []
        state, started = status.state, status.started_at
        before = self.states.get(cid)
        self.states[cid] = (state, started, status.attempt)
        desired = self.containers.get(cid)
        common = dict(
            node_id=status.node,
            container_id=cid,
            container_name=status.name or (desired.name if desired else ""),
            service_id=desired.service if desired else "",
            actor=f"node:{status.node}" if status.node else "",
        )
        name = common["container_name"]
        health = status.health_status
        health_before = self.health.get(cid, "")
        self.health[cid] = health
        if health in ("healthy", "unhealthy") and health != health_before:
            # Docker's `health_status: healthy`; a status that also starts the container
            # cannot be healthy yet (a new run starts as `starting`).
            return [
                Event(
                    CONTAINER_HEALTH_STATUS,
                    health_status=health,
                    message=f"{name} health_status: {health}",
                    **common,
                )
            ]
        if state == "running" and (before is None or before[:2] != (state, started)):
            return [Event(CONTAINER_STARTED, message=f"{name} started", **common)]
        if state == "exited" and (before is None or before[0] != "exited"):
            code = status.exit_code
            return [
                Event(
                    CONTAINER_DIED,
                    exit_code=code,
                    oom_killed=bool(status.oom_killed),
                    message=f"{name} died ({code})",
                    **common,
                )
            ]
        if state == CREATE_FAILED and (before is None or before != self.states[cid]):
            return [
                Event(
                    CONTAINER_CREATE_FAILED,
                    failure_reason=status.failure_reason,
                    failure_message=status.failure_message,
                    message=f"{name} cannot be created: {status.failure_message}",
                    **common,
                )
            ]
        return []

    def _service(self, sid: str, event: WatchEvent) -> list[Event]:
        if event.kind == "delete":
            gone = self.services.pop(sid, None)
            if gone is None:
                return []
            return [self._service_event(SERVICE_REMOVED, gone, f"service {gone.name} removed")]
        record = ServiceRecord.from_json(event.value)
        self.service_names[sid] = record.name
        before = self.services.get(sid)
        self.services[sid] = record
        if before is None:
            return [self._service_event(SERVICE_CREATED, record, f"service {record.name} created")]
        events = []
        if before.replicas != record.replicas:
            text = f"service {record.name} scaled to {record.replicas}"
            events.append(self._service_event(SERVICE_SCALED, record, text))
        if record.version > before.version and record.update_state == ROLLBACK_STARTED:
            text = f"service {record.name} rollback started: {record.update_message}"
            events.append(self._service_event(SERVICE_ROLLBACK_STARTED, record, text))
        elif record.version > before.version:
            # A rollback changes the pinned image too: only an update can be a follow.
            events += self._followed(before, record)
            text = f"service {record.name} updating to version {record.version}"
            events.append(self._service_event(SERVICE_UPDATE_STARTED, record, text))
        if record.update_state != before.update_state or record.version > before.version:
            outcome = _OUTCOMES.get(record.update_state)
            if outcome is not None:
                kind, words = outcome
                text = f"service {record.name} " + words.format(
                    version=record.version, message=record.update_message
                )
                events.append(self._service_event(kind, record, text))
        return events

    def _followed(self, before: ServiceRecord, record: ServiceRecord) -> list[Event]:
        """A push moved the tag the service follows: the controller (not a user) changed its
        pinned image."""
        if record.follow is None or record.changed_by != CONTROLLER:
            return []
        if before.template.image == record.template.image:
            return []
        digest = record.template.image.rpartition("@")[2]
        text = f"{record.name} {record.follow.reference} -> {digest}"
        return [self._service_event(SERVICE_FOLLOW, record, text)]

    @staticmethod
    def _service_event(kind: str, record: ServiceRecord, message: str) -> Event:
        return Event(
            kind,
            service_id=record.id,
            service_name=record.name,
            replicas=record.replicas,
            version=record.version,
            message=message,
            actor=record.changed_by,
        )


async def watch_events(
    store: Store, wanted: EventFilter, watching: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[Event]:
    """Events from now on, until the caller stops iterating. `watching` is awaited once the
    starting revision is fixed: every change after it is in the stream. When etcd has
    compacted away the revision the watch must go on from (a watch too slow, or lost and
    resumed), the keys are read again and the stream goes on with what changed meanwhile."""
    tracker = EventTracker()
    entries, first_revision = await _read_tracked(store)
    tracker.load(entries)
    if watching is not None:
        await watching()
    while True:
        # From the first snapshot on: changes made while the others were read replay onto
        # values already known, so they produce no event twice.
        try:
            async for event in store.watch_range(WATCH_START, WATCH_END, first_revision + 1):
                for found in tracker.feed(event):
                    if wanted.matches(found, tracker):
                        yield found
            return
        except RevisionCompacted:
            log.info("events: revision %d compacted, reading the state again", first_revision)
        entries, first_revision = await _read_tracked(store)
        for found in tracker.resync(entries):
            if wanted.matches(found, tracker):
                yield found


async def _read_tracked(store: Store) -> tuple[list[Entry], int]:
    """Every key under TRACKED, and the revision of the first read."""
    entries: list[Entry] = []
    first_revision = 0
    for prefix in TRACKED:
        found, revision = await store.snapshot(prefix)
        first_revision = first_revision or revision
        entries += found
    return entries, first_revision
