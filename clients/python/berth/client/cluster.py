"""Typed client for the cluster service (berth.cluster.v1).

Mirrors NodeClient: plain Python values and dataclasses in and out, gRPC errors as
`BerthClientError`. The container methods take the same arguments as NodeClient's, so code that
lists, stops or follows containers works with either; the cluster's containers also say where
they run (ClusterContainer).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from berth.client.base import GrpcClient
from berth.client.containers import (
    ContainerInfo,
    ContainerStreams,
    all_pages,
    container_fields,
    stats_sample,
    time_of,
)
from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.enums.cluster import (
    AVAILABILITIES,
    DESIRED_STATES,
    ENDPOINT_KINDS,
    EVENT_TYPES,
    NODE_STATES,
    UPDATE_STATES,
)
from berth.enums.containers import HEALTH_STATUSES, PORT_PROTOCOLS
from berth.errors import BerthClientError
from berth.health import HealthConfig
from berth.health import from_proto as health_from_proto
from berth.health import merge as merge_health
from berth.health import to_proto as health_to_proto
from berth.ports import PublishedPort
from berth.rollout import RolloutChanges

# berth.containers (a container's whole configuration, its checks and its proto form) is imported
# by the calls that send or read one: listing, stats or logs need none of it.
if TYPE_CHECKING:
    from berth.containers import ContainerConfig


@dataclass(frozen=True)
class Resources:
    cpu_millis: int  # 1000 = one CPU
    memory_bytes: int


@dataclass(frozen=True)
class NodeInfo:
    id: str
    address: str
    labels: dict[str, str]
    state: str  # ready, down
    availability: str  # active, cordoned, drained
    capacity: Resources
    allocated: Resources
    container_count: int
    version: str
    runtime_version: str


@dataclass
class Placement:
    """Where a container may run: constraints on node labels ("zone==a", "disk!=hdd") and what
    it reserves on its node (0: its limit in its ContainerConfig, if any)."""

    constraints: list[str] = field(default_factory=list)
    cpu_millis: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class ClusterContainer(ContainerInfo):
    """A container with its placement. State "pending" until its node has created it,
    "create_failed" when it could not (`failure_reason` and `error` say why)."""

    node_id: str
    desired_state: str  # running, stopped
    service_id: str
    slot: int  # replica slot from 1; 0 for a standalone container
    placement: Placement
    scheduled_at: datetime | None
    # False while its node is down (its lease expired): the state is the node's last report,
    # which may no longer hold ("Unknown (node down)" in `berth ps`).
    node_ready: bool = True


@dataclass(frozen=True)
class ServiceInfo:
    id: str
    name: str
    image: str
    replicas: int
    running_replicas: int
    version: int
    update_state: str  # "" (never updated), updating, completed, paused
    update_message: str
    template: ContainerConfig  # what each replica runs (its image is `image`)
    placement: Placement
    labels: dict[str, str]
    created_at: datetime | None
    updated_at: datetime | None
    # Ports published on every node through the routing mesh.
    ports: list[PublishedPort] = field(default_factory=list, kw_only=True)
    # What the service follows ("tag" or "semver:RANGE"; "" for nothing) and the `repo:tag`
    # its pinned image (`repo@sha256:...`) was resolved from.
    follow: str = field(default="", kw_only=True)
    followed: str = field(default="", kw_only=True)


def follow_policy(follow: str) -> pb.FollowPolicy:
    """`tag` (the image's own tag) or `semver:RANGE` as a FollowPolicy."""
    if follow == "tag":
        return pb.FollowPolicy(tag=pb.FollowTag())
    kind, colon, text = follow.partition(":")
    if kind != "semver" or not colon:
        raise BerthClientError(
            f'invalid --follow value "{follow}": give no value (follow the image\'s tag) or '
            "semver:RANGE (e.g. semver:~1.4); an image goes after the options",
            "INVALID_ARGUMENT",
        )
    return pb.FollowPolicy(semver=text)


def _follow_text(spec: pb.ServiceSpec) -> str:
    policy = spec.follow.WhichOneof("policy") if spec.HasField("follow") else None
    return "" if policy is None else ("tag" if policy == "tag" else f"semver:{spec.follow.semver}")


@dataclass(frozen=True)
class EndpointInfo:
    kind: str
    instance: str
    address: str
    metrics_url: str
    version: str


@dataclass(frozen=True)
class Event:
    """One cluster event, flattened: the fields of its payload (node, container or service)
    are set, the others empty."""

    type: str  # node_joined, node_lost, container_scheduled, container_started, ...
    occurred_at: datetime | None
    message: str
    node_id: str = ""
    container_id: str = ""
    container_name: str = ""
    service_id: str = ""
    previous_node_id: str = ""
    # container_died: how it exited (None for other events).
    exit_code: int | None = None
    oom_killed: bool = False
    # container_create_failed: why.
    failure_reason: str = ""
    failure_message: str = ""
    # service events: name, replica count and spec version after the event.
    service_name: str = ""
    replicas: int = 0
    version: int = 0
    # health_status: healthy or unhealthy.
    health_status: str = ""
    # node_availability_changed: active, cordoned or drained.
    availability: str = ""
    # Who caused it: `user:<name>`, `node:<id>`, `service:cluster`; "" when nobody did.
    actor: str = ""


# --- conversions ------------------------------------------------------------------------------


def _placement_message(placement: Placement | None) -> pb.Placement:
    p = placement or Placement()
    return pb.Placement(
        request=pb.ResourceAmounts(cpu_millis=p.cpu_millis, memory_bytes=p.memory_bytes),
        constraints=p.constraints,
    )


def _placement(p: pb.Placement) -> Placement:
    return Placement(list(p.constraints), p.request.cpu_millis, p.request.memory_bytes)


def _resources(r: pb.ResourceAmounts) -> Resources:
    return Resources(r.cpu_millis, r.memory_bytes)


def node_info(n: pb.Node) -> NodeInfo:
    d = n.description
    return NodeInfo(
        id=d.id,
        address=d.address,
        labels=dict(d.labels),
        state=NODE_STATES.name(n.state, "unknown"),
        availability=AVAILABILITIES.name(n.availability, "unknown"),
        capacity=_resources(n.capacity),
        allocated=_resources(n.allocated),
        container_count=n.container_count,
        version=d.version,
        runtime_version=d.runtime_version,
    )


def cluster_container(c: pb.Container) -> ClusterContainer:
    fields = container_fields(c)
    if not c.HasField("status") or not c.status.state:
        fields["state"] = "pending"  # placed; its node has not created it yet (pulling)
    scheduled_at = time_of(c, "scheduled_at")
    fields["created_at"] = fields["created_at"] or scheduled_at
    return ClusterContainer(
        **fields,
        node_id=c.node_id,
        desired_state=DESIRED_STATES.name(c.desired_state, "unknown"),
        service_id=c.service_id,
        slot=c.slot,
        placement=_placement(c.placement),
        scheduled_at=scheduled_at,
        node_ready=c.node_state != pb.NODE_STATE_NOT_READY,
    )


def _endpoint_spec(ports: Iterable[PublishedPort]) -> pb.EndpointSpec:
    return pb.EndpointSpec(
        ports=[
            pb.PublishedPort(
                published_port=p.published_port,
                target_port=p.target_port,
                protocol=PORT_PROTOCOLS.value(p.protocol),
            )
            for p in ports
        ]
    )


def _service(s: pb.Service) -> ServiceInfo:
    from berth.containers import from_spec

    return ServiceInfo(
        id=s.id,
        name=s.spec.name,
        image=s.spec.template.image,
        replicas=s.spec.replicas,
        running_replicas=s.running_replicas,
        version=s.version,
        update_state=UPDATE_STATES.name(s.update_state, ""),
        update_message=s.update_message,
        template=from_spec(s.spec.template),
        placement=_placement(s.spec.placement),
        labels=dict(s.spec.labels),
        created_at=time_of(s, "created_at"),
        updated_at=time_of(s, "updated_at"),
        ports=[
            PublishedPort(p.target_port, p.published_port, PORT_PROTOCOLS.name(p.protocol, "tcp"))
            for p in s.spec.endpoint_spec.ports
        ],
        follow=_follow_text(s.spec),
        followed=s.spec.follow.reference,
    )


def event_info(e: pb.EventsResponse) -> Event:
    common = {
        "type": EVENT_TYPES.name(e.type, "unknown"),
        "occurred_at": time_of(e, "occurred_at"),
        "message": e.message,
        "actor": e.actor,
    }
    payload = e.WhichOneof("payload")
    if payload == "node":
        return Event(
            **common,
            node_id=e.node.node_id,
            availability=AVAILABILITIES.name(e.node.availability, ""),
        )
    if payload == "service":
        s = e.service
        return Event(
            **common,
            service_id=s.service_id,
            service_name=s.name,
            replicas=s.replicas,
            version=s.version,
        )
    if payload == "container":
        c = e.container
        return Event(
            **common,
            node_id=c.node_id,
            container_id=c.container_id,
            container_name=c.name,
            service_id=c.service_id,
            previous_node_id=c.previous_node_id,
            exit_code=c.exit.exit_code if c.HasField("exit") else None,
            oom_killed=c.exit.oom_killed,
            failure_reason=c.failure.reason,
            failure_message=c.failure.message,
            health_status=HEALTH_STATUSES.name(c.health_status, ""),
        )
    return Event(**common)


def merge_env(env: list[str], add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
    """env with KEY=VALUE entries set (replacing that key, in place) and keys removed."""

    def key(entry: str) -> str:
        return entry.partition("=")[0]

    dropped = set(remove)
    result = [entry for entry in env if key(entry) not in dropped]
    for entry in add:
        positions = [i for i, old in enumerate(result) if key(old) == key(entry)]
        if positions:
            result[positions[0]] = entry
            for i in reversed(positions[1:]):
                del result[i]
        else:
            result.append(entry)
    return result


# --- the client -------------------------------------------------------------------------------


class ClusterClient(ContainerStreams, GrpcClient):
    SERVICE = "cluster"
    MESSAGES = pb
    OPTION = "--host or BERTH_HOST"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = cluster_pb2_grpc.ClusterServiceStub(self._channel)

    # Nodes ------------------------------------------------------------------------------

    def nodes(self, labels: dict[str, str] | None = None) -> list[NodeInfo]:
        request = pb.ListNodesRequest(labels=labels or {})
        nodes = all_pages(lambda r: self._call(self._stub.ListNodes, r), request, "nodes")
        return [node_info(n) for n in nodes]

    def node(self, node_id: str) -> NodeInfo:
        return node_info(self._call(self._stub.GetNode, pb.GetNodeRequest(node_id=node_id)).node)

    def cordon(self, node_id: str) -> NodeInfo:
        request = pb.CordonNodeRequest(node_id=node_id)
        return node_info(self._call(self._stub.CordonNode, request).node)

    def drain(self, node_id: str) -> NodeInfo:
        """Cordon the node and move its service replicas away; returns at once (follow with
        events(node_id=...): container_rescheduled, then node_drain_completed)."""
        request = pb.DrainNodeRequest(node_id=node_id)
        return node_info(self._call(self._stub.DrainNode, request).node)

    def activate(self, node_id: str) -> NodeInfo:
        request = pb.ActivateNodeRequest(node_id=node_id)
        return node_info(self._call(self._stub.ActivateNode, request).node)

    def _retried(self, method: object, request: object) -> object:
        """A call with a request_id: sent again (up to 3 times) when the cluster could not be
        reached or did not answer in time, so a lost answer never runs the work twice."""
        for attempt in range(3):
            try:
                return self._call(method, request)  # type: ignore[arg-type]
            except BerthClientError as err:
                if attempt == 2 or err.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"):
                    raise
                time.sleep(0.5 * (attempt + 1))  # ABORTED: the first try may still be running
        raise AssertionError("unreachable")

    # Containers -------------------------------------------------------------------------

    def run(
        self, config: ContainerConfig, placement: Placement | None = None, request_id: str = ""
    ) -> ClusterContainer:
        """Place a container and record it as desired to run, like `docker run -d`; its node
        pulls, creates and starts it afterwards (state "pending" until then). The cluster
        validates `config`; call config.validate() first to find a mistake before any call.
        The call carries `request_id` (a new UUID when empty) and is retried with it when the
        answer is lost: never two containers for one call."""
        from berth.containers import to_spec

        request = pb.RunContainerRequest(
            spec=to_spec(config),
            placement=_placement_message(placement),
            request_id=request_id or new_request_id(),
        )
        return cluster_container(self._retried(self._stub.RunContainer, request).container)

    def list(
        self,
        all: bool = False,
        labels: dict[str, str] | None = None,
        *,
        name: str = "",
        node_id: str = "",
        service: str = "",
    ) -> list[ClusterContainer]:
        request = pb.ListContainersRequest(
            all=all, labels=labels or {}, name=name, node_id=node_id, service=service
        )
        containers = all_pages(
            lambda r: self._call(self._stub.ListContainers, r), request, "containers"
        )
        return [cluster_container(c) for c in containers]

    def inspect(self, container: str) -> ClusterContainer:
        request = pb.GetContainerRequest(container=container)
        return cluster_container(self._call(self._stub.GetContainer, request).container)

    def start(self, container: str) -> ClusterContainer:
        request = pb.StartContainerRequest(container=container)
        return cluster_container(self._call(self._stub.StartContainer, request).container)

    def stop(self, container: str, timeout: float | None = None) -> ClusterContainer:
        """SIGTERM, then SIGKILL after `timeout` seconds (None: the node's default, 10; 0:
        SIGKILL at once); returns once its node stopped it."""
        request = pb.StopContainerRequest(container=container)
        if timeout is not None:
            request.timeout.FromNanoseconds(int(timeout * 1e9))
        # The cluster waits for the node to stop it: the grace time plus a margin.
        grace = 10 if timeout is None else timeout
        reply = self._call(self._stub.StopContainer, request, timeout=grace + 30)
        return cluster_container(reply.container)

    def remove(self, container: str, force: bool = False) -> None:
        request = pb.RemoveContainerRequest(container=container, force=force)
        self._call(self._stub.RemoveContainer, request)

    def stats(self, container: str) -> dict[str, float]:
        request = pb.ContainerStatsRequest(container=container, stream=False)
        for reply in self._stream(self._stub.ContainerStats, request):
            return stats_sample(reply.sample)
        raise BerthClientError(f"no stats for {container}", "UNKNOWN")

    def stats_many(self, containers: Iterable[str] = ()) -> list[dict[str, Any]]:
        """One sample of each container (every running one when none is named), in one call:
        the cluster asks every node concerned at once. A container whose node cannot be
        reached comes with an `error` and zero figures."""
        request = pb.BatchContainerStatsRequest(containers=list(containers))
        reply = self._call(self._stub.BatchContainerStats, request)
        return [
            {
                "container_id": e.container_id,
                "name": e.name,
                "node_id": e.node_id,
                "error": e.error,
                **stats_sample(e.sample),
            }
            for e in reply.stats
        ]

    # Services ---------------------------------------------------------------------------

    def create_service(
        self,
        name: str,
        template: ContainerConfig,
        replicas: int = 1,
        placement: Placement | None = None,
        labels: dict[str, str] | None = None,
        request_id: str = "",
        ports: Iterable[PublishedPort] = (),
        update_config: RolloutChanges | None = None,
        rollback_config: RolloutChanges | None = None,
        follow: str = "",
    ) -> ServiceInfo:
        """A service of `replicas` containers made from `template` (each named NAME.SLOT).
        Retried with its request_id (a new UUID when empty) when the answer is lost. `follow`:
        "tag" or "semver:RANGE" (see follow_policy); the cluster pins the image's digest."""
        from berth.containers import to_spec

        spec = pb.ServiceSpec(
            name=name,
            template=to_spec(template),
            replicas=replicas,
            placement=_placement_message(placement),
            labels=labels or {},
            endpoint_spec=_endpoint_spec(ports),
        )
        _apply_rollouts(spec, update_config, rollback_config)
        if follow:
            spec.follow.CopyFrom(follow_policy(follow))
        return self.create_service_spec(spec, request_id)

    def create_service_spec(self, spec: pb.ServiceSpec, request_id: str = "") -> ServiceInfo:
        """A service from a whole ServiceSpec (`stack deploy`), retried as create_service."""
        request = pb.CreateServiceRequest(spec=spec, request_id=request_id or new_request_id())
        return _service(self._retried(self._stub.CreateService, request).service)

    def replace_service(self, service_id: str, spec: pb.ServiceSpec, version: int) -> ServiceInfo:
        """Replace a service's whole spec if it is still at `version` (VERSION_MISMATCH
        otherwise) and roll its replicas to it."""
        request = pb.UpdateServiceRequest(service=service_id, spec=spec, version=version)
        return _service(self._call(self._stub.UpdateService, request).service)

    def service_messages(self, labels: dict[str, str] | None = None) -> list[pb.Service]:
        """The services (with all of `labels`) as the cluster sends them, specs whole."""
        return self._service_messages(labels)

    def services(self, labels: dict[str, str] | None = None) -> list[ServiceInfo]:
        return [_service(s) for s in self._service_messages(labels)]

    def service(self, service: str) -> ServiceInfo:
        return _service(self._service_message(service))

    def _service_message(self, service: str) -> pb.Service:
        request = pb.GetServiceRequest(service=service)
        return self._call(self._stub.GetService, request).service

    def service_ps(self, service: str, all: bool = False) -> list[ClusterContainer]:
        """The service's replicas and their nodes (ListServiceReplicas), like
        `docker service ps`."""
        request = pb.ListServiceReplicasRequest(service=service, all=all)
        replicas = all_pages(
            lambda r: self._call(self._stub.ListServiceReplicas, r), request, "containers"
        )
        return [cluster_container(c) for c in replicas]

    def scale(self, service: str, replicas: int) -> ServiceInfo:
        request = pb.ScaleServiceRequest(service=service, replicas=replicas)
        return _service(self._call(self._stub.ScaleService, request).service)

    def update_service(
        self,
        service: str,
        *,
        image: str | None = None,
        env: Iterable[str] = (),
        env_remove: Iterable[str] = (),
        replicas: int | None = None,
        network: str | None = None,
        network_aliases: list[str] | None = None,
        publish_add: Iterable[PublishedPort] = (),
        publish_rm: Iterable[int] = (),
        health_check: HealthConfig | None = None,
        update_config: RolloutChanges | None = None,
        rollback_config: RolloutChanges | None = None,
        follow: str | None = None,
    ) -> ServiceInfo:
        """`follow`: "tag" or "semver:RANGE" to follow (from `image` when given, else from the
        tag followed now or the template's image), "" to stop following (the pinned digest
        stays), None to leave as is.

        Change some of a service's spec and roll its replicas to it. UpdateService replaces
        the whole spec, so the current one is edited as a message (keeping every field this
        client does not know) and sent with its version: a concurrent change fails rather than
        being overwritten. `network`: none, host or a network's name; `network_aliases`
        replace the replicas' aliases; `health_check`'s set fields replace the current ones
        (a NONE test disables the health check, Docker's --no-healthcheck)."""
        current = self._service_message(service)
        spec = pb.ServiceSpec()
        spec.CopyFrom(current.spec)
        if image is not None:
            spec.template.image = image
            if spec.HasField("follow"):
                # The new image is what is followed from now on, not the tag followed so far.
                spec.follow.reference = ""
        if follow == "":
            spec.ClearField("follow")
        elif follow is not None:
            reference = "" if image is not None else spec.follow.reference
            spec.follow.CopyFrom(follow_policy(follow))
            spec.follow.reference = reference
        if network is not None:
            from berth.containers import set_network

            set_network(spec.template, network)
        if network_aliases is not None:
            del spec.template.network_aliases[:]
            spec.template.network_aliases.extend(network_aliases)
        merged = merge_env(list(spec.template.env), env, env_remove)
        del spec.template.env[:]
        spec.template.env.extend(merged)
        if replicas is not None:
            spec.replicas = replicas
        if health_check is not None:
            spec.template.health_check.CopyFrom(
                health_to_proto(
                    merge_health(health_from_proto(spec.template.health_check), health_check)
                )
            )
        # Docker's --publish-rm names the published port; --publish-add replaces a port's entry.
        added = list(publish_add)
        removed = set(publish_rm) | {p.published_port for p in added if p.published_port}
        kept = [p for p in spec.endpoint_spec.ports if p.published_port not in removed]
        spec.endpoint_spec.CopyFrom(_endpoint_spec([]))
        spec.endpoint_spec.ports.extend(kept)
        spec.endpoint_spec.ports.extend(_endpoint_spec(added).ports)
        _apply_rollouts(spec, update_config, rollback_config)
        request = pb.UpdateServiceRequest(service=current.id, spec=spec, version=current.version)
        return _service(self._call(self._stub.UpdateService, request).service)

    def rollback_service(self, service: str) -> ServiceInfo:
        """Return to the previous spec (`docker service rollback`); FAILED_PRECONDITION
        (NO_PREVIOUS_SPEC) for a service never updated."""
        request = pb.UpdateServiceRequest(service=service, rollback=True)
        return _service(self._call(self._stub.UpdateService, request).service)

    def service_message(self, service: str) -> pb.Service:
        """The service as the cluster sends it: spec, previous spec, update status."""
        return self._service_message(service)

    def remove_service(self, service: str) -> None:
        self._call(self._stub.RemoveService, pb.RemoveServiceRequest(service=service))

    def _service_messages(self, labels: dict[str, str] | None = None) -> list[pb.Service]:
        request = pb.ListServicesRequest(labels=labels or {})
        return all_pages(lambda r: self._call(self._stub.ListServices, r), request, "services")

    # Discovery and events ---------------------------------------------------------------

    def endpoints(self, kinds: Iterable[str] = ()) -> list[EndpointInfo]:
        unknown = [k for k in kinds if k not in ENDPOINT_KINDS]
        if unknown:
            raise BerthClientError(f"unknown endpoint kind {unknown[0]!r}", "INVALID_ARGUMENT")
        request = pb.GetEndpointsRequest(kinds=[ENDPOINT_KINDS.value(k) for k in kinds])
        reply = self._call(self._stub.GetEndpoints, request)
        return [
            EndpointInfo(
                ENDPOINT_KINDS.name(e.kind, "unknown"),
                e.instance_id,
                e.address,
                e.metrics_url,
                e.version,
            )
            for e in reply.endpoints
        ]

    def events(
        self,
        types: Iterable[str] = (),
        *,
        node_id: str = "",
        container: str = "",
        service: str = "",
    ) -> Iterator[Event]:
        """Cluster events as they happen, until the caller stops iterating."""
        unknown = [t for t in types if t not in EVENT_TYPES]
        if unknown:
            raise BerthClientError(f"unknown event type {unknown[0]!r}", "INVALID_ARGUMENT")
        request = pb.EventsRequest(
            types=[EVENT_TYPES.value(t) for t in types],
            node_id=node_id,
            container=container,
            service=service,
        )
        for event in self._stream(self._stub.Events, request):
            yield event_info(event)


def _apply_rollouts(
    spec: pb.ServiceSpec, update: RolloutChanges | None, rollback: RolloutChanges | None
) -> None:
    if update is not None:
        update.apply(spec.update_config)
    if rollback is not None:
        rollback.apply(spec.rollback_config)


def new_request_id() -> str:
    import uuid  # here: it imports `platform`, which every other command would pay for

    return str(uuid.uuid4())
