"""The cluster's core: nodes, placement and the desired state of containers. No gRPC here.

Everything is read from etcd on demand (the cluster service is stateless, any instance can
serve any request) and every write that races is one transaction, except what placement
chooses among: the nodes, from a view kept in memory by a watch (`berthd.cluster.follow`),
which the placement transaction checks (a lagging view is refused, never trusted). It reads
and writes the shared records through their typed modules (berthd.common.state: desired
containers, their statuses, nodes, node layers, endpoints) and keeps these keys to itself
(docs/etcd.md), relative to the store prefix:

    cluster/names/<name>            container id: makes names unique in one transaction with the
                                    placement, which a scan of the records cannot; also how
                                    `inspect` finds a container by name without a listing
    cluster/allocations/<node id>   {"cpu_millis", "memory_bytes", "containers"}: what the
                                    node's placed containers reserve; updated in the same
                                    transaction as a placement, so two concurrent runs can
                                    never overbook a node
    cluster/availability/<node id>  {"availability": "active" | "cordoned" | "drained",
                                    "changed_by": principal}

Writes made for a request name its principal (`current_principal()`, unless the caller passes
one) as the record's `changed_by`, the actor of the events they cause; a container spec that
needs host access is admitted here (berthd.common.security.admission).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from berth.client import parse_image_reference
from berth.errors import BerthClientError
from berth.ports import PortBinding
from berthd.cluster import metrics
from berthd.cluster.networks import network_guards
from berthd.cluster.ports import node_ports, ports_after, reserved, run_guards
from berthd.cluster.scheduler import NodeView, Request, parse_constraints, place
from berthd.cluster.secrets import secret_guards
from berthd.common.containers import ContainerConfig, validate
from berthd.common.endpoints import service_address
from berthd.common.errors import (
    Aborted,
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from berthd.common.idempotency import Recording
from berthd.common.rpc.registry import RegistryApi
from berthd.common.security.admission import admit
from berthd.common.security.principal import Principal, current_principal
from berthd.common.state.containers import (
    ASSIGNMENTS_READY,
    CONTAINERS,
    RUNNING,
    START_FAILED,
    STATUSES,
    STOPPED,
    ContainerStatus,
    DesiredContainer,
    assigned_id,
    assignments_of,
    op_delete_desired,
    op_put_desired,
)
from berthd.common.state.endpoints import ENDPOINTS, EndpointRecord
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import (
    Compare,
    LeaseNotFound,
    RevisionCompacted,
    Store,
    encode,
    prefix_end,
)

if TYPE_CHECKING:
    from berthd.cluster.view import ClusterView

log = logging.getLogger("berthd.cluster.core")

NAMES = "cluster/names/"
ALLOCATIONS = "cluster/allocations/"
AVAILABILITY = "cluster/availability/"

ACTIVE = "active"
CORDONED = "cordoned"
DRAINED = "drained"

# A lost placement race is retried on a fresh snapshot; a few attempts are plenty because each
# round one of the racers wins.
RUN_ATTEMPTS = 12
DEFAULT_STOP_SECONDS = 10
# Beyond the stop grace time: the node must notice the change and report the exit.
STOP_SLACK_SECONDS = 20
REMOVE_TIMEOUT_SECONDS = 30
START_TIMEOUT_SECONDS = 30
# etcd refuses a transaction of more compares (or writes) than this (its --max-txn-ops).
MAX_TXN_OPS = 128
# What one run of a placement batch may add to its transaction: compares on its record's and
# its name's absence and on its node's three keys (writes: its record, its assignment key, its
# name, the node's allocation and its request_id's response), plus one compare per secret it
# names.
RUN_TXN_OPS = 5
# Records (and as many statuses) read at once by a listing narrowed by the node's index.
READ_BATCH = 64


# How long an image's layer list is reused between placements (tags can move).
LAYER_CACHE_SECONDS = 30.0
# Locality only refines a placement: a registry slower than this is not waited for.
LAYER_LOOKUP_SECONDS = 10.0


async def manifest_layers(registry: RegistryApi, image: str) -> dict[str, int]:
    """Layer digest -> size of an image manifest in berth's registry (an index has none)."""
    reference = parse_image_reference(image)
    stored = await registry.get_manifest(reference.repository, reference.reference)
    manifest = json.loads(stored.content)
    return {layer["digest"]: int(layer["size"]) for layer in manifest.get("layers", [])}


def node_keys(node_id: str) -> list[str]:
    """What a placement on the node reads of it: its record (registered, and the same lease),
    its allocation and its availability."""
    return [NODES.key(node_id), allocation_key(node_id), availability_key(node_id)]


def name_in_use(name: str) -> AlreadyExists:
    return AlreadyExists(
        f'the container name "{name}" is already in use',
        reason="NAME_IN_USE",
        metadata={"name": name},
        resource=("container", name),
    )


def allocation_key(node_id: str) -> str:
    return ALLOCATIONS + node_id


def availability_key(node_id: str) -> str:
    return AVAILABILITY + node_id


def name_key(name: str) -> str:
    return NAMES + name


