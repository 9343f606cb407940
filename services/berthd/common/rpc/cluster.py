"""The cluster service as the other services call it: place, follow and remove containers.

Values come back as the public client's dataclasses (`berth.client.cluster`), converted by the
same functions, so a container reads the same to the CLI and to the builder.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator

import grpc

from berth.client.cluster import ClusterContainer, NodeInfo, cluster_container, node_info
from berth.client.containers import LogLine, log_line
from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc as pb_grpc
from berthd.common.containers import ContainerConfig, to_spec
from berthd.common.errors import Aborted, Unavailable
from berthd.common.rpc.calls import FIRST_BACKOFF, MAX_BACKOFF, ServiceApi

# RunContainer answers ABORTED when placements raced past its retries, or while this request's
# first attempt is still in flight (the same request_id): both pass in a moment.
RUN_ATTEMPTS = 6


class ClusterApi(ServiceApi[pb_grpc.ClusterServiceStub]):
    SERVICE = "cluster"

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.ClusterServiceStub:
        return pb_grpc.ClusterServiceStub(channel)

    async def run(self, config: ContainerConfig) -> ClusterContainer:
        """Place a container and record it as desired to run (`docker run -d`). The request
        carries a request_id, so a retry after a lost answer never runs a second one."""
        request = pb.RunContainerRequest(spec=to_spec(config), request_id=str(uuid.uuid4()))
        delay = FIRST_BACKOFF
        for attempt in range(RUN_ATTEMPTS):
            try:
                reply = await self.unary("RunContainer", request, idempotent=True)
                return cluster_container(reply.container)
            except Aborted:
                if attempt == RUN_ATTEMPTS - 1:
                    raise
                # Jittered, so the runs that raced do not meet again.
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")

    async def inspect(self, container: str) -> ClusterContainer:
        request = pb.GetContainerRequest(container=container)
        reply = await self.unary("GetContainer", request, idempotent=True)
        return cluster_container(reply.container)

    async def node(self, node_id: str) -> NodeInfo:
        request = pb.GetNodeRequest(node_id=node_id)
        return node_info((await self.unary("GetNode", request, idempotent=True)).node)

    async def wait(self, container: str) -> int:
        """The container's exit code, once it exits."""
        request = pb.WaitContainerRequest(container=container)
        # Closed on return, so the call ends now instead of when the generator is collected.
        async with contextlib.aclosing(self.stream("WaitContainer", request)) as replies:
            async for reply in replies:
                return int(reply.exit_code)
        raise Unavailable(f"wait on {container} ended without an exit code")

    async def logs(self, container: str, follow: bool = False) -> AsyncIterator[LogLine]:
        request = pb.ContainerLogsRequest(container=container, follow=follow)
        async with contextlib.aclosing(self.stream("ContainerLogs", request)) as lines:
            async for line in lines:
                yield log_line(line)

    async def list(self, *, name: str = "") -> list[ClusterContainer]:
        """Every container, running or not (whose name contains `name`), all pages."""
        containers: list[ClusterContainer] = []
        token = ""
        while True:
            request = pb.ListContainersRequest(all=True, name=name, page_token=token)
            reply = await self.unary("ListContainers", request, idempotent=True)
            containers += [cluster_container(c) for c in reply.containers]
            token = reply.next_page_token
            if not token:
                return containers

    async def remove(self, container: str, force: bool = False) -> None:
        request = pb.RemoveContainerRequest(container=container, force=force)
        await self.unary("RemoveContainer", request, idempotent=True)
