"""Interactive processes on the node: exec sessions (with or without a terminal) and attaching to
a container's main process, relayed to one client as plain events.

A session is anything with the same few methods: `output()` (what the process writes),
`write`, `close_stdin`, `resize`, `wait` (exit code and OOM kill), `detach` and `hang_up`.
Three kinds exist:
- PipeSession: `runc exec` with pipes (no terminal): stdout and stderr apart.
- terminal.ExecSession: `conmon --exec -t`: the process on a pty, relayed by its conmon.
- ContainerAttach: the main process, which conmon runs (with `-t` when its spec asks for a
  terminal). Its output comes from conmon's log file: from the first byte (`logs`) or from
  now on, then followed until the process exits, so replay and live output are one ordered
  stream and `logs` keeps working. Its input goes through conmon's attach socket (connected
  once the container runs) and resizes through conmon's `ctl` fifo.

`relay` pumps a client's inputs into a session and its output back out, watching a terminal's
input for the detach keys. Nothing here knows gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from berth.detach_keys import DetachMatcher, parse_detach_keys
from berthd.common.errors import FailedPrecondition, NotFound, invalid_argument
from berthd.node import logs, terminal
from berthd.node.agent import NodeAgent, check_exec
from berthd.node.containers import ContainerManager
from berthd.node.records import CREATED, RESTARTING, RUNNING, ContainerRecord
from berthd.node.runtime import ProcessNotStarted
from berthd.node.spec import effective_user, resolve_user

# How often an attached client's log file and container state are looked at.
ATTACH_POLL = 0.02
OUTPUT_QUEUE = 64


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stdin:
    data: bytes


@dataclass(frozen=True)
class Resize:
    rows: int
    columns: int


@dataclass(frozen=True)
class CloseStdin:
    pass


Input = Stdin | Resize | CloseStdin


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Exit:
    code: int
    oom_killed: bool = False


@dataclass(frozen=True)
class Detached:
    pass


Event = Output | Exit | Detached


class Session(Protocol):
    def output(self) -> AsyncIterator[tuple[str, bytes]]: ...

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def resize(self, rows: int, columns: int) -> None: ...

    async def wait(self) -> tuple[int, bool]: ...

    def detach(self) -> None: ...

    def hang_up(self) -> None: ...


def detach_sequence(keys: str, tty: bool) -> bytes | None:
    """The bytes that detach a client, or None without a terminal (Docker reads them only
    there)."""
    if not tty:
        return None
    with invalid_argument():
        return parse_detach_keys(keys)


# --- the relay --------------------------------------------------------------------------------

_END = object()
_DETACH = object()


async def relay(
    session: Session, inputs: AsyncIterator[Input], detach_keys: bytes | None = None
) -> AsyncIterator[Event]:
    """The session's output, then its Exit (or Detached when the detach keys were typed).

    The client's inputs go to the session meanwhile; when they end (the client sends no more),
    the process's stdin is closed. Closing this generator before the end (the client went
    away) hangs the session up.
    """
    events: asyncio.Queue[object] = asyncio.Queue(OUTPUT_QUEUE)
    matcher = DetachMatcher(detach_keys) if detach_keys else None

    async def pump_output() -> None:
        try:
            async for stream, data in session.output():
                await events.put(Output(stream, data))
            await events.put(_END)
        except Exception as exc:
            await events.put(exc)

    async def pump_input() -> None:
        try:
            async for item in inputs:
                if isinstance(item, Stdin):
                    data, detached = matcher.feed(item.data) if matcher else (item.data, False)
                    if data:
                        await session.write(data)
                    if detached:
                        await events.put(_DETACH)
                        return
                elif isinstance(item, Resize):
                    await session.resize(item.rows, item.columns)
                else:
                    await session.close_stdin()
            await session.close_stdin()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the process closed its stdin or exited: its output tells the rest
        except Exception as exc:
            await events.put(exc)

    tasks = [asyncio.create_task(pump_output()), asyncio.create_task(pump_input())]
    finished = False
    try:
        while True:
            item = await events.get()
            if item is _END:
                code, oom = await session.wait()
                finished = True
                yield Exit(code, oom)
                return
            if item is _DETACH:
                finished = True
                session.detach()
                yield Detached()
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, Output)
            yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not finished:
            session.hang_up()


# --- exec without a terminal -------------------------------------------------------------------


class PipeSession:
    """`runc exec` with stdin, stdout and stderr pipes (a child of the agent)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(OUTPUT_QUEUE)

        async def pump(stream: asyncio.StreamReader | None, name: str) -> None:
            while stream is not None and (data := await stream.read(65536)):
                await queue.put((name, data))
            await queue.put(None)

        tasks = [
            asyncio.create_task(pump(self.proc.stdout, "stdout")),
            asyncio.create_task(pump(self.proc.stderr, "stderr")),
        ]
        try:
            open_streams = 2
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def resize(self, rows: int, columns: int) -> None:
        """No terminal, nothing to resize."""

    async def wait(self) -> tuple[int, bool]:
        code = await self.proc.wait()
        return (code if code >= 0 else 128 - code), False

    def detach(self) -> None:
        self.hang_up()  # without a terminal there is no detaching: the process ends

    def hang_up(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class NotStarted:
    """A process that could not start: one line on stderr and the shell's exit code (127 no
    such command, 126 not executable), as `docker exec` reports it."""

    def __init__(self, exit_code: int, message: str) -> None:
        self.exit_code = exit_code
        self.message = message

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        yield "stderr", self.message.encode() + b"\n"

    async def write(self, data: bytes) -> None:
        """Nobody reads: input is dropped."""

    async def close_stdin(self) -> None:
        pass

    async def resize(self, rows: int, columns: int) -> None:
        pass

    async def wait(self) -> tuple[int, bool]:
        return self.exit_code, False

    def detach(self) -> None:
        pass

    def hang_up(self) -> None:
        pass


# --- exec ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecOptions:
    container: str
    command: list[str]
    env: list[str]
    working_dir: str = ""
    user: str = ""
    tty: bool = False
    rows: int = 0
    columns: int = 0


async def exec_session(agent: NodeAgent, options: ExecOptions) -> Session:
    """Start a process in a running container: on a pty under conmon with `tty`, else with
    pipes."""
    try:
        return await _exec_session(agent, options)
    except ProcessNotStarted as failed:
        return NotStarted(failed.exit_code, failed.message)


async def _exec_session(agent: NodeAgent, options: ExecOptions) -> Session:
    if not options.tty:
        proc = await agent.exec(
            options.container,
            options.command,
            options.env,
            options.working_dir,
            options.user,
        )
        return PipeSession(proc)
    record = agent.containers.resolve(options.container)
    if record.state != RUNNING:
        raise FailedPrecondition(
            f"container {record.name} is not running",
            reason="CONTAINER_NOT_RUNNING",
            metadata={"container_id": record.id},
        )
    check_exec(options.command, options.env, options.working_dir, options.user)
    cdir = agent.containers.dir(record.id)
    image = agent.images.get(record.image_digest)
    user = options.user or effective_user(image.config, record.config)
    uid, gid, _ = resolve_user(agent.containers.rootfs(record), user)
    if record.id_map is not None:
        record.id_map.check("uid", [uid])
        record.id_map.check("gid", [gid])
    return await terminal.ExecSession.start(
        agent.runtime,
        record.id,
        exec_sessions_dir(cdir.root),
        options.command,
        env=options.env,
        cwd=options.working_dir or record.config.working_dir or "/",
        uid=uid,
        gid=gid,
        rows=options.rows,
        columns=options.columns,
    )


def exec_sessions_dir(container_dir: Path) -> Path:
    """Where a container's terminal exec sessions keep their files (removed with it)."""
    return container_dir / "exec"


# --- attach to the main process -----------------------------------------------------------------


class _RawParser:
    """k8s-file records as the bytes written, partial records included, at once: a prompt
    without a newline must reach an attached terminal as soon as conmon logged it."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[logs.LogRecord]:
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            record = _raw_record(line)
            if record is not None:
                out.append(record)
        return out

    def flush(self) -> list[logs.LogRecord]:
        return []

    def drop_incomplete(self) -> None:
        self._rest = b""


def _raw_record(line: bytes) -> logs.LogRecord | None:
    fields = line.split(b" ", 3)
    if len(fields) < 3:
        return None
    stream = fields[1].decode("ascii", "replace")
    if stream not in logs.STREAMS:
        return None
    text = fields[3] if len(fields) == 4 else b""
    data = text if fields[2].startswith(b"P") else text + b"\n"
    return logs.LogRecord(time=_EPOCH, stream=stream, data=data)


# Attached output carries no time: one value for every record.
_EPOCH = datetime.fromtimestamp(0, UTC)


class ContainerAttach:
    """A client attached to a container's main process (see the module's docstring)."""

    def __init__(
        self, manager: ContainerManager, record: ContainerRecord, *, logs: bool, stdin: bool
    ) -> None:
        self.manager = manager
        self.record = record
        self.dir = manager.dir(record.id)
        self.logs = logs
        self.tty = record.config.tty
        # Without stdin_open the process's stdin is empty: input is dropped, as Docker does.
        self.stdin = stdin and record.config.stdin_open
        self._seen_running = record.state == RUNNING
        self._socket: terminal.AttachSocket | None = None
        self._drain: asyncio.Task[None] | None = None
        self._size: tuple[int, int] | None = None
        self._sized = False

    def _current(self) -> ContainerRecord | None:
        return self.manager.records.get(self.record.id)

    def _finished(self) -> bool:
        """The run we are attached to is over (a container not started yet is waited for)."""
        current = self._current()
        if current is None:
            return True
        if current.state == RUNNING:
            self._seen_running = True
            return False
        if current.state in (CREATED, RESTARTING):
            return self._seen_running
        return True

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        reader = logs._Reader(self.dir.log, None)
        reader._parser = _RawParser()  # type: ignore[assignment]
        if not self.logs:
            await asyncio.to_thread(_skip_to_end, reader, self.dir.log)
        try:
            while True:
                stopping = self._finished()
                if self._seen_running and not self._sized:
                    self._apply_size()
                while (chunk := await asyncio.to_thread(reader.read_chunk)) is not None:
                    for record in chunk:
                        yield record.stream, record.data
                if stopping:
                    return
                await asyncio.sleep(ATTACH_POLL)
        finally:
            reader.close()

    async def write(self, data: bytes) -> None:
        if not self.stdin:
            return
        sock = await self._connected()
        if sock is not None:
            await sock.write(data)

    async def close_stdin(self) -> None:
        if self.stdin and not self.tty and (sock := await self._connected()) is not None:
            sock.shutdown_input()

    async def resize(self, rows: int, columns: int) -> None:
        if not self.tty:
            return
        self._size = (rows, columns)
        self._sized = False
        if self._seen_running:
            self._apply_size()

    def _apply_size(self) -> None:
        if self._size is not None:
            self._sized = terminal.resize(self.dir.bundle, *self._size)
        else:
            self._sized = True

    async def _connected(self) -> terminal.AttachSocket | None:
        """The attach socket once conmon runs the container; None if the run ended first."""
        while self._socket is None:
            if self._finished():
                return None
            current = self._current()
            if current is not None and current.state == RUNNING:
                with contextlib.suppress(NotFound):
                    self._socket = await terminal.AttachSocket.connect(self.dir.bundle)
                    self._drain = asyncio.create_task(self._discard(self._socket))
                    break
            await asyncio.sleep(ATTACH_POLL)
        return self._socket

    @staticmethod
    async def _discard(sock: terminal.AttachSocket) -> None:
        # conmon blocks on a client that does not read: its output comes from the log instead.
        async for _ in sock.packets():
            pass

    async def wait(self) -> tuple[int, bool]:
        current = self._current() or self.record
        return current.exit_code, current.oom_killed

    def detach(self) -> None:
        self.close()

    def hang_up(self) -> None:
        self.close()

    def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _skip_to_end(reader: logs._Reader, path: Path) -> None:
    """Start a reader at the current end of the log (whole lines: what follows is new)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - handed to the reader, which closes it
    except FileNotFoundError:
        return  # nothing written yet: all of it will be new
    handle.seek(0, 2)
    reader._file = handle


def attach_container(agent: NodeAgent, ref: str, *, logs: bool, stdin: bool) -> ContainerAttach:
    """Attach to a container's main process. A container created and not started yet is
    waited for; one that has exited can only be replayed (`logs`)."""
    record = agent.containers.resolve(ref)
    if record.state not in (CREATED, RUNNING, RESTARTING) and not logs:
        raise FailedPrecondition(
            f"you cannot attach to a stopped container, start it first: {record.name}",
            reason="CONTAINER_NOT_RUNNING",
            metadata={"container_id": record.id},
        )
    return ContainerAttach(agent.containers, record, logs=logs, stdin=stdin)
