"""gRPC servicer for berth.cluster.v1: converts messages and calls the cluster core.

Logs, exec and stats stream through to the node agent that owns the container. Service RPCs
write service records (`berthd.cluster.services`); the elected instance's controller moves
replicas. Events are derived from etcd watches (`berthd.cluster.events`), so any instance serves
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import grpc

from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.enums.cluster import (
    AVAILABILITIES,
    DESIRED_STATES,
    ENDPOINT_KINDS,
    EVENT_TYPES,
    FAILURE_ACTIONS,
    NODE_STATES,
    UPDATE_ORDERS,
    UPDATE_STATES,
)
from berth.enums.containers import HEALTH_STATUSES, PORT_PROTOCOLS
from berth.node.v1 import node_pb2
from berth.ports import PublishedPort
from berth.types.v1 import container_pb2
from berth.types.v1 import node_pb2 as types_node_pb2
from berthd.cluster.core import ClusterCore, ClusterNode, ContainerView, Endpoint
from berthd.cluster.events import CONTAINER_CREATE_FAILED, CONTAINER_DIED, EventFilter, watch_events
from berthd.cluster.events import Event as ClusterEvent
from berthd.cluster.rollout import PAUSE, STOP_FIRST, RolloutConfig, update_config
from berthd.cluster.services import ServiceCore, ServiceRecord
from berthd.cluster.stats import StatsEntry, sample_stats
from berthd.cluster.tag_follow import SEMVER, TAG, FollowSpec
from berthd.common.container_messages import container_status, state_filter
from berthd.common.containers import from_spec, to_spec
from berthd.common.errors import InvalidArgument
from berthd.common.idempotency import Recording, once, once_recorded
from berthd.common.messages import duration, enum_name, enum_names, timestamp
from berthd.common.pages import paginate
from berthd.common.rpc.node import NodeApi
from berthd.common.state.containers import ContainerStatus, DesiredContainer
from berthd.common.streaming import session_inputs, session_start

Context = grpc.aio.ServicerContext


def node_message(node: ClusterNode) -> pb.Node:
    record = node.record
    return pb.Node(
        description=types_node_pb2.NodeDescription(
            id=node.id,
            address=node.address,
            labels=node.labels,
            cpus=record.cpus,
            memory_bytes=node.capacity_memory_bytes,
            version=record.version,
            runtime_version=record.runtime_version,
        ),
        state=NODE_STATES.value("ready" if node.ready else "down"),
        availability=AVAILABILITIES.value(node.availability, pb.NODE_AVAILABILITY_UNSPECIFIED),
        capacity=pb.ResourceAmounts(
            cpu_millis=node.capacity_cpu_millis, memory_bytes=node.capacity_memory_bytes
        ),
        allocated=pb.ResourceAmounts(
            cpu_millis=node.allocated_cpu_millis, memory_bytes=node.allocated_memory_bytes
        ),
        container_count=node.container_count,
    )


def status_message(status: ContainerStatus | None) -> container_pb2.ContainerStatus | None:
    """The ContainerStatus a node reported under containers/<id>/status."""
    if status is None:
        return None
    return container_status(
        status.state or "",
        pid=status.pid,
        exit_code=status.exit_code,
        oom_killed=bool(status.oom_killed),
        started_at=status.started_at,
        finished_at=status.finished_at,
        restart_count=status.restart_count,
        created_at=status.created_at,
        failure_reason=status.failure_reason,
        failure_message=status.failure_message,
        network=status.network,
        health=status.health,
    )


def stats_entry(entry: StatsEntry) -> pb.ContainerStatsEntry:
    """One container's sample, or (the `result` oneof) why it has none."""
    message = pb.ContainerStatsEntry(
        container_id=entry.view.id, name=entry.view.name, node_id=entry.view.desired.node
    )
    if entry.error:
        message.error = entry.error
    else:
        message.sample.CopyFrom(entry.sample)
    return message