@dataclass
class ClusterNode:
    """A node as the cluster sees it: what its agent registered plus what the cluster keeps."""

    id: str
    # nodes/<id> as the agent wrote it; only the id while the node is not ready.
    record: NodeRecord
    ready: bool
    availability: str = ACTIVE
    allocated_cpu_millis: int = 0
    allocated_memory_bytes: int = 0
    container_count: int = 0
    # Layer digest -> bytes the node holds, as its agent last published them.
    layers: dict[str, int] = field(default_factory=dict)
    # Host ports its containers reserve (berthd.cluster.ports).
    ports: tuple[PortBinding, ...] = ()

    @property
    def capacity_cpu_millis(self) -> int:
        return self.record.cpus * 1000

    @property
    def capacity_memory_bytes(self) -> int:
        return self.record.memory_bytes

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.record.labels)

    @property
    def address(self) -> str:
        return self.record.address

    def view(self) -> NodeView:
        return NodeView(
            id=self.id,
            labels=self.labels,
            cpus_millis=self.capacity_cpu_millis,
            memory_bytes=self.capacity_memory_bytes,
            allocated_cpu_millis=self.allocated_cpu_millis,
            allocated_memory_bytes=self.allocated_memory_bytes,
            ready=self.ready,
            cordoned=self.availability != ACTIVE,
            container_count=self.container_count,
            layer_bytes=dict(self.layers),
            ports=self.ports,
        )


@dataclass
class ContainerView:
    """A desired record joined with the status its node reports (None until it reports)."""

    desired: DesiredContainer
    status: ContainerStatus | None = None
    # Whether its node holds its lease now: if not, `status` is the node's last word.
    node_ready: bool = True

    @property
    def id(self) -> str:
        return self.desired.id

    @property
    def name(self) -> str:
        return self.desired.name

    @property
    def state(self) -> str:
        return self.status.state if self.status else ""

    @property
    def active(self) -> bool:
        """Running, restarting, or desired running and not yet reported (being pulled or
        created): what `ps` without -a shows and what remove refuses without force."""
        if self.status is None:
            return self.desired.desired == RUNNING
        return self.state in ("running", "restarting")


@dataclass
class Endpoint:
    kind: str
    instance: str
    address: str
    metrics_url: str = ""
    version: str = ""
    public_address: str = ""


# Pure helpers ---------------------------------------------------------------------------------


def join_status(
    desired: Iterable[DesiredContainer],
    statuses: dict[str, ContainerStatus],
    ready_nodes: Collection[str] | None = None,
) -> list[ContainerView]:
    """Each desired record with the status reported for its id and whether its node is ready
    (`ready_nodes`: the nodes registered now; None: not known, taken as ready), newest
    placement first."""
    views = [
        ContainerView(
            d, statuses.get(d.id), ready_nodes is None or not d.node or d.node in ready_nodes
        )
        for d in desired
    ]
    return sorted(views, key=lambda v: (-v.desired.scheduled_at, v.id))


def resolve(ref: str, containers: Iterable[ContainerView]) -> ContainerView:
    """A container by full id, name, or unique id prefix (in that order, as Docker does)."""
    if not ref:
        raise InvalidArgument("a container id, id prefix or name is required")
    containers = list(containers)
    for match in (lambda c: c.id == ref, lambda c: c.name == ref):
        found = [c for c in containers if match(c)]
        if found:
            return found[0]
    prefixed = [c for c in containers if c.id.startswith(ref)]
    if len(prefixed) > 1:
        raise InvalidArgument(
            f'container id prefix "{ref}" is ambiguous: it matches {len(prefixed)} containers',
            reason="AMBIGUOUS_ID",
            metadata={"prefix": ref, "matches": len(prefixed)},
        )
    if not prefixed:
        raise container_not_found(ref)
    return prefixed[0]


def container_not_found(ref: str) -> NotFound:
    return NotFound(
        f"no such container: {ref}",
        reason="CONTAINER_NOT_FOUND",
        metadata={"container": ref},
        resource=("container", ref),
    )


def build_nodes(
    registered: dict[str, NodeRecord],
    allocations: dict[str, dict[str, Any]],
    availability: dict[str, str],
    containers: Iterable[DesiredContainer],
    layers: dict[str, dict[str, int]] | None = None,
) -> dict[str, ClusterNode]:
    """Every node the cluster knows of: registered now, or holding allocations or containers
    (then not ready: its lease expired)."""
    counts = Counter(c.node for c in containers)
    ids = set(registered) | set(allocations) | set(counts)
    nodes = {}
    for node_id in sorted(ids):
        allocation = allocations.get(node_id, {})
        nodes[node_id] = ClusterNode(
            id=node_id,
            record=registered.get(node_id) or NodeRecord(node_id),
            ready=node_id in registered,
            availability=availability.get(node_id, ACTIVE),
            allocated_cpu_millis=int(allocation.get("cpu_millis", 0)),
            allocated_memory_bytes=int(allocation.get("memory_bytes", 0)),
            container_count=counts[node_id],
            layers=dict((layers or {}).get(node_id, {})),
            ports=node_ports(allocation),
        )
    return nodes


