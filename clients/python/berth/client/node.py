"""Typed client for a node agent (berth.node.v1).

Methods take and return plain Python values and dataclasses; gRPC errors become
`BerthClientError`. Long operations (pull, logs, wait, exec) are iterators or blocking calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from berth.client.base import GrpcClient
from berth.client.containers import (
    ContainerInfo,
    ContainerStreams,
    ExecOutput,
    LogLine,
    all_pages,
    container_fields,
    stats_sample,
)
from berth.containers import ContainerConfig, to_spec
from berth.enums.node import CHANGE_KINDS
from berth.enums.progress import PULL_WORDS
from berth.errors import BerthClientError
from berth.node.v1 import node_pb2 as pb
from berth.node.v1 import node_pb2_grpc

__all__ = ["ContainerInfo", "ExecOutput", "ImageInfo", "LogLine", "NodeClient"]


@dataclass(frozen=True)
class PullProgress:
    layer: str
    state: str  # Docker's wording: "Downloading", "Pull complete", ...
    current: int
    total: int


@dataclass(frozen=True)
class ImageInfo:
    digest: str
    references: list[str]
    config_digest: str
    chain_ids: list[str]
    size: int


def container_info(c: pb.Container) -> ContainerInfo:
    return ContainerInfo(**container_fields(c))


class NodeClient(ContainerStreams, GrpcClient):
    SERVICE = "node"
    MESSAGES = pb

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)

    # Images -----------------------------------------------------------------------------

    def pull(self, image: str, progress: Callable[[PullProgress], None] | None = None) -> ImageInfo:
        for event in self._stream(self._stub.PullImage, pb.PullImageRequest(image=image)):
            if event.HasField("image"):
                i = event.image
                return ImageInfo(
                    i.digest, list(i.references), i.config_digest, list(i.chain_ids), i.size
                )
            if progress is not None and event.HasField("progress"):
                p = event.progress
                progress(PullProgress(p.id, PULL_WORDS(p.state, "?"), p.current, p.total))
        raise BerthClientError(f"pull of {image} ended without a result", "UNKNOWN")

    def images(self) -> list[ImageInfo]:
        images = all_pages(
            lambda request: self._call(self._stub.ListImages, request),
            pb.ListImagesRequest(),
            "images",
        )
        return [
            ImageInfo(i.digest, list(i.references), i.config_digest, list(i.chain_ids), i.size)
            for i in images
        ]

    def remove_image(self, image: str) -> list[str]:
        reply = self._call(self._stub.RemoveImage, pb.RemoveImageRequest(image=image))
        return list(reply.deleted_layers)

    # Containers -------------------------------------------------------------------------

    def create(self, config: ContainerConfig) -> ContainerInfo:
        """Create a container, like `docker create`. The node validates `config`; call
        config.validate() first to find a mistake before any call."""
        request = pb.CreateContainerRequest(spec=to_spec(config))
        reply = self._call(self._stub.CreateContainer, request)
        return container_info(reply.container)

    def start(self, container: str) -> ContainerInfo:
        reply = self._call(self._stub.StartContainer, pb.StartContainerRequest(container=container))
        return container_info(reply.container)

    def run(self, config: ContainerConfig) -> ContainerInfo:
        """Create and start, like `docker run -d`."""
        return self.start(self.create(config).id)

    def stop(self, container: str, timeout: float | None = None) -> ContainerInfo:
        """SIGTERM, then SIGKILL after `timeout` seconds (None: the node's default, 10; 0:
        SIGKILL at once)."""
        request = pb.StopContainerRequest(container=container)
        if timeout is not None:
            request.timeout.FromNanoseconds(int(timeout * 1e9))
        grace = 10 if timeout is None else timeout
        reply = self._call(self._stub.StopContainer, request, timeout=grace + 30)
        return container_info(reply.container)

    def kill(self, container: str, signal: str = "KILL") -> None:
        self._call(
            self._stub.KillContainer, pb.KillContainerRequest(container=container, signal=signal)
        )

    def remove(self, container: str, force: bool = False) -> None:
        self._call(
            self._stub.RemoveContainer,
            pb.RemoveContainerRequest(container=container, force=force),
        )

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[ContainerInfo]:
        request = pb.ListContainersRequest(all=all, labels=labels or {})
        containers = all_pages(
            lambda r: self._call(self._stub.ListContainers, r), request, "containers"
        )
        return [container_info(c) for c in containers]

    def inspect(self, container: str) -> ContainerInfo:
        request = pb.GetContainerRequest(container=container)
        return container_info(self._call(self._stub.GetContainer, request).container)

    def stats(self, container: str) -> dict[str, float]:
        request = pb.ContainerStatsRequest(container=container, stream=False)
        for reply in self._stream(self._stub.ContainerStats, request):
            return stats_sample(reply.sample)
        raise BerthClientError(f"no stats for {container}", "UNKNOWN")

    def stats_many(self, containers: Iterable[str] = ()) -> list[dict[str, Any]]:
        """One sample of each container (every running one when none is named), in one call."""
        request = pb.BatchContainerStatsRequest(containers=list(containers))
        reply = self._call(self._stub.BatchContainerStats, request)
        return [
            {
                "container_id": e.container_id,
                "name": "",
                "node_id": "",
                "error": "",
                **stats_sample(e.sample),
            }
            for e in reply.stats
        ]

    def changes(self, container: str) -> list[tuple[str, str]]:
        request = pb.ContainerChangesRequest(container=container)
        reply = self._call(self._stub.ContainerChanges, request)
        return [(CHANGE_KINDS.name(c.kind, "?"), c.path) for c in reply.changes]

    def export_layer(
        self, container: str, repository: str, pause: bool = False
    ) -> tuple[str, str, int]:
        """Push the container's changes as a layer; returns (digest, diff_id, size). With
        `pause`, the container is frozen while its changes are read."""
        request = pb.ExportLayerRequest(container=container, repository=repository, pause=pause)
        reply = self._call(self._stub.ExportLayer, request, timeout=600)
        return reply.layer.digest, reply.diff_id, reply.layer.size
