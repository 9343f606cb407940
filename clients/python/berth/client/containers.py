"""Containers as both the node agent and the cluster speak of them.

Both protocols carry the same berth.types.v1 messages (ContainerSpec, ContainerStatus,
ExecProcess, ContainerStats), so both clients convert them here, to and from the same
dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from berth.enums.containers import CONTAINER_STATES, LOG_STREAMS, NETWORK_MODES, RESTART_POLICIES
from berth.errors import BerthClientError
from berth.types.v1 import container_pb2 as pb


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
    """What `docker create` takes; see ContainerSpec in berth/types/v1/container.proto for
    each field."""

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


def time_of(message: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware datetime; None when unset."""
    if not message.HasField(name):
        return None
    return getattr(message, name).ToDatetime(tzinfo=UTC)


def container_spec(image: str, options: RunOptions | None = None) -> pb.ContainerSpec:
    """The ContainerSpec of `docker create IMAGE` with these options; bad policies fail here,
    before any call."""
    o = options or RunOptions()
    if o.restart not in RESTART_POLICIES.names:
        raise BerthClientError(f"unknown restart policy {o.restart!r}", "INVALID_ARGUMENT")
    if o.network not in NETWORK_MODES.names:
        raise BerthClientError(f"unknown network mode {o.network!r}", "INVALID_ARGUMENT")
    return pb.ContainerSpec(
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
            name=RESTART_POLICIES.value(o.restart), max_retries=o.restart_max_retries
        ),
        network_mode=NETWORK_MODES.value(o.network),
    )


def container_fields(c: Any) -> dict[str, Any]:
    """ContainerInfo's fields from a node.v1 or cluster.v1 Container (both have id, name, spec,
    status and image_digest), for ContainerInfo or a subclass that adds its own."""
    return {
        "id": c.id,
        "name": c.name,
        "image": c.spec.image,
        "image_digest": c.image_digest,
        "state": CONTAINER_STATES.name(c.status.state, "unknown"),
        "pid": c.status.pid,
        "exit_code": c.status.exit_code,
        "oom_killed": c.status.oom_killed,
        "restart_count": c.status.restart_count,
        "error": c.status.error,
        "created_at": time_of(c.status, "created_at"),
        "started_at": time_of(c.status, "started_at"),
        "finished_at": time_of(c.status, "finished_at"),
        "command": [*c.spec.entrypoint, *c.spec.command],
        "labels": dict(c.spec.labels),
    }


def log_line(message: Any) -> LogLine:
    """A ContainerLogsResponse of either protocol (time, stream, data)."""
    stream = LOG_STREAMS.name(message.stream, "stdout")
    return LogLine(message.time.ToDatetime(tzinfo=UTC), stream, message.data)


def exec_requests(
    request_type: type,
    container: str,
    command: list[str],
    stdin: Iterable[bytes] = (),
    env: Iterable[str] = (),
) -> Iterator[Any]:
    """The Exec request stream of either protocol: the process, its stdin, then end of input."""
    process = pb.ExecProcess(container=container, command=command, env=list(env))
    yield request_type(process=process)
    for chunk in stdin:
        yield request_type(stdin=chunk)
    yield request_type(close_stdin=True)


def exec_output(replies: Iterable[Any], container: str) -> ExecOutput:
    """Collect an Exec reply stream (stdout, stderr, then exited with the code)."""
    out, err = bytearray(), bytearray()
    for reply in replies:
        out += reply.stdout
        err += reply.stderr
        if reply.exited:
            return ExecOutput(bytes(out), bytes(err), reply.exit_code)
    raise BerthClientError(f"exec in {container} ended without an exit code", "UNKNOWN")


def stats_sample(s: pb.ContainerStats) -> dict[str, float]:
    return {
        "cpu_nanos": s.cpu_nanos,
        "cpu_percent": s.cpu_percent,
        "memory_bytes": s.memory_bytes,
        "memory_limit_bytes": s.memory_limit_bytes,
        "pids": s.pids,
    }


def run_options(spec: pb.ContainerSpec) -> RunOptions:
    """The inverse of container_spec: what a stored spec (a service template) asks for."""
    return RunOptions(
        name=spec.name,
        entrypoint=list(spec.entrypoint),
        command=list(spec.command),
        env=list(spec.env),
        working_dir=spec.working_dir,
        user=spec.user,
        hostname=spec.hostname,
        labels=dict(spec.labels),
        mounts=[(m.source, m.target, m.read_only) for m in spec.mounts],
        read_only_rootfs=spec.read_only_rootfs,
        memory_bytes=spec.resources.memory_bytes,
        cpu_millis=spec.resources.cpu_millis,
        cpu_shares=spec.resources.cpu_shares,
        pids_limit=spec.resources.pids_limit,
        restart=RESTART_POLICIES.name(spec.restart_policy.name, "no"),
        restart_max_retries=spec.restart_policy.max_retries,
        network=NETWORK_MODES.name(spec.network_mode, "none"),
    )


class ContainerStreams:
    """wait, logs and exec: the same calls in the node's and the cluster's protocols, which
    differ only in the module their request messages come from (`MESSAGES`)."""

    MESSAGES: ModuleType
    _stub: Any
    # Both provided by GrpcClient, which comes after this class in the clients' bases.
    _stream: Callable[[Any, Any], Iterator[Any]]

    def wait(self, container: str) -> int:
        request = self.MESSAGES.WaitContainerRequest(container=container)
        for reply in self._stream(self._stub.WaitContainer, request):
            return reply.exit_code
        raise BerthClientError(f"wait on {container} ended without an exit code", "UNKNOWN")

    def logs(self, container: str, follow: bool = False, tail: int = 0) -> Iterator[LogLine]:
        request = self.MESSAGES.ContainerLogsRequest(container=container, follow=follow, tail=tail)
        for line in self._stream(self._stub.ContainerLogs, request):
            yield log_line(line)

    def exec(
        self, container: str, command: list[str], stdin: Iterable[bytes] = (), env: list[str] = ()
    ) -> ExecOutput:
        """Run a process in the container, feed it stdin, collect its output and exit code."""
        requests = exec_requests(self.MESSAGES.ExecRequest, container, command, stdin, env)
        return exec_output(self._stream(self._stub.Exec, requests), container)
