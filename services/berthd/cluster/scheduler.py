"""Placement: which node runs a container. Pure functions over snapshots of the nodes.

Scheduling is filter then score, as in Kubernetes and Swarm:

- filter: a node must be ready, not cordoned, satisfy every constraint and have the requested
  CPU and memory free. Each rejected node gets one reason (the first check it fails, in that
  order), so a failed placement explains itself node by node.
- score: spread (prefer the least allocated node) plus image locality (prefer a node that
  already holds the image's layers), see `score`. Ties go to the node with fewer containers,
  then to the smallest node id, so the same inputs always give the same node.

The caller (the cluster service) takes a snapshot of the nodes, places, and writes the result with
an etcd transaction that fails if a node's allocation changed meanwhile; this module knows nothing
of etcd or gRPC.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from berth.error_details import Violation
from berth.ports import PortBinding, conflicts
from berthd.common.errors import FailedPrecondition, InvalidArgument

# Score weights. Spread ranges over [0, 1] (1 - allocation fraction), so LOCALITY_WEIGHT is the
# allocation difference, in fractions of capacity, that a node holding all of a large image may
# have over a node holding none and still win: 0.3 means "up to 30 points busier".
SPREAD_WEIGHT = 1.0
LOCALITY_WEIGHT = 0.3
# Locality matters in proportion to what it saves: pulling a 5 MiB image takes a moment, pulling
# several GiB takes minutes and fills a disk. Its weight grows linearly with the image size and
# reaches LOCALITY_WEIGHT at this size, so a small image never pulls work onto a busier node.
LOCALITY_FULL_WEIGHT_BYTES = 1 << 30

NODE_ID_KEY = "node.id"
NODE_LABELS_PREFIX = "node.labels."

_CONSTRAINT_RE = re.compile(r"^\s*([^\s=!]+)\s*(==|!=)\s*([^\s=!]+)\s*$")
_CONSTRAINT_HELP = "expected key==value or key!=value, for example zone==a or disk!=hdd"


@dataclass
class NodeView:
    """What placement needs to know about a node, snapshotted from etcd."""

    id: str
    labels: dict[str, str]
    cpus_millis: int
    memory_bytes: int
    allocated_cpu_millis: int
    allocated_memory_bytes: int
    ready: bool
    cordoned: bool
    # Chain id or layer digest -> bytes of that layer the node already holds.
    layer_bytes: dict[str, int] = field(default_factory=dict)
    container_count: int = 0
    # Host ports its containers publish (`run -p`), reserved as CPU and memory are.
    ports: tuple[PortBinding, ...] = ()

    @property
    def free_cpu_millis(self) -> int:
        return self.cpus_millis - self.allocated_cpu_millis

    @property
    def free_memory_bytes(self) -> int:
        return self.memory_bytes - self.allocated_memory_bytes


@dataclass(frozen=True)
class Constraint:
    """A parsed placement constraint: `key==value` or `key!=value` on a node label or node.id."""

    key: str
    op: str
    value: str
    # As the user wrote it (spaces removed), so messages quote what they recognise.
    text: str

    def matches(self, node: NodeView) -> bool:
        actual = node.id if self.key == NODE_ID_KEY else node.labels.get(self.key)
        # A missing label fails `==` and passes `!=`, as in Swarm: "disk!=hdd" means "not known
        # to be hdd".
        return (actual == self.value) == (self.op == "==")

    def __str__(self) -> str:
        return self.text


@dataclass
class Request:
    """What a container asks of its node."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    constraints: list[Constraint] = field(default_factory=list)
    # Layer (chain id or digest, the same keys as NodeView.layer_bytes) -> bytes.
    image_layers: dict[str, int] = field(default_factory=dict)
    # Host ports to publish on the node (`run -p`; host_port 0 reserves nothing).
    ports: list[PortBinding] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cpu_millis < 0 or self.memory_bytes < 0:
            raise InvalidArgument(
                f"resource requests cannot be negative (cpu {self.cpu_millis} millicpus, "
                f"memory {self.memory_bytes} bytes)",
                reason="INVALID_SPEC",
                field="placement.request",
            )

    @property
    def reserves_resources(self) -> bool:
        return self.cpu_millis > 0 or self.memory_bytes > 0

    @property
    def image_bytes(self) -> int:
        return sum(self.image_layers.values())


