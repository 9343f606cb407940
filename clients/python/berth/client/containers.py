"""Containers as both the node agent and the cluster speak of them.

Both protocols carry the same berth.types.v1 messages (ContainerSpec, ContainerStatus,
ExecProcess, ContainerStats), so both clients convert them here, to and from the same
dataclasses. What a container is made of (ContainerConfig, and its ContainerSpec) is the
container model's, `berth.containers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from berth.enums.containers import CONTAINER_STATES, LOG_STREAMS
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
