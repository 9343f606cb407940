"""gRPC servicer for berth.node.v1: converts messages and calls the node agent's core."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from berth.enums.containers import LOG_STREAMS
from berth.enums.node import CHANGE_KINDS
from berth.node.v1 import node_pb2 as pb
from berth.node.v1 import node_pb2_grpc
from berth.types.v1 import container_pb2, node_pb2, types_pb2
from berthd.common.container_messages import container_status, state_filter
from berthd.common.containers import from_spec, to_spec
from berthd.common.errors import InvalidArgument
from berthd.common.messages import progress, timestamp
from berthd.common.pages import paginate
from berthd.common.security.admission import admit
from berthd.common.security.principal import current_principal
from berthd.common.streaming import Done, progress_stream, session_start
from berthd.node.agent import NodeAgent, StatsSample
from berthd.node.attach import attach_container, detach_sequence, exec_session, relay
from berthd.node.layers import ImageRecord
from berthd.node.process_messages import exec_options, inputs, process_output
from berthd.node.records import ContainerRecord

Context = grpc.aio.ServicerContext


def container(record: ContainerRecord) -> pb.Container:
    return pb.Container(
        id=record.id,
        name=record.name,
        spec=to_spec(record.config),
        image_digest=record.image_digest,
        status=container_status(
            record.state,
            pid=record.pid,
            exit_code=record.exit_code,
            oom_killed=record.oom_killed,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            restart_count=record.restart_count,
            failure_reason=(record.failure_reason or "START_FAILED") if record.error else "",
            failure_message=record.error,
            network=record.network,
            health=record.health,
        ),
    )


def image(record: ImageRecord) -> pb.Image:
    return pb.Image(
        digest=record.digest,
        references=record.references,
        config_digest=record.config_digest,
        layers=[
            types_pb2.Descriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size)
            for layer in record.layers
        ],
        chain_ids=record.chain_ids,
        size=record.size,
        pulled_at=timestamp(record.pulled_at),
    )


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def GetNode(self, request: pb.GetNodeRequest, context: Context) -> pb.GetNodeResponse:
        info = await self.agent.describe()
        return pb.GetNodeResponse(
            node=node_pb2.NodeDescription(
                id=info.id,
                address=info.address,
                labels=info.labels,
                cpus=info.cpus,
                memory_bytes=info.memory_bytes,
                version=info.version,
                runtime_version=info.runtime_version,
            )
        )

    async def PullImage(
        self, request: pb.PullImageRequest, context: Context
    ) -> AsyncIterator[pb.PullImageResponse]:
        async for item in progress_stream(lambda report: self.agent.pull(request.image, report)):
            if isinstance(item, Done):
                yield pb.PullImageResponse(image=image(item.result))
            else:
                yield pb.PullImageResponse(
                    progress=progress(
                        item.layer_digest,
                        item.state,
                        current=item.current,
                        total=item.total,
                        unit="bytes",
                    )
                )

    async def ListImages(
        self, request: pb.ListImagesRequest, context: Context
    ) -> pb.ListImagesResponse:
        records = sorted(self.agent.images.list(), key=lambda i: (-i.pulled_at, i.digest))
        found, token = paginate("node.ListImages", request, records)
        return pb.ListImagesResponse(images=[image(i) for i in found], next_page_token=token)

    async def RemoveImage(
        self, request: pb.RemoveImageRequest, context: Context
    ) -> pb.RemoveImageResponse:
        return pb.RemoveImageResponse(deleted_layers=await self.agent.remove_image(request.image))

    async def CreateContainer(
        self, request: pb.CreateContainerRequest, context: Context
    ) -> pb.CreateContainerResponse:
        config = from_spec(request.spec)
        # Admission, as the cluster does: a direct call (an admin, a berth service) needs
        # host:access for a spec with host-level power.
        admit(config, current_principal())
        record = await self.agent.containers.create(config)
        return pb.CreateContainerResponse(container=container(record))

    async def StartContainer(
        self, request: pb.StartContainerRequest, context: Context
    ) -> pb.StartContainerResponse:
        record = await self.agent.containers.start(request.container)
        return pb.StartContainerResponse(container=container(record))

    async def StopContainer(
        self, request: pb.StopContainerRequest, context: Context
    ) -> pb.StopContainerResponse:
        timeout = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            if timeout < 0:
                raise InvalidArgument("timeout must not be negative", field="timeout")
        record = await self.agent.containers.stop(request.container, timeout)
        return pb.StopContainerResponse(container=container(record))

    async def KillContainer(
        self, request: pb.KillContainerRequest, context: Context
    ) -> pb.KillContainerResponse:
        await self.agent.containers.kill(request.container, request.signal or "KILL")
        return pb.KillContainerResponse()

    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: Context
    ) -> pb.RemoveContainerResponse:
        await self.agent.containers.remove(request.container, force=request.force)
        return pb.RemoveContainerResponse()

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: Context
    ) -> pb.ListContainersResponse:
        records = self.agent.containers.list(
            all=request.all,
            labels=dict(request.labels),
            name=request.name,
            state=state_filter(request.state),
        )
        found, token = paginate("node.ListContainers", request, records)
        return pb.ListContainersResponse(
            containers=[container(r) for r in found], next_page_token=token
        )

    async def GetContainer(
        self, request: pb.GetContainerRequest, context: Context
    ) -> pb.GetContainerResponse:
        record = self.agent.containers.resolve(request.container)
        return pb.GetContainerResponse(container=container(record))

    async def WaitContainer(
        self, request: pb.WaitContainerRequest, context: Context
    ) -> AsyncIterator[pb.WaitContainerResponse]:
        record = await self.agent.containers.wait(request.container)
        yield pb.WaitContainerResponse(exit_code=record.exit_code, oom_killed=record.oom_killed)

    async def ContainerLogs(
        self, request: pb.ContainerLogsRequest, context: Context
    ) -> AsyncIterator[pb.ContainerLogsResponse]:
        since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        async for line in self.agent.logs(request.container, request.follow, request.tail, since):
            ts = Timestamp()
            ts.FromDatetime(line.time)
            yield pb.ContainerLogsResponse(
                written_at=ts,
                stream=LOG_STREAMS.value(line.stream, container_pb2.LOG_STREAM_STDOUT),
                data=line.data,
            )

    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Context
    ) -> AsyncIterator[pb.ExecResponse]:
        process = await session_start(request_iterator, "Exec")
        detach_keys = detach_sequence(process.detach_keys, process.tty)
        session = await exec_session(self.agent, exec_options(process))
        events = relay(session, inputs(request_iterator, "Exec"), detach_keys)
        async with contextlib.aclosing(events):
            async for event in events:
                yield pb.ExecResponse(output=process_output(event))

    async def AttachContainer(
        self, request_iterator: AsyncIterator[pb.AttachContainerRequest], context: Context
    ) -> AsyncIterator[pb.AttachContainerResponse]:
        options = await session_start(request_iterator, "AttachContainer")
        session = attach_container(
            self.agent, options.container, logs=options.logs, stdin=options.stdin
        )
        size = options.terminal_size
        if size.rows and size.columns:
            await session.resize(size.rows, size.columns)
        detach_keys = detach_sequence(options.detach_keys, session.tty)
        events = relay(session, inputs(request_iterator, "AttachContainer"), detach_keys)
        async with contextlib.aclosing(events):
            async for event in events:
                yield pb.AttachContainerResponse(output=process_output(event))

    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: Context
    ) -> AsyncIterator[pb.ContainerStatsResponse]:
        async for sample in self.agent.stats(request.container, request.stream):
            yield pb.ContainerStatsResponse(sample=stats_message(sample))

    async def BatchContainerStats(
        self, request: pb.BatchContainerStatsRequest, context: Context
    ) -> pb.BatchContainerStatsResponse:
        samples = await self.agent.stats_many(list(request.containers))
        return pb.BatchContainerStatsResponse(
            stats=[
                pb.ContainerStatsEntry(container_id=container_id, sample=stats_message(sample))
                for container_id, sample in samples
            ]
        )

    async def ContainerChanges(
        self, request: pb.ContainerChangesRequest, context: Context
    ) -> pb.ContainerChangesResponse:
        changes = await self.agent.changes(request.container)
        return pb.ContainerChangesResponse(
            changes=[pb.Change(path=path, kind=CHANGE_KINDS.value(kind)) for path, kind in changes]
        )

    async def ExportLayer(
        self, request: pb.ExportLayerRequest, context: Context
    ) -> pb.ExportLayerResponse:
        result, media_type = await self.agent.export(
            request.container, request.repository, request.pause
        )
        return pb.ExportLayerResponse(
            layer=types_pb2.Descriptor(
                media_type=media_type, digest=result.digest, size=result.size
            ),
            diff_id=result.diff_id,
        )


def stats_message(sample: StatsSample) -> container_pb2.ContainerStats:
    return container_pb2.ContainerStats(
        sampled_at=timestamp(sample.time),
        cpu_usage=Duration(seconds=sample.cpu_nanos // 10**9, nanos=sample.cpu_nanos % 10**9),
        cpu_percent=sample.cpu_percent,
        memory_bytes=sample.memory_bytes,
        memory_limit_bytes=sample.memory_limit_bytes,
        pids=sample.pids,
    )
