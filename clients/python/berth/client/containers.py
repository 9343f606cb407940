"""Containers as both the node agent and the cluster speak of them.

Both protocols carry the same berth.types.v1 messages (ContainerSpec, ContainerStatus,
ExecProcess, ContainerStats), so both clients convert them here, to and from the same
dataclasses. What a container is made of (ContainerConfig, and its ContainerSpec) is the
container model's, `berth.containers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from berth.client.sessions import Exited, Output, ProcessSession, output_event
from berth.enums.containers import (
    CONTAINER_STATES,
    HEALTH_STATUSES,
    LOG_STREAMS,
    NETWORK_MODES,
    PORT_PROTOCOLS,
)
from berth.errors import BerthClientError
from berth.ports import PortBinding
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
    # Why the node could not create it (state "create_failed") or its last start failed, for a
    # person; "" when nothing failed. failure_reason is the stable word: IMAGE_NOT_FOUND,
    # IMAGE_PULL_FAILED, INVALID_SPEC, CREATE_FAILED or START_FAILED.
    error: str
    failure_reason: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    command: list[str]
    labels: dict[str, str]
    # Security options of its spec (ContainerSpec's cap_add, cap_drop, security_opt, userns).
    cap_add: list[str] = field(default_factory=list, kw_only=True)
    cap_drop: list[str] = field(default_factory=list, kw_only=True)
    security_opt: list[str] = field(default_factory=list, kw_only=True)
    userns: str = field(default="", kw_only=True)
    # Its network mode (none, host or a network's name) and, while it runs on a network,
    # its place there: {"network", "network_id", "ip_address", "ip_prefix_length",
    # "gateway", "mac_address", "ports"} (ContainerStatus.network_settings); empty otherwise.
    network_mode: str = field(default="none", kw_only=True)
    network: dict[str, Any] = field(default_factory=dict, kw_only=True)
    # More names it answers to on its network (ContainerSpec.network_aliases).
    network_aliases: list[str] = field(default_factory=list, kw_only=True)
    # The ports its spec asks to publish (`-p`; host_port 0: the node chooses); the bindings
    # in effect while it runs are network["ports"].
    ports: list[PortBinding] = field(default_factory=list, kw_only=True)
    # Its health while it runs with a health check, as Docker's State.Health: {"Status",
    # "FailingStreak", "Log": [{"Start", "End", "ExitCode", "Output"}]}; empty otherwise.
    health: dict[str, Any] = field(default_factory=dict, kw_only=True)

    @property
    def published(self) -> list[PortBinding]:
        """The ports published now (Docker's NetworkSettings.Ports)."""
        return list(self.network.get("ports", [])) if self.network else []


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


# Items asked for per page when a client reads a whole listing (the servers' maximum).
PAGE_SIZE = 1000


def all_pages(call: Callable[[Any], Any], request: Any, field: str) -> list[Any]:
    """Every item of a paged List call: `call(request)` page after page, following
    next_page_token, items from each reply's `field`."""
    request.page_size = request.page_size or PAGE_SIZE
    items: list[Any] = []
    while True:
        reply = call(request)
        items.extend(getattr(reply, field))
        if not reply.next_page_token:
            return items
        request.page_token = reply.next_page_token


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
        "error": c.status.failure.message,
        "failure_reason": c.status.failure.reason,
        "created_at": time_of(c.status, "created_at"),
        "started_at": time_of(c.status, "started_at"),
        "finished_at": time_of(c.status, "finished_at"),
        "command": [*c.spec.entrypoint, *c.spec.command],
        "labels": dict(c.spec.labels),
        "cap_add": list(c.spec.cap_add),
        "cap_drop": list(c.spec.cap_drop),
        "security_opt": list(c.spec.security_opt),
        "userns": c.spec.userns,
        "network_mode": c.spec.network or NETWORK_MODES.name(c.spec.network_mode, "none"),
        "network": network_settings(c.status),
        "network_aliases": list(c.spec.network_aliases),
        "ports": [port_binding(p) for p in c.spec.ports],
        "health": health_of(c.status),
    }


def health_of(status: Any) -> dict[str, Any]:
    """Docker's State.Health from a ContainerStatus; {} without a health check."""
    if not status.HasField("health") or not status.health.status:
        return {}
    h = status.health

    def when(entry: Any, name: str) -> str:
        moment = time_of(entry, name)
        return moment.isoformat().replace("+00:00", "Z") if moment else ""

    return {
        "Status": HEALTH_STATUSES.name(h.status, ""),
        "FailingStreak": h.failing_streak,
        "Log": [
            {
                "Start": when(e, "started_at"),
                "End": when(e, "ended_at"),
                "ExitCode": e.exit_code,
                "Output": e.output.decode(errors="replace"),
            }
            for e in h.log
        ],
    }