def _bad_constraint(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_SPEC", field="placement.constraints")


def parse_constraint(text: str) -> Constraint:
    """Parse `key==value` / `key!=value`; `node.labels.key` is a synonym of `key`, `node.id`
    matches the node id. Raises InvalidArgument with the expected form for anything else."""
    match = _CONSTRAINT_RE.match(text)
    if match is None:
        if "=" in text and "==" not in text and "!=" not in text:
            raise _bad_constraint(
                f'invalid placement constraint "{text}": use == or != (a single = is not an '
                f"operator), {_CONSTRAINT_HELP}"
            )
        raise _bad_constraint(f'invalid placement constraint "{text}": {_CONSTRAINT_HELP}')
    written_key, op, value = match.groups()
    key = written_key
    if written_key.startswith(NODE_LABELS_PREFIX):
        key = written_key.removeprefix(NODE_LABELS_PREFIX)
        if not key:
            raise _bad_constraint(
                f'invalid placement constraint "{text}": node.labels. needs a label key, '
                "for example node.labels.zone==a"
            )
    elif written_key.startswith("node.") and written_key != NODE_ID_KEY:
        # Swarm also knows node.hostname, node.role...; refusing them beats never matching.
        raise _bad_constraint(
            f'unsupported placement constraint key "{written_key}" in "{text}": use node.id, '
            "node.labels.<key> or a label key"
        )
    return Constraint(key=key, op=op, value=value, text=f"{written_key}{op}{value}")


def parse_constraints(texts: Iterable[str]) -> list[Constraint]:
    return [parse_constraint(text) for text in texts]


def format_bytes(n: int) -> str:
    """512MiB, 1.5GiB: binary units like Docker's -m flag."""
    value = float(max(n, 0))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f}".removesuffix(".0") + unit
        value /= 1024
    return f"{value:.1f}".removesuffix(".0") + "TiB"


def format_cpus(millis: int) -> str:
    """0.5 CPUs: the unit of Docker's --cpus flag."""
    cpus = max(millis, 0) / 1000
    return f"{cpus:g} CPU" + ("" if cpus == 1 else "s")


@dataclass(frozen=True)
class Rejection:
    """Why a node cannot take a request. Nodes with the same `reason` are counted together in
    the aggregated message; for a resource, `need` and `free` say by how much it missed."""

    reason: str
    need: int = 0
    free: int = 0
    unit: Callable[[int], str] | None = field(default=None, compare=False)

    def describe(self, free_note: str = "") -> str:
        if self.unit is None:
            return self.reason
        free = f"{self.unit(self.free)}{free_note}"
        return f"{self.reason} (need {self.unit(self.need)}, free {free})"

    def __str__(self) -> str:
        return self.describe()


def _check(node: NodeView, request: Request) -> Rejection | None:
    if not node.ready:
        return Rejection("not ready")
    if node.cordoned:
        return Rejection("cordoned")
    for constraint in request.constraints:
        if not constraint.matches(node):
            return Rejection(f"does not match constraint {constraint}")
    for wanted in request.ports:
        if any(conflicts(wanted, held) for held in node.ports):
            return Rejection(f"port {wanted.shown_ip}:{wanted.host_port} is already allocated")
    if request.memory_bytes > node.free_memory_bytes:
        return Rejection(
            "insufficient memory", request.memory_bytes, node.free_memory_bytes, format_bytes
        )
    if request.cpu_millis > node.free_cpu_millis:
        return Rejection("insufficient cpu", request.cpu_millis, node.free_cpu_millis, format_cpus)
    return None


def filter_nodes(
    nodes: Iterable[NodeView], request: Request
) -> tuple[list[NodeView], dict[str, Rejection]]:
    """Split nodes into those that can take the request (in id order) and the others, each with
    the first reason it fails (not ready, cordoned, a constraint, memory, cpu)."""
    fit: list[NodeView] = []
    rejections: dict[str, Rejection] = {}
    for node in sorted(nodes, key=lambda n: n.id):
        rejection = _check(node, request)
        if rejection is None:
            fit.append(node)
        else:
            rejections[node.id] = rejection
    return fit, rejections


def unavailable_message(total: int, rejections: dict[str, Rejection]) -> str:
    """One sentence for all rejected nodes, like Kubernetes: "0/3 nodes are available: 2
    insufficient memory (need 512MiB, free 256MiB on the best), 1 does not match constraint
    zone==a". Largest groups first; for a resource, the free amount is the best node's."""
    if total == 0:
        return "0/0 nodes are available: no node has joined the cluster"
    groups: dict[str, list[Rejection]] = {}
    for rejection in rejections.values():
        groups.setdefault(rejection.reason, []).append(rejection)
    parts = []
    for members in sorted(groups.values(), key=lambda group: (-len(group), group[0].reason)):
        best = max(members, key=lambda r: r.free)
        note = " on the best" if len(members) > 1 else ""
        parts.append(f"{len(members)} {best.describe(note)}")
    return f"{total - len(rejections)}/{total} nodes are available: " + ", ".join(parts)


def unsuitable(message: str, total: int, rejections: dict[str, Rejection]) -> FailedPrecondition:
    """The scheduler's refusal: FAILED_PRECONDITION, reason NO_SUITABLE_NODE (PORT_ALLOCATED
    when every node the constraints allow has the port taken), one NODE_UNSUITABLE violation
    per node (subject "node/<id>") saying why it cannot take it."""
    reasons = [r.reason for r in rejections.values()]
    ports = any(r.startswith("port ") for r in reasons) and all(
        r.startswith(("port ", "does not match constraint")) for r in reasons
    )
    return FailedPrecondition(
        message,
        reason="PORT_ALLOCATED" if ports else "NO_SUITABLE_NODE",
        metadata={"nodes": total, "available": total - len(rejections)},
        violations=[
            Violation("NODE_UNSUITABLE", f"node/{node_id}", rejection.describe())
            for node_id, rejection in sorted(rejections.items())
        ],
    )


