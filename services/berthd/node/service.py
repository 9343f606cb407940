"""gRPC servicer for berth.node.v1: converts messages and calls the node agent's core."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from berth.enums.containers import LOG_STREAMS
from berth.enums.node import CHANGE_KINDS, LAYER_STATES
from berth.node.v1 import node_pb2 as pb
from berth.node.v1 import node_pb2_grpc
from berth.types.v1 import container_pb2, node_pb2, types_pb2
from berthd.common.container_messages import container_status, state_filter
from berthd.common.containers import from_spec, to_spec
from berthd.common.errors import InvalidArgument
from berthd.common.messages import timestamp
from berthd.common.streaming import Done, progress_stream
from berthd.node.agent import NodeAgent
from berthd.node.layers import ImageRecord
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
            error=record.error,
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
                    layer=item.layer_digest,
                    state=LAYER_STATES.value(item.state),
                    current=item.current,
                    total=item.total,
                )

    async def ListImages(
        self, request: pb.ListImagesRequest, context: Context
    ) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=[image(i) for i in self.agent.images.list()])

    async def RemoveImage(
        self, request: pb.RemoveImageRequest, context: Context
    ) -> pb.RemoveImageResponse:
        return pb.RemoveImageResponse(deleted_layers=await self.agent.remove_image(request.image))

    async def CreateContainer(
        self, request: pb.CreateContainerRequest, context: Context
    ) -> pb.CreateContainerResponse:
        record = await self.agent.containers.create(from_spec(request.spec))
        return pb.CreateContainerResponse(container=container(record))

    async def StartContainer(
        self, request: pb.StartContainerRequest, context: Context
    ) -> pb.StartContainerResponse:
        record = await self.agent.containers.start(request.container)
        return pb.StartContainerResponse(container=container(record))

    async def StopContainer(
        self, request: pb.StopContainerRequest, context: Context
    ) -> pb.StopContainerResponse:
        if request.timeout_seconds < 0:
            raise InvalidArgument("timeout must not be negative")
        record = await self.agent.containers.stop(request.container, request.timeout_seconds)
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
        return pb.ListContainersResponse(containers=[container(r) for r in records])

    async def InspectContainer(
        self, request: pb.InspectContainerRequest, context: Context
    ) -> pb.InspectContainerResponse:
        record = self.agent.containers.resolve(request.container)
        return pb.InspectContainerResponse(container=container(record))

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
                time=ts,
                stream=LOG_STREAMS.value(line.stream, container_pb2.LOG_STREAM_STDOUT),
                data=line.data,
            )

    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: Context
    ) -> AsyncIterator[pb.ExecResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("process"):
            raise InvalidArgument("the first Exec message must carry the process")
        spec = first.process
        proc = await self.agent.exec(
            spec.container, list(spec.command), list(spec.env), spec.working_dir, spec.user
        )
        outputs: asyncio.Queue[pb.ExecResponse | None] = asyncio.Queue()

        async def pump(stream: asyncio.StreamReader | None, field: str) -> None:
            while stream is not None and (data := await stream.read(65536)):
                await outputs.put(pb.ExecResponse(**{field: data}))
            await outputs.put(None)

        async def feed() -> None:
            assert proc.stdin is not None
            message: pb.ExecRequest | None = first
            try:
                while message is not None:
                    if message.stdin:
                        proc.stdin.write(message.stdin)
                        await proc.stdin.drain()
                    if message.close_stdin:
                        break
                    message = await anext(aiter(request_iterator), None)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                proc.stdin.close()

        tasks = [
            asyncio.create_task(pump(proc.stdout, "stdout")),
            asyncio.create_task(pump(proc.stderr, "stderr")),
            asyncio.create_task(feed()),
        ]
        try:
            open_streams = 2
            while open_streams:
                item = await outputs.get()
                if item is None:
                    open_streams -= 1
                else:
                    yield item
            code = await proc.wait()
            yield pb.ExecResponse(exited=True, exit_code=code if code >= 0 else 128 - code)
        finally:
            for task in tasks:
                task.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: Context
    ) -> AsyncIterator[pb.ContainerStatsResponse]:
        async for sample in self.agent.stats(request.container, request.stream):
            yield pb.ContainerStatsResponse(
                sample=container_pb2.ContainerStats(
                    time=timestamp(sample.time),
                    cpu_nanos=sample.cpu_nanos,
                    cpu_percent=sample.cpu_percent,
                    memory_bytes=sample.memory_bytes,
                    memory_limit_bytes=sample.memory_limit_bytes,
                    pids=sample.pids,
                )
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