def container_message(view: ContainerView) -> pb.Container:
    desired = view.desired
    return pb.Container(
        id=desired.id,
        name=desired.name,
        spec=to_spec(desired.config),
        placement=pb.Placement(
            request=pb.ResourceAmounts(
                cpu_millis=desired.cpu_millis, memory_bytes=desired.memory_bytes
            ),
            constraints=desired.constraints,
        ),
        node_id=desired.node,
        desired_state=DESIRED_STATES.value(desired.desired, pb.DESIRED_STATE_STOPPED),
        status=status_message(view.status),
        image_digest=view.status.image_digest if view.status else "",
        service_id=desired.service,
        slot=desired.slot,
        scheduled_at=timestamp(desired.scheduled_at),
        node_state=(
            NODE_STATES.value("ready" if view.node_ready else "down") if desired.node else 0
        ),
    )


def endpoint_message(endpoint: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
        kind=ENDPOINT_KINDS.value(endpoint.kind, pb.ENDPOINT_KIND_UNSPECIFIED),
        instance_id=endpoint.instance,
        address=endpoint.address,
        metrics_url=endpoint.metrics_url,
        version=endpoint.version,
        public_address=endpoint.public_address,
    )


def rollout_from_message(update: pb.UpdateConfig, where: str) -> RolloutConfig:
    config = RolloutConfig(
        parallelism=update.parallelism or 1,
        order=enum_name(UPDATE_ORDERS, update.order, f"{where}.order") or STOP_FIRST,
        failure_action=enum_name(FAILURE_ACTIONS, update.failure_action, f"{where}.failure_action")
        or PAUSE,
        # float32 on the wire: 0.2 arrives as 0.200000003.
        max_failure_ratio=round(update.max_failure_ratio, 6),
    )
    if update.HasField("delay"):
        config.delay_seconds = update.delay.ToTimedelta().total_seconds()
    if update.HasField("monitor"):
        config.monitor_seconds = update.monitor.ToTimedelta().total_seconds()
    return config


def rollout_message(config: RolloutConfig) -> pb.UpdateConfig:
    message = pb.UpdateConfig(
        parallelism=config.parallelism,
        order=UPDATE_ORDERS.value(config.order),
        failure_action=FAILURE_ACTIONS.value(config.failure_action),
        max_failure_ratio=config.max_failure_ratio,
    )
    message.delay.CopyFrom(duration(config.delay_seconds))
    message.monitor.CopyFrom(duration(config.monitor_seconds))
    return message


def record_from_spec(spec: pb.ServiceSpec) -> ServiceRecord:
    update = rollout_from_message(spec.update_config, "spec.update_config")
    record = ServiceRecord(
        id="",
        name=spec.name,
        template=from_spec(spec.template, "spec.template"),
        replicas=spec.replicas,
        cpu_millis=spec.placement.request.cpu_millis,
        memory_bytes=spec.placement.request.memory_bytes,
        constraints=list(spec.placement.constraints),
        labels=dict(spec.labels),
        parallelism=update.parallelism,
        delay_seconds=update.delay_seconds,
        monitor_seconds=update.monitor_seconds,
        update_order=update.order,
        failure_action=update.failure_action,
        max_failure_ratio=update.max_failure_ratio,
        rollback_config=rollout_from_message(spec.rollback_config, "spec.rollback_config"),
        ports=[
            PublishedPort(
                p.target_port,
                p.published_port,
                enum_name(PORT_PROTOCOLS, p.protocol, "spec.endpoint_spec.ports.protocol") or "tcp",
            )
            for p in spec.endpoint_spec.ports
        ],
    )
    record.follow = follow_from_message(spec)
    return record


def follow_from_message(spec: pb.ServiceSpec) -> FollowSpec | None:
    if not spec.HasField("follow"):
        return None
    follow = spec.follow
    if follow.WhichOneof("policy") == "semver":
        return FollowSpec(SEMVER, follow.semver, follow.reference)
    if follow.WhichOneof("policy") == "tag":
        return FollowSpec(TAG, reference=follow.reference)
    raise InvalidArgument(
        "spec.follow sets neither tag nor semver", reason="INVALID_SPEC", field="spec.follow"
    )