def _fraction(used: int, capacity: int) -> float:
    if capacity <= 0:
        return 0.0 if used <= 0 else 1.0
    return min(used / capacity, 1.0)


def load(
    node: NodeView, request: Request, nodes: Iterable[NodeView], busiest: int | None = None
) -> float:
    """How busy the node would be with the request, in [0, 1].

    For a request that reserves resources: the mean of the CPU and memory allocation fractions
    after placing it (so capacities of different sizes compare fairly). A request that reserves
    nothing consumes no capacity, so allocation says nothing about it: then the node's container
    count relative to the busiest of `nodes` (Swarm's classic spread) is used instead.
    `busiest`: that count when the caller already knows it (scoring every node must not scan
    every node for each: quadratic in the cluster's size).
    """
    if request.reserves_resources:
        cpu = _fraction(node.allocated_cpu_millis + request.cpu_millis, node.cpus_millis)
        memory = _fraction(node.allocated_memory_bytes + request.memory_bytes, node.memory_bytes)
        return (cpu + memory) / 2
    if busiest is None:
        busiest = max((n.container_count for n in nodes), default=0)
    return node.container_count / busiest if busiest else 0.0


def locality(node: NodeView, request: Request) -> float:
    """Fraction of the image's layer bytes the node already holds, in [0, 1]."""
    total = request.image_bytes
    if total <= 0:
        return 0.0
    held = sum(size for layer, size in request.image_layers.items() if layer in node.layer_bytes)
    return held / total


def locality_weight(request: Request) -> float:
    """LOCALITY_WEIGHT scaled by the image size, full at LOCALITY_FULL_WEIGHT_BYTES."""
    return LOCALITY_WEIGHT * min(request.image_bytes / LOCALITY_FULL_WEIGHT_BYTES, 1.0)


def score(
    node: NodeView, request: Request, nodes: Iterable[NodeView], busiest: int | None = None
) -> float:
    """Higher is better: SPREAD_WEIGHT * (1 - load) + locality_weight * locality.

    Spread keeps nodes evenly used, which leaves room for large containers and limits what a host
    failure takes down. Locality saves a pull, but only as much as the image is worth: a node
    holding all of a 1 GiB image beats one holding none while it is less than 30 points busier,
    and a 10 MiB image shifts the choice by 0.3 points at most.
    """
    spread = 1.0 - load(node, request, nodes, busiest)
    return SPREAD_WEIGHT * spread + locality_weight(request) * locality(node, request)


def _best(fit: list[NodeView], request: Request, nodes: list[NodeView]) -> NodeView:
    busiest = max((n.container_count for n in nodes), default=0)
    return min(fit, key=lambda n: (-score(n, request, nodes, busiest), n.container_count, n.id))


def place(nodes: Iterable[NodeView], request: Request) -> NodeView:
    """The node that should run the request. FailedPrecondition, saying why for every node, when
    none can."""
    nodes = list(nodes)
    fit, rejections = filter_nodes(nodes, request)
    if not fit:
        raise unsuitable(unavailable_message(len(nodes), rejections), len(nodes), rejections)
    return _best(fit, request, nodes)


def place_replicas(
    nodes: Iterable[NodeView],
    request: Request,
    count: int,
    existing: Mapping[str, int] | None = None,
) -> list[NodeView]:
    """Nodes for `count` replicas of the same request, in order (the same node may repeat).

    Each placement is accounted (resources, container count, the image's layers, which the node
    will pull) before the next, on copies: the caller's NodeViews are not changed. Replicas go
    first to the nodes with the fewest replicas of this batch, because replicas on distinct hosts
    are what lets a service survive the loss of one; score decides among those. `existing`
    counts replicas of the same service already on each node, so adding replicas to a running
    service keeps it spread. All or nothing: FailedPrecondition says how many fit and why the
    next did not.
    """
    if count < 0:
        raise InvalidArgument(f"replica count cannot be negative, got {count}")
    nodes = list(nodes)
    originals = {node.id: node for node in nodes}
    working = [dataclasses.replace(node, layer_bytes=dict(node.layer_bytes)) for node in nodes]
    replicas: Counter[str] = Counter(existing or {})
    chosen: list[NodeView] = []
    for index in range(count):
        fit, rejections = filter_nodes(working, request)
        if not fit:
            reason = unavailable_message(len(working), rejections)
            raise unsuitable(
                f"only {index} of {count} replicas fit: {reason}", len(working), rejections
            )
        fewest = min(replicas[node.id] for node in fit)
        best = _best([n for n in fit if replicas[n.id] == fewest], request, working)
        best.allocated_cpu_millis += request.cpu_millis
        best.allocated_memory_bytes += request.memory_bytes
        best.container_count += 1
        best.layer_bytes.update(request.image_layers)
        best.ports = (*best.ports, *request.ports)
        replicas[best.id] += 1
        chosen.append(originals[best.id])
    return chosen