def allocation_after(
    current: dict[str, Any] | None,
    cpu: int,
    memory: int,
    count: int,
    add_ports: Iterable[str] = (),
    remove_ports: Iterable[str] = (),
) -> dict:
    """An allocation record with a container's reservation added (or removed, negative), its
    host ports (berthd.cluster.ports) with it."""
    current = current or {}
    allocation: dict[str, Any] = {
        "cpu_millis": max(int(current.get("cpu_millis", 0)) + cpu, 0),
        "memory_bytes": max(int(current.get("memory_bytes", 0)) + memory, 0),
        "containers": max(int(current.get("containers", 0)) + count, 0),
    }
    ports = ports_after(current, add_ports, remove_ports)
    if ports:
        allocation["ports"] = ports
    return allocation


def filter_containers(
    views: Iterable[ContainerView],
    *,
    include_stopped: bool = False,
    labels: dict[str, str] | None = None,
    name: str = "",
    state: str = "",
    node_id: str = "",
    service: str = "",
) -> list[ContainerView]:
    """The list filters of ListContainers; each one that is set must hold."""
    checks: list[Callable[[ContainerView], bool]] = []
    if not include_stopped:
        checks.append(lambda v: v.active)
    if labels:
        checks.append(lambda v: labels.items() <= v.desired.config.labels.items())
    if name:
        checks.append(lambda v: name in v.name)
    if state:
        checks.append(lambda v: v.state == state)
    if node_id:
        checks.append(lambda v: v.desired.node == node_id)
    if service:
        checks.append(lambda v: v.desired.service == service)
    return [v for v in views if all(check(v) for check in checks)]


def endpoint_view(record: EndpointRecord) -> Endpoint:
    """An instance as the server bootstrap registered it."""
    return Endpoint(
        kind=record.service,
        instance=record.instance,
        address=record.address,
        metrics_url=record.metrics,
        version=record.version,
        public_address=record.public_address,
    )