def follow_message(follow: FollowSpec) -> pb.FollowPolicy:
    if follow.mode == SEMVER:
        return pb.FollowPolicy(semver=follow.semver, reference=follow.reference)
    return pb.FollowPolicy(tag=pb.FollowTag(), reference=follow.reference)


def spec_message(record: ServiceRecord) -> pb.ServiceSpec:
    spec = pb.ServiceSpec(
        name=record.name,
        template=to_spec(record.template),
        replicas=record.replicas,
        placement=pb.Placement(
            request=pb.ResourceAmounts(
                cpu_millis=record.cpu_millis, memory_bytes=record.memory_bytes
            ),
            constraints=record.constraints,
        ),
        update_config=rollout_message(update_config(record)),
        rollback_config=rollout_message(record.rollback_config),
        labels=record.labels,
        endpoint_spec=pb.EndpointSpec(
            ports=[
                pb.PublishedPort(
                    published_port=p.published_port,
                    target_port=p.target_port,
                    protocol=PORT_PROTOCOLS.value(p.protocol),
                )
                for p in record.ports
            ]
        ),
    )
    if record.follow is not None:
        spec.follow.CopyFrom(follow_message(record.follow))
    return spec


def service_message(record: ServiceRecord, running: int) -> pb.Service:
    previous = None
    if record.previous is not None:
        before = ServiceRecord.from_json(record.to_json())
        before.apply_spec_json(record.previous)
        previous = spec_message(before)
    return pb.Service(
        id=record.id,
        spec=spec_message(record),
        previous_spec=previous,
        version=record.version,
        running_replicas=running,
        update_state=UPDATE_STATES.value(record.update_state, pb.UPDATE_STATE_UNSPECIFIED),
        update_message=record.update_message,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
    )


