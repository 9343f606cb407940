"""Typed client for a node agent (berth.node.v1).

Methods take and return plain Python values and dataclasses; gRPC errors become
`BerthClientError`. Long operations (pull, logs, wait, exec) are iterators or blocking calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from berth.errors import BerthClientError, from_rpc_error
from berth.node.v1 import node_pb2 as pb
from berth.node.v1 import node_pb2_grpc

MAX_MESSAGE = 16 * 1024 * 1024
STATES = {
    pb.CONTAINER_STATE_CREATED: "created",
    pb.CONTAINER_STATE_RUNNING: "running",
    pb.CONTAINER_STATE_EXITED: "exited",
    pb.CONTAINER_STATE_RESTARTING: "restarting",
}
LAYER_STATES = {
    pb.LAYER_STATE_WAITING: "Waiting",
    pb.LAYER_STATE_DOWNLOADING: "Downloading",
    pb.LAYER_STATE_VERIFYING: "Verifying Checksum",
    pb.LAYER_STATE_EXTRACTING: "Extracting",
    pb.LAYER_STATE_PULL_COMPLETE: "Pull complete",
    pb.LAYER_STATE_ALREADY_EXISTS: "Already exists",
}
RESTART = {
    "no": pb.RESTART_POLICY_NAME_NO,
    "on-failure": pb.RESTART_POLICY_NAME_ON_FAILURE,
    "always": pb.RESTART_POLICY_NAME_ALWAYS,
}
NETWORK = {"none": pb.NETWORK_MODE_NONE, "host": pb.NETWORK_MODE_HOST}


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


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    image: str
    image_digest: str
    state: str
    pid: int
    exit_code: int
    oom_killed: bool
    restart_count: int
    error: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    command: list[str]
    labels: dict[str, str]


@dataclass
class RunOptions:
    """What `docker create` takes; see ContainerSpec in node.proto for each field."""

    name: str = ""
    entrypoint: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    hostname: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    read_only_rootfs: bool = False
    memory_bytes: int = 0
    cpu_millis: int = 0
    cpu_shares: int = 0
    pids_limit: int = 0
    restart: str = "no"
    restart_max_retries: int = 0
    network: str = "none"


@dataclass(frozen=True)
class LogLine:
    time: datetime
    stream: str
    data: bytes


@dataclass(frozen=True)
class ExecOutput:
    stdout: bytes
    stderr: bytes
    exit_code: int


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    return getattr(message, name).ToDatetime(tzinfo=UTC)


def _container(c: pb.Container) -> ContainerInfo:
    return ContainerInfo(
        id=c.id,
        name=c.name,
        image=c.spec.image,
        image_digest=c.image_digest,
        state=STATES.get(c.status.state, "unknown"),
        pid=c.status.pid,
        exit_code=c.status.exit_code,
        oom_killed=c.status.oom_killed,
        restart_count=c.status.restart_count,
        error=c.status.error,
        created_at=_time(c.status, "created_at"),
        started_at=_time(c.status, "started_at"),
        finished_at=_time(c.status, "finished_at"),
        command=[*c.spec.entrypoint, *c.spec.command],
        labels=dict(c.spec.labels),
    )


class NodeClient:
    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )
        self._stub = node_pb2_grpc.NodeServiceStub(self._channel)

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, address=self.address, service="node") from err

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        try:
            yield from method(request)
        except grpc.RpcError as err:
            raise from_rpc_error(err, address=self.address, service="node") from err

    # Images -----------------------------------------------------------------------------

    def pull(self, image: str, progress: Callable[[PullProgress], None] | None = None) -> ImageInfo:
        for event in self._stream(self._stub.PullImage, pb.PullImageRequest(image=image)):
            if event.HasField("image"):
                i = event.image
                return ImageInfo(
                    i.digest, list(i.references), i.config_digest, list(i.chain_ids), i.size
                )
            if progress is not None:
                progress(
                    PullProgress(
                        event.layer, LAYER_STATES.get(event.state, "?"), event.current, event.total
                    )
                )
        raise BerthClientError(f"pull of {image} ended without a result", "UNKNOWN")

    def images(self) -> list[ImageInfo]:
        reply = self._call(self._stub.ListImages, pb.ListImagesRequest())
        return [
            ImageInfo(i.digest, list(i.references), i.config_digest, list(i.chain_ids), i.size)
            for i in reply.images
        ]

    def remove_image(self, image: str) -> list[str]:
        reply = self._call(self._stub.RemoveImage, pb.RemoveImageRequest(image=image))
        return list(reply.deleted_layers)

    # Containers -------------------------------------------------------------------------

    def create(self, image: str, options: RunOptions | None = None) -> ContainerInfo:
        o = options or RunOptions()
        if o.restart not in RESTART:
            raise BerthClientError(f"unknown restart policy {o.restart!r}", "INVALID_ARGUMENT")
        if o.network not in NETWORK:
            raise BerthClientError(f"unknown network mode {o.network!r}", "INVALID_ARGUMENT")
        spec = pb.ContainerSpec(
            image=image,
            name=o.name,
            entrypoint=o.entrypoint,
            command=o.command,
            env=o.env,
            working_dir=o.working_dir,
            user=o.user,
            hostname=o.hostname,
            labels=o.labels,
            mounts=[pb.Mount(source=s, target=t, read_only=ro) for s, t, ro in o.mounts],
            read_only_rootfs=o.read_only_rootfs,
            resources=pb.Resources(
                memory_bytes=o.memory_bytes,
                cpu_millis=o.cpu_millis,
                cpu_shares=o.cpu_shares,
                pids_limit=o.pids_limit,
            ),
            restart_policy=pb.RestartPolicy(
                name=RESTART[o.restart], max_retries=o.restart_max_retries
            ),
            network_mode=NETWORK[o.network],
        )
        reply = self._call(self._stub.CreateContainer, pb.CreateContainerRequest(spec=spec))
        return _container(reply.container)

    def start(self, container: str) -> ContainerInfo:
        reply = self._call(self._stub.StartContainer, pb.StartContainerRequest(container=container))
        return _container(reply.container)

    def run(self, image: str, options: RunOptions | None = None) -> ContainerInfo:
        """Create and start, like `docker run -d`."""
        return self.start(self.create(image, options).id)

    def stop(self, container: str, timeout: int = 0) -> ContainerInfo:
        request = pb.StopContainerRequest(container=container, timeout_seconds=timeout)
        reply = self._call(self._stub.StopContainer, request, timeout=(timeout or 10) + 30)
        return _container(reply.container)

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
        return [_container(c) for c in self._call(self._stub.ListContainers, request).containers]

    def inspect(self, container: str) -> ContainerInfo:
        request = pb.InspectContainerRequest(container=container)
        return _container(self._call(self._stub.InspectContainer, request).container)

    def wait(self, container: str) -> int:
        for reply in self._stream(
            self._stub.WaitContainer, pb.WaitContainerRequest(container=container)
        ):
            return reply.exit_code
        raise BerthClientError(f"wait on {container} ended without an exit code", "UNKNOWN")

    def logs(self, container: str, follow: bool = False, tail: int = 0) -> Iterator[LogLine]:
        request = pb.ContainerLogsRequest(container=container, follow=follow, tail=tail)
        for line in self._stream(self._stub.ContainerLogs, request):
            stream = "stderr" if line.stream == pb.LOG_STREAM_STDERR else "stdout"
            yield LogLine(line.time.ToDatetime(tzinfo=UTC), stream, line.data)

    def exec(
        self, container: str, command: list[str], stdin: Iterable[bytes] = (), env: list[str] = ()
    ) -> ExecOutput:
        """Run a process in the container, feed it stdin, collect its output and exit code."""

        def requests() -> Iterator[pb.ExecRequest]:
            yield pb.ExecRequest(
                process=pb.ExecProcess(container=container, command=command, env=list(env))
            )
            for chunk in stdin:
                yield pb.ExecRequest(stdin=chunk)
            yield pb.ExecRequest(close_stdin=True)

        out, err = bytearray(), bytearray()
        for reply in self._stream(self._stub.Exec, requests()):
            out += reply.stdout
            err += reply.stderr
            if reply.exited:
                return ExecOutput(bytes(out), bytes(err), reply.exit_code)
        raise BerthClientError(f"exec in {container} ended without an exit code", "UNKNOWN")

    def stats(self, container: str) -> dict[str, float]:
        request = pb.ContainerStatsRequest(container=container, stream=False)
        for s in self._stream(self._stub.ContainerStats, request):
            return {
                "cpu_nanos": s.cpu_nanos,
                "cpu_percent": s.cpu_percent,
                "memory_bytes": s.memory_bytes,
                "memory_limit_bytes": s.memory_limit_bytes,
                "pids": s.pids,
            }
        raise BerthClientError(f"no stats for {container}", "UNKNOWN")

    def changes(self, container: str) -> list[tuple[str, str]]:
        kinds = {
            pb.CHANGE_KIND_ADDED: "A",
            pb.CHANGE_KIND_CHANGED: "C",
            pb.CHANGE_KIND_DELETED: "D",
        }
        request = pb.ContainerChangesRequest(container=container)
        reply = self._call(self._stub.ContainerChanges, request)
        return [(kinds[c.kind], c.path) for c in reply.changes]

    def export_layer(self, container: str, repository: str) -> tuple[str, str, int]:
        """Push the container's changes as a layer; returns (digest, diff_id, size)."""
        request = pb.ExportLayerRequest(container=container, repository=repository)
        reply = self._call(self._stub.ExportLayer, request, timeout=600)
        return reply.layer.digest, reply.diff_id, reply.layer.size