def network_settings(status: Any) -> dict[str, Any]:
    if not status.HasField("network_settings"):
        return {}
    n = status.network_settings
    return {
        "network": n.network,
        "network_id": n.network_id,
        "ip_address": n.ip_address,
        "ip_prefix_length": n.ip_prefix_length,
        "gateway": n.gateway,
        "mac_address": n.mac_address,
        "ports": [port_binding(p) for p in n.ports],
    }


def port_binding(message: Any) -> PortBinding:
    """A PortBinding message (a protocol without a name reads as tcp)."""
    return PortBinding(
        container_port=message.container_port,
        host_port=message.host_port,
        host_ip=message.host_ip,
        protocol=PORT_PROTOCOLS.name(message.protocol, "tcp"),
    )


def log_line(message: Any) -> LogLine:
    """A ContainerLogsResponse of either protocol (written_at, stream, data)."""
    stream = LOG_STREAMS.name(message.stream, "stdout")
    return LogLine(message.written_at.ToDatetime(tzinfo=UTC), stream, message.data)


def exec_requests(
    request_type: type,
    container: str,
    command: list[str],
    stdin: Iterable[bytes] = (),
    env: Iterable[str] = (),
    working_dir: str = "",
) -> Iterator[Any]:
    """The Exec request stream of either protocol: the process, its stdin, then end of input."""
    process = pb.ExecProcess(
        container=container, command=command, env=list(env), working_dir=working_dir
    )
    yield request_type(start=process)
    for chunk in stdin:
        yield request_type(input=pb.ProcessInput(stdin=chunk))
    yield request_type(input=pb.ProcessInput(close_stdin=True))


def exec_output(replies: Iterable[Any], container: str) -> ExecOutput:
    """Collect an Exec reply stream (stdout, stderr, then the exit)."""
    out, err = bytearray(), bytearray()
    for reply in replies:
        event = output_event(reply.output)
        if isinstance(event, Output):
            (err if event.stream == "stderr" else out).extend(event.data)
        elif isinstance(event, Exited):
            return ExecOutput(bytes(out), bytes(err), event.exit_code)
    raise BerthClientError(f"exec in {container} ended without an exit code", "UNKNOWN")


def stats_sample(s: pb.ContainerStats) -> dict[str, float]:
    return {
        "cpu_nanos": s.cpu_usage.ToNanoseconds(),
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
    _error: Callable[[Any], Exception]
    _call: Callable[..., Any]

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
        self,
        container: str,
        command: list[str],
        stdin: Iterable[bytes] = (),
        env: list[str] = (),
        working_dir: str = "",
    ) -> ExecOutput:
        """Run a process in the container, feed it stdin, collect its output and exit code."""
        requests = exec_requests(
            self.MESSAGES.ExecRequest, container, command, stdin, env, working_dir
        )
        return exec_output(self._stream(self._stub.Exec, requests), container)

    def spec(self, container: str) -> pb.ContainerSpec:
        """The container's spec, as created (tty and stdin_open tell how to attach)."""
        request = self.MESSAGES.GetContainerRequest(container=container)
        return self._call(self._stub.GetContainer, request).container.spec

    def exec_session(
        self,
        container: str,
        command: list[str],
        *,
        env: Iterable[str] = (),
        tty: bool = False,
        size: tuple[int, int] | None = None,
        detach_keys: str = "",
        working_dir: str = "",
        user: str = "",
    ) -> ProcessSession:
        """An interactive exec (`docker exec -i/-t`): send input to the session, iterate its
        output. `size` is the terminal's (rows, columns)."""
        process = pb.ExecProcess(
            container=container,
            command=command,
            env=list(env),
            working_dir=working_dir,
            user=user,
            tty=tty,
            detach_keys=detach_keys,
        )
        if size is not None:
            process.terminal_size.CopyFrom(pb.TerminalSize(rows=size[0], columns=size[1]))
        return ProcessSession(self._stub.Exec, self.MESSAGES.ExecRequest, process, self._error)

    def attach(
        self,
        container: str,
        *,
        stdin: bool = False,
        logs: bool = False,
        size: tuple[int, int] | None = None,
        detach_keys: str = "",
    ) -> ProcessSession:
        """Attach to a container's main process (`docker attach`); with `logs`, its output
        from the first byte."""
        options = pb.AttachOptions(
            container=container, stdin=stdin, logs=logs, detach_keys=detach_keys
        )
        if size is not None:
            options.terminal_size.CopyFrom(pb.TerminalSize(rows=size[0], columns=size[1]))
        return ProcessSession(
            self._stub.AttachContainer, self.MESSAGES.AttachContainerRequest, options, self._error
        )
