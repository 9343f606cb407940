"""The controller's in-memory view of the cluster, fed by a watch of the families it acts on.

The controller (`berthd.cluster.controller`) lists these families once at one revision R
(`load`), then applies every watch event from R + 1 (`apply`), its own committed writes at the
revision of their transaction (`apply_write`) and, after a conflict, point reads of the keys it
compared (`apply_read`). Each key keeps the revision it was last changed at (and, for a key
read absent, the revision it was read absent at), so an older change arriving later (the watch
bringing a write the view already holds) is ignored: the view only moves forward, key by key.
A compaction or a lost watch ends the view; the controller lists again (`reset`, `load`).

The serving instances' placement (`berthd.cluster.follow.NodeCache`) keeps a view of the node
families only (`PLACEMENT_WATCHED`: nodes, allocations, availability, node layers): then a
node's container count is its allocation record's `containers` (kept in the placement
transaction), as no desired record is watched, and `node_views` hands out the scheduler's
NodeViews, rebuilt only for a node that changed.

Each change marks what it can affect dirty, and a controller pass reconciles only that:

- a desired record or a status: its service (a standalone container with restart policy
  `always`: that container);
- a node record or its availability: the services with replicas on the node and the `always`
  containers on it, and everything whose last placement found no room (`blocked`);
- an allocation: what is blocked (a reservation released may make room);
- a service record: that service (deleted: its replicas are then removed).

No I/O here: unit-tested by feeding it events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from berthd.cluster.core import (
    ACTIVE,
    ALLOCATIONS,
    AVAILABILITY,
    ClusterNode,
    ContainerView,
    join_status,
)
from berthd.cluster.ports import node_ports
from berthd.cluster.scheduler import NodeView
from berthd.cluster.services import SERVICES, ClusterState, ServiceRecord
from berthd.common.state.containers import (
    CONTAINERS,
    RUNNING,
    STATUSES,
    ContainerStatus,
    DesiredContainer,
)
from berthd.common.state.family import DECODE_ERRORS
from berthd.common.state.nodes import NODE_LAYERS, NODES, NodeLayers, NodeRecord
from berthd.common.store import Entry, WatchEvent

log = logging.getLogger("berthd.cluster.view")

T = TypeVar("T")

# Every family the controller decides on (what `ClusterState` holds), and nothing else: requests,
# tokens, endpoints, the election, names, node layers, the registry and images never wake it.
WATCHED = (
    NODES.prefix,
    ALLOCATIONS,
    AVAILABILITY,
    CONTAINERS.prefix,
    STATUSES.prefix,
    SERVICES,
)
# What placement in a serving instance reads: the nodes, their reservations, availability and
# layers (image locality); never the desired records or statuses.
PLACEMENT_WATCHED = (NODES.prefix, ALLOCATIONS, AVAILABILITY, NODE_LAYERS.prefix)


@dataclass
class Dirty:
    """What a pass must reconcile: service ids and standalone `always` container ids."""

    services: set[str] = field(default_factory=set)
    containers: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.services or self.containers)

    def update(self, other: Dirty) -> None:
        self.services |= other.services
        self.containers |= other.containers


def _watched_always(desired: DesiredContainer) -> bool:
    """A standalone container the controller moves off a lost node."""
    return (
        not desired.service
        and desired.config.restart_policy == "always"
        and desired.desired == RUNNING
    )


class ClusterView:
    def __init__(self, counts_from_allocations: bool = False) -> None:
        """`counts_from_allocations`: a node's container count from its allocation record (a
        view that does not watch the desired records), not from the records it holds."""
        self.counts_from_allocations = counts_from_allocations
        self.reset()

    def reset(self) -> None:
        """Forget everything (before a new listing)."""
        self.loaded = False
        self.registered: dict[str, NodeRecord] = {}
        self.allocations: dict[str, Entry] = {}
        self.availability: dict[str, str] = {}
        self.containers: dict[str, DesiredContainer] = {}
        self.statuses: dict[str, ContainerStatus] = {}
        self.services: dict[str, ServiceRecord] = {}
        # Container or service id -> mod revision of its record (what commits compare).
        self.revisions: dict[str, int] = {}
        self.nodes: dict[str, ClusterNode] = {}
        self.by_service: dict[str, set[str]] = {}
        self.by_node: dict[str, set[str]] = {}
        # Node id -> layer digest -> bytes (only when the node layers are watched).
        self.layers: dict[str, dict[str, int]] = {}
        # Node id -> its NodeView, built on demand and dropped when the node changes.
        self._node_views: dict[str, NodeView] = {}
        # Key -> revision of what the view holds for it: present keys and keys read absent.
        self._present: dict[str, int] = {}
        self._absent: dict[str, int] = {}
        self.dirty = Dirty()
        # What the last placement found no room for: looked at again when capacity may change.
        self.blocked = Dirty()

    # Feeding ------------------------------------------------------------------------------

    def load(self, entries: Iterable[Entry]) -> None:
        """A fresh listing (all at one revision): everything becomes dirty."""
        self.reset()
        for entry in entries:
            self._set(entry.key, entry.value, entry.mod_revision)
        self.loaded = True
        self.mark_all_dirty()

    def mark_all_dirty(self) -> None:
        """Every service and `always` container to be looked at by the next pass."""
        self.dirty.services |= set(self.services) | set(self.by_service)
        self.dirty.containers |= {c.id for c in self.containers.values() if _watched_always(c)}

    def apply(self, event: WatchEvent) -> bool:
        """One watch event; False when the view already holds that key as new or newer."""
        if event.kind == "put":
            return self._put(event.key, event.value, event.mod_revision)
        return self._delete(event.key, event.mod_revision, remember=False)

    def apply_write(self, key: str, value: bytes | None, revision: int) -> bool:
        """A write the controller itself committed at `revision` (value None: a delete)."""
        if not key.startswith(WATCHED):
            # Name claims, assignment keys: not in the view, and no watch brings their deletes
            # (remembering them would keep every removed container's keys for ever).
            return False
        if value is None:
            return self._delete(key, revision)
        return self._put(key, value, revision)

    def apply_read(self, key: str, entry: Entry | None, revision: int) -> bool:
        """A point read made at store revision `revision`; True when it changed the view."""
        if entry is not None:
            return self._put(key, entry.value, entry.mod_revision)
        return self._delete(key, revision)

    def take_dirty(self) -> Dirty:
        taken, self.dirty = self.dirty, Dirty()
        return taken

    def _known(self, key: str) -> int:
        return max(self._present.get(key, 0), self._absent.get(key, 0))

    def _put(self, key: str, value: bytes, revision: int) -> bool:
        if revision <= self._known(key):
            return False
        self._absent.pop(key, None)
        self._set(key, value, revision)
        return True

    def _delete(self, key: str, revision: int, remember: bool = True) -> bool:
        """`remember`: keep the revision of the absence until the watch brings the delete (not
        for the watch's own deletes: it brings each key's changes in order)."""
        if revision <= self._known(key):
            if self._absent.get(key) == revision:
                # The watch brought a delete the view already applied: nothing to remember.
                del self._absent[key]
            return False
        if remember:
            self._absent[key] = revision
        if self._present.pop(key, None) is None:
            return False  # already absent: nothing changes
        self._remove(key)
        return True

    # Keys to records ----------------------------------------------------------------------

    def _set(self, key: str, value: bytes, revision: int) -> None:
        self._present[key] = revision
        if (node_id := NODES.id_of(key)) is not None:
            record = self._decode(key, lambda: NodeRecord.decode(value, node_id))
            if record is None:
                self.registered.pop(node_id, None)
            else:
                self.registered[node_id] = record
            self._node_changed(node_id, membership=True)
        elif key.startswith(ALLOCATIONS):
            node_id = key.removeprefix(ALLOCATIONS)
            self.allocations[node_id] = Entry(key, value, 0, revision, 0)
            self._node_changed(node_id, membership=False)
        elif key.startswith(AVAILABILITY):
            node_id = key.removeprefix(AVAILABILITY)
            availability = self._decode(key, lambda: str(json.loads(value)["availability"]))
            self.availability[node_id] = availability or ACTIVE
            self._node_changed(node_id, membership=True)
        elif (node_id := NODE_LAYERS.id_of(key)) is not None:
            held = self._decode(key, lambda: NodeLayers.decode(value))
            self.layers[node_id] = held.layers if held is not None else {}
            self._rebuild_node(node_id)
        elif (cid := CONTAINERS.id_of(key)) is not None:
            desired = self._decode(key, lambda: CONTAINERS.decode(cid, value))
            self._container_changed(cid, desired, revision)
        elif (cid := STATUSES.id_of(key)) is not None:
            status = self._decode(key, lambda: STATUSES.decode(cid, value))
            if status is None:
                self.statuses.pop(cid, None)
            else:
                self.statuses[cid] = status
            self._status_changed(cid)
        elif key.startswith(SERVICES):
            sid = key.removeprefix(SERVICES)
            service = self._decode(key, lambda: ServiceRecord.from_json(value))
            if service is None:
                self.services.pop(sid, None)
                self.revisions.pop(sid, None)
            else:
                self.services[sid] = service
                self.revisions[sid] = revision
            self.dirty.services.add(sid)

    def _remove(self, key: str) -> None:
        if (node_id := NODES.id_of(key)) is not None:
            self.registered.pop(node_id, None)
            self._node_changed(node_id, membership=True)
        elif key.startswith(ALLOCATIONS):
            node_id = key.removeprefix(ALLOCATIONS)
            self.allocations.pop(node_id, None)
            self._node_changed(node_id, membership=False)
        elif key.startswith(AVAILABILITY):
            node_id = key.removeprefix(AVAILABILITY)
            self.availability.pop(node_id, None)
            self._node_changed(node_id, membership=True)
        elif (node_id := NODE_LAYERS.id_of(key)) is not None:
            self.layers.pop(node_id, None)
            self._rebuild_node(node_id)
        elif (cid := CONTAINERS.id_of(key)) is not None:
            self._container_changed(cid, None, 0)
        elif (cid := STATUSES.id_of(key)) is not None:
            self.statuses.pop(cid, None)
            self._status_changed(cid)
        elif key.startswith(SERVICES):
            sid = key.removeprefix(SERVICES)
            self.services.pop(sid, None)
            self.revisions.pop(sid, None)
            self.dirty.services.add(sid)

    @staticmethod
    def _decode(key: str, decode: Callable[[], T]) -> T | None:
        """The decoded record, or None (logged) for one that does not decode: one bad record
        never stops the controller, as with every reader of a family."""
        try:
            return decode()
        except DECODE_ERRORS as exc:
            log.warning("ignoring unreadable record %s: %s", key, exc)
            return None

    # Indexes and dirty marks --------------------------------------------------------------

    def _mark_container(self, desired: DesiredContainer) -> None:
        if desired.service:
            self.dirty.services.add(desired.service)
        elif _watched_always(desired):
            self.dirty.containers.add(desired.id)

    def _container_changed(self, cid: str, desired: DesiredContainer | None, rev: int) -> None:
        old = self.containers.pop(cid, None)
        self.revisions.pop(cid, None)
        if old is not None:
            self._mark_container(old)
            self._unindex(self.by_service, old.service, cid)
            self._unindex(self.by_node, old.node, cid)
        if desired is not None:
            self.containers[cid] = desired
            self.revisions[cid] = rev
            self._mark_container(desired)
            if desired.service:
                self.by_service.setdefault(desired.service, set()).add(cid)
            self.by_node.setdefault(desired.node, set()).add(cid)
        for node_id in {old.node if old else None, desired.node if desired else None} - {None}:
            self._rebuild_node(str(node_id))

    def _status_changed(self, cid: str) -> None:
        desired = self.containers.get(cid)
        if desired is not None and desired.service:
            self.dirty.services.add(desired.service)

    @staticmethod
    def _unindex(index: dict[str, set[str]], key: str, cid: str) -> None:
        members = index.get(key)
        if members is not None:
            members.discard(cid)
            if not members:
                del index[key]

    def _node_changed(self, node_id: str, membership: bool) -> None:
        """A node's record, availability (`membership`: what may move replicas off it) or
        allocation changed."""
        self._rebuild_node(node_id)
        self.dirty.update(self.blocked)
        if membership:
            for cid in self.by_node.get(node_id, ()):
                self._mark_container(self.containers[cid])

    def _rebuild_node(self, node_id: str) -> None:
        """The node as `build_nodes` makes it: known while registered, holding an allocation
        or containers (then not ready)."""
        self._node_views.pop(node_id, None)
        registered = self.registered.get(node_id)
        allocation = self.allocations.get(node_id)
        reserved = self._allocation(allocation)
        if self.counts_from_allocations:
            count = int(reserved.get("containers", 0))
        else:
            count = len(self.by_node.get(node_id, ()))
        if registered is None and allocation is None and not count:
            self.nodes.pop(node_id, None)
            return
        self.nodes[node_id] = ClusterNode(
            id=node_id,
            record=registered or NodeRecord(node_id),
            ready=registered is not None,
            availability=self.availability.get(node_id, ACTIVE),
            allocated_cpu_millis=int(reserved.get("cpu_millis", 0)),
            allocated_memory_bytes=int(reserved.get("memory_bytes", 0)),
            container_count=count,
            layers=self.layers.get(node_id, {}),
            ports=node_ports(reserved),
        )

    @staticmethod
    def _allocation(entry: Entry | None) -> dict:
        if entry is None:
            return {}
        try:
            found = entry.json()
            return found if isinstance(found, dict) else {}
        except ValueError:
            return {}

    # Reading ------------------------------------------------------------------------------

    def allocation(self, node_id: str) -> dict:
        """The node's allocation record as the view holds it ({} for none)."""
        return self._allocation(self.allocations.get(node_id))

    def revision(self, key: str) -> int:
        """The mod revision of the key as the view holds it (0: absent), for a transaction's
        compare that the view's reading of it still holds."""
        return self._present.get(key, 0)

    def node_views(self) -> list[NodeView]:
        """Every node as the scheduler sees it; shared, not copied (placement does not change
        them): only a node that changed since the last call is built again."""
        views = self._node_views
        for node_id, node in self.nodes.items():
            if node_id not in views:
                views[node_id] = node.view()
        return list(views.values())

    def state(self) -> ClusterState:
        """The view as the ClusterState `realize` and `commit` take (shared, not copied)."""
        return ClusterState(
            self.nodes,
            self.containers,
            self.revisions,
            self.statuses,
            self.services,
            self.allocations,
            by_service=self.by_service,
        )

    def views(self, dirty: Dirty) -> list[ContainerView]:
        """The containers a pass over `dirty` decides on: every replica of its services
        (whether the service still exists or not) and its standalone containers."""
        ids = {cid for sid in dirty.services for cid in self.by_service.get(sid, ())}
        ids |= {cid for cid in dirty.containers if cid in self.containers}
        return join_status(
            (self.containers[cid] for cid in ids), self.statuses, self.registered.keys()
        )

    def replicas(self, service_id: str) -> list[ContainerView]:
        return self.views(Dirty(services={service_id}))
