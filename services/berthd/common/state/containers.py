"""Cluster containers: what the cluster wants (desired) and what their node observes (status).

The contract between the cluster service and the node agents (docs/etcd.md). Keys, relative
to the store prefix:

    cluster/containers/<id>     DesiredContainer. Written by the cluster only (placement,
                                start/stop, removal, the controller), always in transactions
                                that compare the record's revision and move the node's
                                allocation with it. Read by the node agents (each converges on
                                the records naming it) and the image service (which images
                                containers use).
    containers/<id>/status      ContainerStatus. Written by the node running the container
                                (and deleted by it on removal); read by the cluster. The one
                                exception: the cluster deletes it, in the transaction that
                                deletes the desired record, when the container's node is not
                                ready (no agent is there to do it).
    cluster/assignments/<node>/<id> Empty. The per-node index of the desired records: put in
                                the same transaction as every write of a record (so its mod
                                revision is the record's) and deleted with it. A node agent
                                watches only its own `cluster/assignments/<node>/` and reads
                                the records it names by key: other nodes' writes never wake it.
    cluster/assignments-ready   Written once by the cluster's leader when every record has its
                                index key (`berthd.cluster.assignments`, for clusters whose
                                records predate the index); until then agents watch the whole
                                `cluster/containers/` family.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from berthd.common.containers import ContainerConfig, from_dict
from berthd.common.state.family import Family, known_fields
from berthd.common.store import Op, Store, encode

# DesiredContainer.desired
RUNNING = "running"
STOPPED = "stopped"
# ContainerStatus.state of a container its node could not create (no record on the node).
CREATE_FAILED = "create_failed"
# ContainerStatus.failure_reason values (ContainerFailure.reason in the proto).
IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
IMAGE_PULL_FAILED = "IMAGE_PULL_FAILED"
INVALID_SPEC = "INVALID_SPEC"
CREATE_FAILED_REASON = "CREATE_FAILED"
# The node could not get the container's secrets from the cluster.
SECRET_UNAVAILABLE = "SECRET_UNAVAILABLE"
START_FAILED = "START_FAILED"
# The spec needs host access and the record carries no admission stamp (host_access_by).
HOST_ACCESS_DENIED = "HOST_ACCESS_DENIED"
# Label every cluster-managed container carries on its node, so an agent that comes back
# after being declared dead knows which of its containers the cluster may have moved.
MANAGED_LABEL = "berth.cluster.managed"
# Label of a service replica on its node: the service's name. The node's fence and its
# watchdog (which has no desired state, the agent being dead) tell replicas by it.
SERVICE_LABEL = "berth.cluster.service"
# Label of a service replica whose service publishes ports: `8080:80/tcp,...` (the routing
# mesh of every node reads it from the replica's status, ContainerStatus.ingress).
INGRESS_LABEL = "berth.cluster.ingress"


def replica_name(service: str, slot: int, suffix: str = "") -> str:
    """SERVICE.SLOT; SERVICE.SLOT.SUFFIX for the replica a start-first update starts beside
    the slot's old one (which holds SERVICE.SLOT until it goes), as Swarm's container names."""
    return f"{service}.{slot}" + (f".{suffix}" if suffix else "")


def service_of_name(name: str) -> str:
    """The service of a replica's name (service names have no dot); "" for any other name."""
    parts = name.split(".")
    return parts[0] if len(parts) in (2, 3) and parts[0] and parts[1].isdigit() else ""


@dataclass
class DesiredContainer:
    """A container the cluster placed on `node` and wants `desired` (running or stopped)."""

    id: str
    name: str
    node: str
    config: ContainerConfig
    desired: str = RUNNING
    cpu_millis: int = 0
    memory_bytes: int = 0
    constraints: list[str] = field(default_factory=list)
    service: str = ""
    slot: int = 0
    scheduled_at: float = field(default_factory=time.time)
    # Version of its service's spec the replica runs (rolling updates replace older ones).
    service_version: int = 0
    # The node it was moved from when its node was lost or drained (CONTAINER_RESCHEDULED).
    previous_node: str = ""
    # Seconds between SIGTERM and SIGKILL when the node stops it (None: the node's default,
    # 0: kill at once), as the last StopContainer asked.
    stop_grace: float | None = None
    # Incremented by every StartContainer: the node tries again a container it could not
    # create (or that exited on its own) only when this is above the attempt it last made.
    attempt: int = 0
    # Admission: who admitted the host access its spec needs (berthd.common.security.admission);
    # empty when it needs none. A node creates a host-access spec only with this stamp.
    host_access_by: str = ""
    # The principal who last changed the record (`user:alice`; `service:cluster` for the
    # controller's own decisions): the actor of the events it causes.
    changed_by: str = ""
    # When the controller took the replica out of traffic before stopping it (the drain): its
    # node then marks its status withdrawn (the routing mesh drops it) and takes it out of its
    # service's DNS names. 0: it serves.
    withdrawn_at: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> DesiredContainer:
        data: dict[str, Any] = json.loads(raw)
        data["config"] = from_dict(data["config"])
        desired = cls(**known_fields(cls, data))
        # Written before admission and actors (or null): nobody.
        desired.host_access_by = str(desired.host_access_by or "")
        desired.changed_by = str(desired.changed_by or "")
        return desired