@dataclass
class _Pending:
    """A run waiting for a placement: what it asks and, once placed, its outcome (the record,
    or None with whether the view learned something when the commit lost a race)."""

    config: ContainerConfig
    request: Request
    texts: list[str]
    stamps: dict[str, str]
    guards: list[Compare]
    # The request_id's response, written with the placement (None: no request_id).
    recording: Recording[DesiredContainer] | None = None
    outcome: asyncio.Future[tuple[DesiredContainer | None, bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def record(self, name: str, node: str) -> DesiredContainer:
        return DesiredContainer(
            id=secrets.token_hex(32),
            name=name,
            node=node,
            config=dataclasses.replace(self.config, name=name),
            cpu_millis=self.request.cpu_millis,
            memory_bytes=self.request.memory_bytes,
            constraints=self.texts,
            **self.stamps,
        )

    def done(self, desired: DesiredContainer | None, learned: bool = False) -> None:
        if not self.outcome.done():
            self.outcome.set_result((desired, learned))

    def fail(self, exc: BaseException) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(exc)


# The core ------------------------------------------------------------------------------------


class ClusterCore:
    def __init__(self, store: Store) -> None:
        self.store = store
        # For image locality: any registered registry instance, looked up at each call.
        self.registry = RegistryApi(service_address(store, "registry"))
        self._layer_cache: dict[str, tuple[float, dict[str, int]]] = {}
        # The registry lookup in flight per image: a burst of runs shares one.
        self._layer_lookups: dict[str, asyncio.Task[dict[str, int]]] = {}
        # Imported here: the view module builds on this one's types.
        from berthd.cluster.follow import NodeCache

        # The nodes placement chooses among, in memory, kept by a watch (started at first use).
        self.node_cache = NodeCache(store)
        # One placement at a time in this instance: racing placements on the same snapshot
        # only conflict in etcd and use up each other's retries (a burst of 30 runs on 3
        # nodes ended in ABORTED). Other instances still race, and the transaction decides.
        self._placing = asyncio.Lock()
        # Runs waiting for the lock: its holder places and commits them with its own.
        self._queue: list[_Pending] = []

    async def close(self) -> None:
        """Stop the placement view's watch and the layer lookups in flight."""
        for task in list(self._layer_lookups.values()):
            task.cancel()
        await asyncio.gather(*self._layer_lookups.values(), return_exceptions=True)
        await self.node_cache.close()

    # Reads -------------------------------------------------------------------------------

    async def _desired(self) -> list[DesiredContainer]:
        return [v.record for v in await CONTAINERS.list(self.store)]

    async def _nodes_now(self) -> dict[str, ClusterNode]:
        """Every node read now (not the watched view: a node just cordoned shows it), each
        with the container count its allocation record keeps: no desired record is read."""
        return (await self.node_cache.fresh()).nodes

    async def nodes(self) -> list[ClusterNode]:
        return list((await self._nodes_now()).values())

    async def node(self, node_id: str) -> ClusterNode:
        if not node_id:
            raise InvalidArgument("a node id is required", field="node_id")
        node = (await self._nodes_now()).get(node_id)
        if node is None:
            raise NotFound(
                f"no such node: {node_id}",
                reason="NODE_NOT_FOUND",
                metadata={"node_id": node_id},
                resource=("node", node_id),
            )
        return node

    async def list(self, **filters: Any) -> list[ContainerView]:
        if filters.get("node_id"):
            on_node = await self._on_node(filters["node_id"])
            if on_node is not None:
                return filter_containers(on_node, **filters)
        desired, statuses, ready = await asyncio.gather(
            self._desired(), STATUSES.records(self.store), self._ready_nodes()
        )
        return filter_containers(join_status(desired, statuses, ready), **filters)

    async def _on_node(self, node_id: str) -> list[ContainerView] | None:
        """The containers placed on one node, found by its assignment keys and read by key
        (what the node holds, not what the cluster holds); None before the index is ready
        (a cluster whose records predate it, until its leader backfilled it)."""
        if "/" in node_id:
            return []  # no node has such an id
        ready, keys, node = await asyncio.gather(
            self.store.get(ASSIGNMENTS_READY),
            self.store.list(assignments_of(node_id), keys_only=True),
            NODES.get(self.store, node_id),
        )
        if ready is None:
            return None
        ids = [cid for e in keys if (cid := assigned_id(node_id, e.key)) is not None]
        views: list[ContainerView] = []
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            records, statuses = await asyncio.gather(
                asyncio.gather(*(CONTAINERS.get(self.store, cid) for cid in chunk)),
                asyncio.gather(*(STATUSES.get(self.store, cid) for cid in chunk)),
            )
            for desired, status in zip(records, statuses, strict=True):
                if desired is not None and desired.node == node_id:
                    views.append(ContainerView(desired, status, node is not None))
        return sorted(views, key=lambda v: (-v.desired.scheduled_at, v.id))

    async def _ready_nodes(self) -> set[str]:
        """The nodes whose agents hold their lease now (nodes/<id> exists)."""
        return set(await NODES.records(self.store))

    async def inspect(self, ref: str) -> ContainerView:
        """One container by full id, name or unique id prefix (as `resolve`), read by key:
        its record, its name claim, its status and its node, never the whole family."""
        desired = await self._find(ref)
        status, node = await asyncio.gather(
            STATUSES.get(self.store, desired.id),
            NODES.get(self.store, desired.node) if desired.node else asyncio.sleep(0),
        )
        return ContainerView(desired, status, not desired.node or node is not None)

    async def _find(self, ref: str) -> DesiredContainer:
        if not ref:
            raise InvalidArgument("a container id, id prefix or name is required")
        by_id, claim = await asyncio.gather(
            CONTAINERS.get(self.store, ref), self.store.get(name_key(ref))
        )
        if by_id is not None:
            return by_id
        if claim is not None:
            # The claim is written and deleted with the record, in one transaction.
            named = await CONTAINERS.get(self.store, claim.value.decode())
            if named is not None:
                return named
        # An id prefix: two keys tell a unique one from an ambiguous one.
        page = await self.store.range(CONTAINERS.key(ref), prefix_end(CONTAINERS.key(ref)), limit=2)
        if len(page.entries) > 1:
            matches = await self.store.count(CONTAINERS.key(ref))
            raise InvalidArgument(
                f'container id prefix "{ref}" is ambiguous: it matches {matches} containers',
                reason="AMBIGUOUS_ID",
                metadata={"prefix": ref, "matches": matches},
            )
        found = CONTAINERS.versioned(page.entries[0]) if page.entries else None
        if found is None:
            raise container_not_found(ref)
        return found.record

    async def endpoints(self) -> list[Endpoint]:
        found = [endpoint_view(v.record) for v in await ENDPOINTS.list(self.store)]
        return sorted(found, key=lambda e: (e.kind, e.instance))

    async def image_layers(self, image: str) -> dict[str, int]:
        """The image's layers (digest -> bytes) from berth's registry, for image locality.

        Locality only refines a choice, so an image the registry cannot describe (yet) is
        placed on spread alone rather than refused here: the node reports the pull error. One
        lookup per image at a time, whatever the number of runs waiting for it; a list older
        than LAYER_CACHE_SECONDS is still used while one refresh runs behind (a tag that
        moved refines the next placements, not this one)."""
        cached = self._layer_cache.get(image)
        if cached is None:
            # Shielded: a caller that goes away does not cancel the others' lookup.
            return await asyncio.shield(self._layer_lookup(image))
        if time.monotonic() - cached[0] >= LAYER_CACHE_SECONDS:
            self._layer_lookup(image)
        return cached[1]

    def _layer_lookup(self, image: str) -> asyncio.Task[dict[str, int]]:
        """The lookup of `image`'s layers in flight, started if none is."""
        task = self._layer_lookups.get(image)
        if task is None:
            task = asyncio.create_task(self._look_up_layers(image))
            self._layer_lookups[image] = task
            task.add_done_callback(lambda _: self._layer_lookups.pop(image, None))
        return task

    async def _look_up_layers(self, image: str) -> dict[str, int]:
        layers: dict[str, int] = {}
        try:
            async with asyncio.timeout(LAYER_LOOKUP_SECONDS):
                layers = await manifest_layers(self.registry, image)
        except TimeoutError:
            log.info("no image locality for %s: the registry did not answer in time", image)
        except (BerthError, BerthClientError, ValueError, KeyError, TypeError) as exc:
            # Unavailable too when no registry is registered.
            log.info("no image locality for %s: %s", image, exc)
        self._layer_cache[image] = (time.monotonic(), layers)
        return layers

    async def node_address(self, container: ContainerView) -> str:
        """Where to reach the node that runs a container, for logs, exec and stats."""
        node = container.desired.node
        info = await NODES.get(self.store, node)
        if info is None or not info.address:
            raise Unavailable(
                f"node {node} of container {container.name} is not ready (its agent holds no "
                "lease in etcd): the container cannot be reached until the node is back",
                reason="NODE_UNREACHABLE",
                metadata={"node_id": node, "container_id": container.id},
            )
        return info.address

    # Run ---------------------------------------------------------------------------------

    async def run(
        self,
        config: ContainerConfig,
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        constraints: Iterable[str] = (),
        principal: Principal | None = None,
        recording: Recording[DesiredContainer] | None = None,
    ) -> DesiredContainer:
        """Place a container and record it as desired running, in one transaction per try
        (with the call's response when a request_id's `recording` is given). PermissionDenied
        (HOST_ACCESS_DENIED) when its spec needs host access the principal lacks; nothing is
        written then."""
        config = copy.deepcopy(config)
        validate(config)
        principal = principal or current_principal()
        stamps = {"host_access_by": admit(config, principal), "changed_by": principal.name}
        texts = list(constraints)
        # A zero request means the container's limit, as Placement.request says.
        request = Request(
            cpu_millis=cpu_millis or config.cpu_millis,
            memory_bytes=memory_bytes or config.memory_bytes,
            constraints=parse_constraints(texts),
            image_layers=await self.image_layers(config.image),
            ports=[p for p in config.ports if p.host_port],
        )
        if config.name:
            await self._check_name(config.name)
        for _ in range(RUN_ATTEMPTS):
            # NotFound for a secret that does not exist; the commit fails if one goes meanwhile.
            guards = await secret_guards(self.store, [config])
            # NotFound for a network that does not exist; the commit fails if it goes.
            guards += await network_guards(self.store, [config])
            # PORT_ALLOCATED for a port a service publishes; the commit fails if one claims it.
            guards += await run_guards(self.store, config.ports)
            pending = _Pending(config, request, texts, stamps, guards, recording)
            self._queue.append(pending)
            async with self._placing:
                while not pending.outcome.done():
                    # This caller commits every run queued meanwhile with its own. Shielded: a
                    # caller that goes away does not leave the others' outcomes unknown.
                    await asyncio.shield(self._place_batch(self._take_batch()))
            desired, learned = await pending.outcome
            if desired is not None:
                return desired
            if not learned:
                # Lost a race (another instance's placement on that node): spread.
                await asyncio.sleep(random.uniform(0, 0.05))
        raise Aborted("too many concurrent placements; try again")

    def _take_batch(self) -> list[_Pending]:
        """The queued runs, oldest first, that one placement transaction can hold."""
        batch: list[_Pending] = []
        used = 0
        while self._queue:
            cost = RUN_TXN_OPS + len(self._queue[0].guards)
            if batch and used + cost > MAX_TXN_OPS:
                break
            batch.append(self._queue.pop(0))
            used += cost
        return batch

    async def _place_batch(self, batch: list[_Pending]) -> None:
        """Place the runs queued together on the watched view, each accounting for those
        before it, and commit them in one transaction: a burst of runs costs a few commits,
        not one each in turn. A run no node fits on the view is placed alone on a fresh
        listing (`_place_once`); a refused batch is tried again run by run by its callers.
        Every run of the batch gets its outcome, an error (etcd unreachable) included."""
        try:
            await self._place_batch_once(batch)
        except BaseException as exc:
            for pending in batch:
                pending.fail(exc)
            if not isinstance(exc, Exception):
                raise

    async def _place_batch_once(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        view = await self.node_cache.current()
        nodes = {v.id: v for v in view.node_views()}
        placed: list[tuple[_Pending, DesiredContainer]] = []
        alone: list[_Pending] = []
        for pending in batch:
            name = pending.config.name or f"berth_{secrets.token_hex(4)}"
            if any(d.name == name for _, d in placed):
                pending.fail(name_in_use(name))
                continue
            try:
                node = place(nodes.values(), pending.request)
            except FailedPrecondition:
                alone.append(pending)
                continue
            desired = pending.record(name, node.id)
            # The next run of the batch sees this one's reservation (a copy: the view's own
            # NodeViews are shared).
            nodes[node.id] = dataclasses.replace(
                node,
                allocated_cpu_millis=node.allocated_cpu_millis + desired.cpu_millis,
                allocated_memory_bytes=node.allocated_memory_bytes + desired.memory_bytes,
                container_count=node.container_count + 1,
                ports=(*node.ports, *pending.request.ports),
            )
            placed.append((pending, desired))
        if placed:
            ok = await self._commit_placements(
                [d for _, d in placed],
                view,
                [g for p, _ in placed for g in p.guards],
                [(p.recording, d) for p, d in placed if p.recording is not None],
            )
            metrics.PLACEMENTS.labels("placed" if ok else "conflict").inc(len(placed))
            elapsed = time.monotonic() - started
            learned = False
            if not ok:
                learned = await self.node_cache.refresh(
                    {k for _, d in placed for k in node_keys(d.node)}
                )
            for pending, desired in placed:
                metrics.SCHEDULING_SECONDS.observe(elapsed)
                if ok:
                    pending.done(desired)
                elif pending.config.name:
                    # A name another instance took meanwhile fails that run alone.
                    try:
                        await self._check_name(pending.config.name)
                    except AlreadyExists as exc:
                        pending.fail(exc)
                        continue
                    pending.done(None, learned)
                else:
                    pending.done(None, learned)
        for pending in alone:
            try:
                desired, learned = await self._place_once(
                    pending.config,
                    pending.request,
                    pending.texts,
                    pending.stamps,
                    pending.guards,
                    pending.recording,
                )
            except BerthError as exc:
                pending.fail(exc)
                continue
            pending.done(desired, learned)

    async def _check_name(self, name: str) -> None:
        """AlreadyExists when the name is claimed (one point read: the claim, not a scan)."""
        if await self.store.get(name_key(name)) is not None:
            raise name_in_use(name)

    async def _place_once(
        self,
        config: ContainerConfig,
        request: Request,
        texts: list[str],
        stamps: dict[str, str] | None = None,
        guards: Iterable[Compare] = (),
        recording: Recording[DesiredContainer] | None = None,
    ) -> tuple[DesiredContainer | None, bool]:
        """One try: choose a node on the watched view of the nodes and commit. (None, learned)
        when the commit lost a race; `learned`: reading the keys it compared changed the view
        (it lagged), so the next try can go at once. `stamps`: the record's host_access_by and
        changed_by."""
        started = time.monotonic()
        view = await self.node_cache.current()
        # Unique in practice; the commit's compare on the claim is what makes it so.
        name = config.name or f"berth_{secrets.token_hex(4)}"
        try:
            node = place(view.node_views(), request)
        except FailedPrecondition:
            # The refusal is confirmed on the nodes read now: the watched view may not have
            # seen a node join or a reservation go yet.
            view = await self.node_cache.fresh()
            try:
                node = place(view.node_views(), request)
            except FailedPrecondition:
                metrics.PLACEMENTS.labels("unschedulable").inc()
                raise
        desired = DesiredContainer(
            id=secrets.token_hex(32),
            name=name,
            node=node.id,
            config=dataclasses.replace(config, name=name),
            cpu_millis=request.cpu_millis,
            memory_bytes=request.memory_bytes,
            constraints=texts,
            **(stamps or {}),
        )
        recordings = [(recording, desired)] if recording is not None else []
        placed = await self._commit_placements([desired], view, guards, recordings)
        metrics.SCHEDULING_SECONDS.observe(time.monotonic() - started)
        metrics.PLACEMENTS.labels("placed" if placed else "conflict").inc()
        if placed:
            return desired, False
        # What refused it: the node's keys as the view held them, or the name.
        learned = await self.node_cache.refresh(node_keys(node.id))
        if config.name:
            await self._check_name(config.name)
        return None, learned

    async def _commit_placements(
        self,
        placed: list[DesiredContainer],
        view: ClusterView,
        guards: Iterable[Compare] = (),
        recordings: list[tuple[Recording[DesiredContainer], DesiredContainer]] | None = None,
    ) -> bool:
        """Record the containers and their reservations in one transaction, if each chosen
        node is still as `view` saw it: registered (the same lease), of the same availability,
        with the same allocation; with them the responses of the runs' request_ids."""
        deltas: dict[str, list[int]] = {}
        ports: dict[str, list[str]] = {}
        for desired in placed:
            delta = deltas.setdefault(desired.node, [0, 0, 0])
            delta[0] += desired.cpu_millis
            delta[1] += desired.memory_bytes
            delta[2] += 1
            ports.setdefault(desired.node, []).extend(reserved(desired.config.ports))
        allocations = {
            node: allocation_after(view.allocation(node), *delta, ports[node])
            for node, delta in deltas.items()
        }
        compares = [
            self.store.unchanged(key, view.revision(key))
            for node in deltas
            for key in node_keys(node)
        ]
        ops = []
        for desired in placed:
            compares += [
                CONTAINERS.absent(self.store, desired.id),
                self.store.absent(name_key(desired.name)),
            ]
            ops += [
                *op_put_desired(self.store, desired),
                self.store.op_put(name_key(desired.name), desired.id.encode()),
            ]
        ops += [self.store.op_put(allocation_key(n), a) for n, a in allocations.items()]
        recordings = recordings or []
        try:
            ok, revision = await self.store.txn_at(
                [*compares, *guards], ops + [r.op(d) for r, d in recordings]
            )
        except LeaseNotFound:
            # etcd lost the responses' lease: place without them; each call puts its own.
            for recording, _ in recordings:
                recording.lease_lost()
            recordings = []
            ok, revision = await self.store.txn_at([*compares, *guards], ops)
        if ok:
            for recording, _ in recordings:
                recording.committed()
            # The next placement here sees these reservations before the watch brings them.
            for node, allocation in allocations.items():
                self.node_cache.written(allocation_key(node), encode(allocation), revision)
        return bool(ok)

    # Lifecycle -----------------------------------------------------------------------------

    async def _set_desired(
        self,
        ref: str,
        state: str,
        stop_grace: float | None = None,
        retry: bool = False,
        principal: Principal | None = None,
    ) -> tuple[ContainerView, float | None]:
        """Set a container's desired state (and the grace its node gives it when it stops it;
        with `retry`, a new attempt: its node tries again what it failed or what exited);
        returns it and its status's `started_at` before."""
        for _ in range(RUN_ATTEMPTS):
            view = await self.inspect(ref)
            found = await CONTAINERS.read(self.store, view.id)
            if found is None:
                raise container_not_found(ref)
            before = copy.deepcopy(found.record)
            view.desired = found.record
            view.desired.desired = state
            view.desired.stop_grace = stop_grace
            view.desired.changed_by = (principal or current_principal()).name
            if retry:
                view.desired.attempt += 1
            ok, _ = await self.store.txn(
                [CONTAINERS.unchanged(self.store, view.id, found.mod_revision)],
                op_put_desired(self.store, view.desired, before),
            )
            if ok:
                return view, view.status.started_at if view.status else None
        raise Aborted(f"container {ref} is changing concurrently; try again")

    async def stop(self, ref: str, timeout: float | None = None) -> ContainerView:
        """Desired stopped, then wait until the node reports it exited (`timeout`: seconds
        between SIGTERM and SIGKILL; None: the node's default, 10)."""
        view, _ = await self._set_desired(ref, STOPPED, timeout)
        if view.status is not None and view.state in ("created", "running", "restarting"):
            grace = (DEFAULT_STOP_SECONDS if timeout is None else timeout) + STOP_SLACK_SECONDS
            view.status = await self._wait_status(
                view,
                lambda s: s is None or s.state not in ("running", "restarting"),
                grace,
                "stop",
            )
        return view

    async def start(self, ref: str) -> ContainerView:
        """Desired running with a new attempt, then wait until the node (re)started it.
        FailedPrecondition when the node reports it failed to create or start it again."""
        current = await self.inspect(ref)
        if current.desired.desired == RUNNING and current.state == "running":
            return current  # nothing to do, as `docker start` of a running container
        view, started_before = await self._set_desired(ref, RUNNING, retry=True)
        attempt = view.desired.attempt

        def done(s: ContainerStatus | None) -> bool:
            if s is None:
                return False
            if s.started_at not in (None, started_before) and s.state != "create_failed":
                return True
            return s.attempt >= attempt and (
                s.create_failed or (s.state == "exited" and s.failure_reason == START_FAILED)
            )

        view.status = await self._wait_status(view, done, START_TIMEOUT_SECONDS, "start")
        if view.status is not None and view.status.create_failed:
            raise cannot_create(view, view.status)
        if view.status is not None and view.status.failure_reason == START_FAILED:
            raise FailedPrecondition(
                f"container {view.name} failed to start on node {view.desired.node}: "
                f"{view.status.failure_message}",
                reason="CONTAINER_START_FAILED",
                metadata={
                    "container_id": view.id,
                    "node_id": view.desired.node,
                    "failure_reason": START_FAILED,
                },
            )
        return view

    async def created(self, view: ContainerView) -> ContainerView:
        """The container once its node has created it (a follow of its logs then misses
        nothing); FailedPrecondition when the node reports it cannot create it."""
        if view.status is None or not view.status.state:
            view.status = await self._wait_status(
                view,
                lambda s: s is not None and bool(s.state),
                START_TIMEOUT_SECONDS,
                "creation",
            )
        if view.status is not None and view.status.create_failed:
            raise cannot_create(view, view.status)
        return view

    async def wait(
        self, ref: str, watching: Callable[[], Awaitable[None]] | None = None
    ) -> ContainerStatus:
        """Block until the container exits; its final status (exit_code, oom_killed).
        FailedPrecondition at once when its node reports it cannot create it. `watching` is
        awaited once the wait sees every later change (a caller may then stop it)."""
        view = await self.inspect(ref)
        # No status yet means the node has not created it yet; only a deleted status (the
        # container was removed) ends the wait without an exit.
        status = await self._wait_status(
            view,
            lambda s: s is not None and (s.state == "exited" or s.create_failed),
            None,
            "exit",
            deletion_ends=True,
            watching=watching,
        )
        if status is None:
            raise NotFound(
                f"container {view.name} was removed before it exited",
                reason="CONTAINER_NOT_FOUND",
                metadata={"container": view.id},
                resource=("container", view.id),
            )
        if status.create_failed:
            raise cannot_create(view, status)
        return status

    async def remove(self, ref: str, force: bool = False) -> None:
        """Delete the record and release its reservation in one transaction, then wait until
        the node removed the container (its status key goes with it)."""
        for _ in range(RUN_ATTEMPTS):
            view = await self.inspect(ref)
            if view.active and not force:
                raise FailedPrecondition(
                    f"container {view.name} is running: stop it first or remove with force",
                    reason="CONTAINER_RUNNING",
                    metadata={"container_id": view.id},
                )
            found = await CONTAINERS.read(self.store, view.id)
            if found is None:
                raise container_not_found(ref)
            desired = found.record
            alloc = await self.store.get(allocation_key(desired.node))
            node_ready = await NODES.get(self.store, desired.node) is not None
            released = allocation_after(
                alloc.json() if alloc else None,
                -desired.cpu_millis,
                -desired.memory_bytes,
                -1,
                remove_ports=reserved(desired.config.ports),
            )
            ops = [
                *op_delete_desired(self.store, desired),
                self.store.op_delete(name_key(desired.name)),
                self.store.op_put(allocation_key(desired.node), released),
            ]
            if not node_ready:
                # No agent will remove it (nor its status); one that comes back removes the
                # unassigned container itself.
                ops.append(STATUSES.op_delete(self.store, desired.id))
            ok, _ = await self.store.txn(
                [
                    CONTAINERS.unchanged(self.store, desired.id, found.mod_revision),
                    self.store.unchanged(
                        allocation_key(desired.node), alloc.mod_revision if alloc else 0
                    ),
                ],
                ops,
            )
            if ok:
                if node_ready and view.status is not None:
                    await self._wait_status(
                        view, lambda s: s is None, REMOVE_TIMEOUT_SECONDS, "removal"
                    )
                return
        raise Aborted(f"container {ref} is changing concurrently; try again")

    async def _wait_status(
        self,
        view: ContainerView,
        done: Callable[[ContainerStatus | None], bool],
        timeout: float | None,
        what: str,
        deletion_ends: bool = False,
        watching: Callable[[], Awaitable[None]] | None = None,
    ) -> ContainerStatus | None:
        """Watch a container's status until `done(status)`, or until it is deleted when
        `deletion_ends` (then None); Unavailable on timeout. `watching` is awaited once the
        status is read: the watch from that revision on misses nothing later."""

        async def follow() -> ContainerStatus | None:
            status, revision = await STATUSES.get_at(self.store, view.id)
            if watching is not None:
                await watching()
            while not done(status):
                try:
                    async for change in STATUSES.watch(self.store, revision + 1, id=view.id):
                        status = change.record
                        if done(status) or (status is None and deletion_ends):
                            return status
                    raise Unavailable(f"watch on the status of container {view.name} ended")
                except RevisionCompacted:
                    # The changes in between are compacted away: the status now decides.
                    before = status
                    status, revision = await STATUSES.get_at(self.store, view.id)
                    if status is None and before is not None and deletion_ends:
                        return None
            return status

        try:
            async with asyncio.timeout(timeout):
                return await follow()
        except TimeoutError:
            raise Unavailable(
                f"node {view.desired.node} did not report the {what} of container {view.name} "
                f"within {timeout:.0f}s; the desired state is recorded and the node will "
                "converge when it can"
            ) from None

    # Node availability ----------------------------------------------------------------------

    async def set_availability(
        self, node_id: str, availability: str, principal: Principal | None = None
    ) -> ClusterNode:
        await self.node(node_id)  # NotFound for an unknown node
        changed_by = (principal or current_principal()).name
        await self.store.put_json(
            availability_key(node_id), {"availability": availability, "changed_by": changed_by}
        )
        return await self.node(node_id)

    async def cordon(self, node_id: str) -> ClusterNode:
        return await self.set_availability(node_id, CORDONED)

    async def drain(self, node_id: str) -> ClusterNode:
        # The controller (on the elected instance) moves the node's service replicas away.
        return await self.set_availability(node_id, DRAINED)

    async def activate(self, node_id: str) -> ClusterNode:
        return await self.set_availability(node_id, ACTIVE)


def cannot_create(view: ContainerView, status: ContainerStatus) -> FailedPrecondition:
    """The node reported that it cannot create the container: FAILED_PRECONDITION, reason
    CONTAINER_CREATE_FAILED, the node's reason in metadata `failure_reason`."""
    return FailedPrecondition(
        f"container {view.name} cannot be created on node {view.desired.node}: "
        f"{status.failure_message}",
        reason="CONTAINER_CREATE_FAILED",
        metadata={
            "container_id": view.id,
            "node_id": view.desired.node,
            "failure_reason": status.failure_reason,
        },
        resource=("container", view.id),
    )