def event_message(event: ClusterEvent) -> pb.EventsResponse:
    message = pb.EventsResponse(
        type=EVENT_TYPES.value(event.type, pb.EVENT_TYPE_UNSPECIFIED),
        occurred_at=timestamp(event.time),
        message=event.message,
        actor=event.actor,
    )
    if event.family == "node":
        message.node.CopyFrom(
            pb.NodeEvent(
                node_id=event.node_id,
                availability=AVAILABILITIES.value(
                    event.availability, pb.NODE_AVAILABILITY_UNSPECIFIED
                ),
            )
        )
    elif event.family == "service":
        message.service.CopyFrom(
            pb.ServiceEvent(
                service_id=event.service_id,
                name=event.service_name,
                replicas=event.replicas,
                version=event.version,
            )
        )
    else:
        container = pb.ContainerEvent(
            container_id=event.container_id,
            name=event.container_name,
            node_id=event.node_id,
            service_id=event.service_id,
            previous_node_id=event.previous_node_id,
            health_status=HEALTH_STATUSES.value(
                event.health_status, container_pb2.HEALTH_STATUS_UNSPECIFIED
            ),
        )
        if event.type == CONTAINER_DIED:
            container.exit.CopyFrom(
                container_pb2.ProcessExit(exit_code=event.exit_code, oom_killed=event.oom_killed)
            )
        if event.type == CONTAINER_CREATE_FAILED:
            container.failure.CopyFrom(
                container_pb2.ContainerFailure(
                    reason=event.failure_reason, message=event.failure_message
                )
            )
        message.container.CopyFrom(container)
    return message


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, core: ClusterCore) -> None:
        self.core = core
        self.services = ServiceCore(core.store)

    # Nodes ------------------------------------------------------------------------------

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: Context
    ) -> pb.ListNodesResponse:
        enum_name(NODE_STATES, request.state, "state")
        enum_name(AVAILABILITIES, request.availability, "availability")
        nodes = [node_message(n) for n in await self.core.nodes()]
        wanted = dict(request.labels)
        nodes = [
            n
            for n in nodes
            if (not request.state or n.state == request.state)
            and (not request.availability or n.availability == request.availability)
            and wanted.items() <= dict(n.description.labels).items()
        ]
        found, token = paginate("cluster.ListNodes", request, nodes)
        return pb.ListNodesResponse(nodes=found, next_page_token=token)

    async def GetNode(self, request: pb.GetNodeRequest, context: Context) -> pb.GetNodeResponse:
        return pb.GetNodeResponse(node=node_message(await self.core.node(request.node_id)))

    async def CordonNode(
        self, request: pb.CordonNodeRequest, context: Context
    ) -> pb.CordonNodeResponse:
        return pb.CordonNodeResponse(node=node_message(await self.core.cordon(request.node_id)))

    async def DrainNode(
        self, request: pb.DrainNodeRequest, context: Context
    ) -> pb.DrainNodeResponse:
        return pb.DrainNodeResponse(node=node_message(await self.core.drain(request.node_id)))

    async def ActivateNode(
        self, request: pb.ActivateNodeRequest, context: Context
    ) -> pb.ActivateNodeResponse:
        node = await self.core.activate(request.node_id)
        return pb.ActivateNodeResponse(node=node_message(node))

    # Containers -------------------------------------------------------------------------

    async def RunContainer(
        self, request: pb.RunContainerRequest, context: Context
    ) -> pb.RunContainerResponse:
        wanted = request.placement.request
        config = from_spec(request.spec)

        def respond(desired: DesiredContainer) -> pb.RunContainerResponse:
            return pb.RunContainerResponse(container=container_message(ContainerView(desired)))

        async def run(recording: Recording[DesiredContainer] | None) -> DesiredContainer:
            # The response is written with the placement: one etcd write less per call.
            return await self.core.run(
                config,
                cpu_millis=wanted.cpu_millis,
                memory_bytes=wanted.memory_bytes,
                constraints=list(request.placement.constraints),
                recording=recording,
            )

        return await once_recorded(
            self.core.store,
            "cluster.RunContainer",
            request.request_id,
            pb.RunContainerResponse,
            respond,
            run,
        )

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: Context
    ) -> pb.ListContainersResponse:
        views = await self.core.list(
            include_stopped=request.all,
            labels=dict(request.labels),
            name=request.name,
            state=state_filter(request.state),
            node_id=request.node_id,
            service=await self._service_id(request.service),
        )
        found, token = paginate("cluster.ListContainers", request, views)
        return pb.ListContainersResponse(
            containers=[container_message(v) for v in found], next_page_token=token
        )

    async def _service_id(self, ref: str) -> str:
        """The id of the service `ref` names (id, id prefix or name); "" for no filter."""
        if not ref:
            return ""
        record, _ = await self.services.inspect(ref)
        return record.id

    async def GetContainer(
        self, request: pb.GetContainerRequest, context: Context
    ) -> pb.GetContainerResponse:
        view = await self.core.inspect(request.container)
        return pb.GetContainerResponse(container=container_message(view))

    async def StopContainer(
        self, request: pb.StopContainerRequest, context: Context
    ) -> pb.StopContainerResponse:
        timeout = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            if timeout < 0:
                raise InvalidArgument("timeout must not be negative", field="timeout")
        view = await self.core.stop(request.container, timeout)
        return pb.StopContainerResponse(container=container_message(view))

    async def StartContainer(
        self, request: pb.StartContainerRequest, context: Context
    ) -> pb.StartContainerResponse:
        view = await self.core.start(request.container)
        return pb.StartContainerResponse(container=container_message(view))

    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: Context
    ) -> pb.RemoveContainerResponse:
        await self.core.remove(request.container, force=request.force)
        return pb.RemoveContainerResponse()

    async def WaitContainer(
        self, request: pb.WaitContainerRequest, context: Context
    ) -> AsyncIterator[pb.WaitContainerResponse]:
        # Headers go out once the wait watches: a client that waits for them before it stops
        # the container cannot miss the exit.
        status = await self.core.wait(
            request.container, watching=partial(context.send_initial_metadata, ())
        )
        yield pb.WaitContainerResponse(
            exit_code=status.exit_code, oom_killed=bool(status.oom_killed)
        )

    # Streams through to the owning node ----------------------------------------------------

    async def _node(self, view: ContainerView) -> NodeApi:
        """The container's node; its errors name it ("node n1: ...")."""
        return NodeApi(await self.core.node_address(view), node_id=view.desired.node)

    async def ContainerLogs(
        self, request: pb.ContainerLogsRequest, context: Context
    ) -> AsyncIterator[pb.ContainerLogsResponse]:
        view = await self.core.inspect(request.container)
        if request.follow:  # from the first byte, also when its node has not created it yet
            view = await self.core.created(view)
        forward = node_pb2.ContainerLogsRequest(
            container=view.id, follow=request.follow, tail=request.tail
        )
        if request.HasField("since"):
            forward.since.CopyFrom(request.since)
        node = await self._node(view)
        async with contextlib.aclosing(node.stream("ContainerLogs", forward)) as lines:
            async for line in lines:
                yield pb.ContainerLogsResponse(
                    written_at=line.written_at, stream=line.stream, data=line.data
                )

    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Context
    ) -> AsyncIterator[pb.ExecResponse]:
        sessions = self._session("Exec", request_iterator, node_pb2.ExecRequest, created=False)
        async with contextlib.aclosing(sessions) as outputs:
            async for output in outputs:
                yield pb.ExecResponse(output=output)

    async def AttachContainer(
        self, request_iterator: AsyncIterator[pb.AttachContainerRequest], context: Context
    ) -> AsyncIterator[pb.AttachContainerResponse]:
        # A container not created yet (its node still pulls) is waited for, so its output
        # arrives from the first byte, as for a followed ContainerLogs.
        sessions = self._session(
            "AttachContainer", request_iterator, node_pb2.AttachContainerRequest, created=True
        )
        async with contextlib.aclosing(sessions) as outputs:
            async for output in outputs:
                yield pb.AttachContainerResponse(output=output)

    async def _session(
        self,
        method: str,
        requests: AsyncIterator[Any],
        node_request: Callable[..., Any],
        *,
        created: bool,
    ) -> AsyncIterator[container_pb2.ProcessOutput]:
        """Relay an interactive session (Exec, AttachContainer) to the container's node: the
        first message starts it and names the container anywhere in the cluster (the node is
        given its id), every later one is input."""
        asked = await session_start(requests, method)
        view = await self.core.inspect(asked.container)
        if created:
            view = await self.core.created(view)
        start = type(asked)()
        start.CopyFrom(asked)
        start.container = view.id

        async def forward() -> AsyncIterator[Any]:
            yield node_request(start=start)
            async for message in session_inputs(requests, method):
                yield node_request(input=message)

        node = await self._node(view)
        async with contextlib.aclosing(node.stream(method, forward())) as outputs:
            async for out in outputs:
                yield out.output

    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: Context
    ) -> AsyncIterator[pb.ContainerStatsResponse]:
        view = await self.core.inspect(request.container)
        forward = node_pb2.ContainerStatsRequest(container=view.id, stream=request.stream)
        node = await self._node(view)
        async with contextlib.aclosing(node.stream("ContainerStats", forward)) as samples:
            async for sample in samples:
                yield pb.ContainerStatsResponse(
                    container_id=view.id, node_id=view.desired.node, sample=sample.sample
                )

    async def BatchContainerStats(
        self, request: pb.BatchContainerStatsRequest, context: Context
    ) -> pb.BatchContainerStatsResponse:
        entries = await sample_stats(
            self.core, list(request.containers), lambda address, node: NodeApi(address, node)
        )
        return pb.BatchContainerStatsResponse(stats=[stats_entry(e) for e in entries])

    # Services ---------------------------------------------------------------------------

    async def CreateService(
        self, request: pb.CreateServiceRequest, context: Context
    ) -> pb.CreateServiceResponse:
        spec = record_from_spec(request.spec)

        async def create() -> pb.CreateServiceResponse:
            record = await self.services.create(spec)
            return pb.CreateServiceResponse(service=service_message(record, 0))

        return await once(
            self.core.store,
            "cluster.CreateService",
            request.request_id,
            pb.CreateServiceResponse,
            create,
        )

    async def ListServices(
        self, request: pb.ListServicesRequest, context: Context
    ) -> pb.ListServicesResponse:
        wanted = dict(request.labels).items()
        services = [
            (record, running)
            for record, running in await self.services.list()
            if wanted <= record.labels.items()
        ]
        found, token = paginate("cluster.ListServices", request, services)
        return pb.ListServicesResponse(
            services=[service_message(record, running) for record, running in found],
            next_page_token=token,
        )

    async def GetService(
        self, request: pb.GetServiceRequest, context: Context
    ) -> pb.GetServiceResponse:
        record, running = await self.services.inspect(request.service)
        return pb.GetServiceResponse(service=service_message(record, running))

    async def ListServiceReplicas(
        self, request: pb.ListServiceReplicasRequest, context: Context
    ) -> pb.ListServiceReplicasResponse:
        views = await self.services.ps(request.service, include_stopped=request.all)
        found, token = paginate("cluster.ListServiceReplicas", request, views)
        return pb.ListServiceReplicasResponse(
            containers=[container_message(v) for v in found], next_page_token=token
        )

    async def ScaleService(
        self, request: pb.ScaleServiceRequest, context: Context
    ) -> pb.ScaleServiceResponse:
        record = await self.services.scale(request.service, request.replicas)
        _, running = await self.services.inspect(record.id)
        return pb.ScaleServiceResponse(service=service_message(record, running))

    async def UpdateService(
        self, request: pb.UpdateServiceRequest, context: Context
    ) -> pb.UpdateServiceResponse:
        if request.rollback:
            if request.HasField("spec"):
                raise InvalidArgument(
                    "a rollback takes no spec: it returns to the previous one",
                    reason="INVALID_SPEC",
                    field="spec",
                )
            record = await self.services.rollback(request.service, expected_version=request.version)
        else:
            spec = record_from_spec(request.spec)
            record = await self.services.update(request.service, spec, request.version)
        _, running = await self.services.inspect(record.id)
        return pb.UpdateServiceResponse(service=service_message(record, running))

    async def RemoveService(
        self, request: pb.RemoveServiceRequest, context: Context
    ) -> pb.RemoveServiceResponse:
        await self.services.remove(request.service)
        return pb.RemoveServiceResponse()

    # Events -------------------------------------------------------------------------------

    async def Events(
        self, request: pb.EventsRequest, context: Context
    ) -> AsyncIterator[pb.EventsResponse]:
        wanted = EventFilter(
            types=set(enum_names(EVENT_TYPES, request.types, "types")),
            node_id=request.node_id,
            container=request.container,
            service=request.service,
        )
        # Headers go out once the stream watches, so a client can wait for them before it
        # makes the change it wants to see.
        watching = partial(context.send_initial_metadata, ())
        async for event in watch_events(self.core.store, wanted, watching):
            yield event_message(event)

    # Discovery ----------------------------------------------------------------------------

    async def GetEndpoints(
        self, request: pb.GetEndpointsRequest, context: Context
    ) -> pb.GetEndpointsResponse:
        enum_names(ENDPOINT_KINDS, request.kinds, "kinds")
        kinds = set(request.kinds)
        endpoints = [endpoint_message(e) for e in await self.core.endpoints()]
        endpoints = [e for e in endpoints if not kinds or e.kind in kinds]
        endpoints.sort(key=lambda e: (e.kind, e.instance_id))
        return pb.GetEndpointsResponse(endpoints=endpoints)