@dataclass
class ContainerStatus:
    """What the container's node last observed. `state` is the node's container state
    (created, running, exited, restarting), or CREATE_FAILED when the node could not create
    the container at all (its image does not pull, its user does not exist): then
    `failure_reason` (IMAGE_NOT_FOUND, IMAGE_PULL_FAILED, INVALID_SPEC, CREATE_FAILED,
    HOST_ACCESS_DENIED) and `failure_message` say why. An exited container whose last start
    failed has failure_reason START_FAILED. `attempt` is the DesiredContainer.attempt the node
    acted on."""

    node: str = ""
    name: str = ""
    state: str = ""
    pid: int = 0
    exit_code: int = 0
    oom_killed: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    restart_count: int = 0
    failure_reason: str = ""
    failure_message: str = ""
    image_digest: str = ""
    attempt: int = 0
    created_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    # Where it is on its network while it runs (berthd.node.network.Attachment as JSON:
    # network, network_id, ip_address, prefix_length, gateway, mac_address, ...); {} if none.
    network: dict[str, Any] = field(default_factory=dict)
    # A service replica's ports on the routing mesh (`8080:80/tcp,...`, its label
    # berth.cluster.ingress); "" for any other container. Every node's mesh reads it.
    ingress: str = ""
    # Its health while it runs with a health check (status: starting, healthy or unhealthy;
    # failing_streak; log: the last probes, {start, end, exit_code, output}); {} if none.
    # Written when the status changes, not at every probe.
    health: dict[str, Any] = field(default_factory=dict)
    # Its desired record is withdrawn (DesiredContainer.withdrawn_at): no mesh traffic.
    withdrawn: bool = False

    @property
    def health_status(self) -> str:
        """starting, healthy, unhealthy, or "" without a health check."""
        return str(self.health.get("status", "")) if isinstance(self.health, dict) else ""

    @property
    def create_failed(self) -> bool:
        """The node could not create the container at all; the failure says why."""
        return self.state == CREATE_FAILED

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> ContainerStatus:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a container status is a JSON object")
        status = cls(**known_fields(cls, data))
        # Fields a writer left null read as their zero value.
        status.pid = int(status.pid or 0)
        status.exit_code = int(status.exit_code or 0)
        status.restart_count = int(status.restart_count or 0)
        status.attempt = int(status.attempt or 0)
        status.failure_reason = str(status.failure_reason or "")
        status.failure_message = str(status.failure_message or "")
        status.image_digest = str(status.image_digest or "")
        error = data.get("error")
        if error and not status.failure_message:  # written before failures had a reason
            status.failure_message = str(error)
            status.failure_reason = START_FAILED if status.state else CREATE_FAILED_REASON
            status.state = status.state or CREATE_FAILED
        return status


CONTAINERS: Family[DesiredContainer] = Family(
    "desired container", "cluster/containers/", lambda _id, raw: DesiredContainer.decode(raw)
)
STATUSES: Family[ContainerStatus] = Family(
    "container status", "containers/", lambda _id, raw: ContainerStatus.decode(raw), "/status"
)


# The per-node index of desired records (see the module's docstring).
ASSIGNMENTS = "cluster/assignments/"
ASSIGNMENTS_READY = "cluster/assignments-ready"


def assignments_of(node: str) -> str:
    """The prefix of the node's assignment keys."""
    if not node or "/" in node:
        raise ValueError(f"invalid node id {node!r}")
    return f"{ASSIGNMENTS}{node}/"


def assignment_key(node: str, container_id: str) -> str:
    return assignments_of(node) + CONTAINERS.key(container_id).removeprefix(CONTAINERS.prefix)


def assigned_id(node: str, key: str) -> str | None:
    """The container id of one of the node's assignment keys (None for another key)."""
    prefix = assignments_of(node)
    if not key.startswith(prefix):
        return None
    return CONTAINERS.id_of(CONTAINERS.prefix + key.removeprefix(prefix))


def op_put_desired(
    store: Store, desired: DesiredContainer, before: DesiredContainer | None = None
) -> list[Op]:
    """The writes of a desired record (`before`: the record it replaces, if any): the record
    and its node's assignment key, whose put wakes that node's agent even when only the
    record's desired state or attempt changed; the old node's key when the node changed."""
    ops = [CONTAINERS.op_put(store, desired.id, desired)]
    if desired.node:
        ops.append(store.op_put(assignment_key(desired.node, desired.id), b""))
    if before is not None and before.node and before.node != desired.node:
        ops.append(store.op_delete(assignment_key(before.node, desired.id)))
    return ops


def op_delete_desired(store: Store, desired: DesiredContainer) -> list[Op]:
    """The deletes of a desired record: the record and its assignment key."""
    ops = [CONTAINERS.op_delete(store, desired.id)]
    if desired.node:
        ops.append(store.op_delete(assignment_key(desired.node, desired.id)))
    return ops


async def put_desired(store: Store, desired: DesiredContainer) -> None:
    """Write one desired record with its index key, unguarded (tests and tools; the cluster's
    own writes compare revisions)."""
    before = await CONTAINERS.get(store, desired.id)
    await store.txn([], op_put_desired(store, desired, before))


async def delete_desired(store: Store, desired: DesiredContainer) -> None:
    await store.txn([], op_delete_desired(store, desired))
