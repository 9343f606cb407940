"""conmon's terminal plumbing: its attach socket, its `ctl` fifo, and exec sessions with a pty.

How conmon (2.1.6) does it, and what this module relies on:
- With `-t`, conmon passes `--console-socket` to runc; runc creates the pty inside the container
  and sends conmon the master over that socket (SCM_RIGHTS). conmon keeps the master: what the
  process writes is read by conmon, written to the log (k8s-file, all as `stdout`) and to every
  client connected to the attach socket; what clients write to the attach socket goes to the
  master, i.e. to the process's terminal input.
- The attach socket is `<bundle>/attach` (conmon binds it relative to the bundle directory and
  leaves a symlink `<socket dir>/<uuid>` -> bundle, because a full path may exceed the 108 bytes
  of `sun_path`; we connect the same way, through `/proc/self/fd/<dir fd>/attach`). It is a
  SOCK_SEQPACKET socket: each packet conmon sends is one byte naming the pipe (2 stdout,
  3 stderr) followed by the data; packets we send are raw input. conmon writes to attached
  clients with blocking writes: a client must keep reading, or the container's output stalls.
  When a client shuts its side down, conmon closes the process's stdin if it was started with
  `-i` and without `--leave-stdin-open` (Docker's StdinOnce).
- The `ctl` fifo is `<bundle>/ctl`: a line `1 <rows> <columns>\\n` resizes the pty
  (TIOCSWINSZ on the master: the process gets SIGWINCH).
- `--exec` runs `runc exec --detach --tty --console-socket ... --process SPEC`; with
  `--exec-attach` conmon reports on `_OCI_ATTACHPIPE` (`{"data": 0}`) once its attach socket
  listens, and waits on `_OCI_STARTPIPE` before it runs runc, so a client that connects first
  misses no output. conmon also reads the start pipe once right after it starts (before it
  daemonizes), so it gets two writes. The sync pipe then carries `{"data": <pid>}` (or a negative
  value and runc's message), and later `{"data": <exit code>}`.

Nothing here knows gRPC; errors are berthd.common.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from berthd.common.errors import FailedPrecondition, NotFound, Unavailable
from berthd.node.runtime import Runtime, _exec_process, _runc_message, exec_failure

STDOUT_PIPE = 2
STDERR_PIPE = 3
PIPE_NAMES = {STDOUT_PIPE: "stdout", STDERR_PIPE: "stderr"}
WIN_RESIZE_EVENT = 1
PACKET_SIZE = 65536
EXEC_START_TIMEOUT = 30.0
# Input is written in packets no larger than conmon's read buffer (CONN_SOCK_BUF_SIZE, 32 KiB).
INPUT_PACKET = 32 * 1024 - 1


def resize(bundle: Path, rows: int, columns: int) -> bool:
    """Ask the process's conmon to resize its pty; False when no conmon listens (yet)."""
    if rows <= 0 or columns <= 0:
        return False
    try:
        fd = os.open(Path(bundle) / "ctl", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # no fifo, or no reader (ENXIO): conmon is not running
        return False
    try:
        os.write(fd, f"{WIN_RESIZE_EVENT} {rows} {columns}\n".encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class AttachSocket:
    """A connection to conmon's attach socket: input to the process, its output packets."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False

    @classmethod
    async def connect(cls, bundle: Path) -> AttachSocket:
        """Connect to `<bundle>/attach`; NotFound when conmon does not listen there."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            directory = os.open(bundle, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            sock.close()
            raise NotFound(f"no attach socket in {bundle}") from None
        try:
            await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{directory}/attach")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise NotFound(f"no attach socket in {bundle}: {exc.strerror}") from None
        finally:
            os.close(directory)
        return cls(sock)

    async def packets(self) -> AsyncIterator[tuple[str, bytes]]:
        """(stream, data) as conmon sends them, until it closes the socket."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                packet = await loop.sock_recv(self._sock, PACKET_SIZE)
            except OSError:
                return
            if not packet:
                return
            if len(packet) > 1:
                yield PIPE_NAMES.get(packet[0], "stdout"), packet[1:]

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for start in range(0, len(data), INPUT_PACKET):
            await loop.sock_sendall(self._sock, data[start : start + INPUT_PACKET])

    def shutdown_input(self) -> None:
        """End of input: conmon closes the process's stdin (when started with -i)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class ExecSession:
    """A process run in a container on a pty, under its own conmon (`conmon --exec -t`).

    The session directory holds the process spec, conmon's attach socket and ctl fifo, the pid
    and exit files; `remove()` deletes it once the process has exited.
    """

    def __init__(self, directory: Path, sync: asyncio.StreamReader, transport: Any) -> None:
        self.directory = directory
        self.pid = 0
        self._sync = sync
        self._sync_transport = transport
        self._attach: AttachSocket | None = None
        self._exit: int | None = None

    @classmethod
    async def start(
        cls,
        runtime: Runtime,
        container_id: str,
        sessions_dir: Path,
        args: Sequence[str],
        *,
        env: Iterable[str] = (),
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        rows: int = 0,
        columns: int = 0,
    ) -> ExecSession:
        """Start the process on a pty of `rows` x `columns` and attach to it."""
        state = await runtime.state(container_id)
        if state is None:
            raise NotFound(f"container {container_id} does not exist")
        if state.status != "running":
            raise FailedPrecondition(f"container {container_id} is {state.status}, not running")
        config = json.loads((state.bundle / "config.json").read_text())
        process = _exec_process(config["process"], args, env, cwd, uid, gid)
        process["terminal"] = True
        if rows > 0 and columns > 0:
            process["consoleSize"] = {"height": rows, "width": columns}
        directory = Path(sessions_dir) / secrets.token_hex(6)
        directory.mkdir(parents=True)
        (directory / "process.json").write_text(json.dumps(process))
        try:
            return await cls._launch(runtime, container_id, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    @classmethod
    async def _launch(cls, runtime: Runtime, container_id: str, directory: Path) -> ExecSession:
        argv = [
            runtime.conmon,
            "--api-version", "1",
            "-c", container_id,
            "-u", directory.name,
            "-n", container_id,
            "-r", runtime.runc,
            "--runtime-arg", f"--root={runtime.root}",
            "--runtime-arg", "--log-format=json",
            "-b", str(directory),
            "-p", str(directory / "pid"),
            "--conmon-pidfile", str(directory / "conmon.pid"),
            "-l", "none",
            "--exit-dir", str(directory / "exit"),
            "--socket-dir-path", str(directory),
            "--log-level", "info",
            "--exec",
            "--exec-process-spec", str(directory / "process.json"),
            "--exec-attach",
            "-t",
        ]  # fmt: skip
        (directory / "exit").mkdir()
        sync_r, sync_w = os.pipe()
        attach_r, attach_w = os.pipe()
        start_r, start_w = os.pipe()
        loop = asyncio.get_running_loop()
        sync = asyncio.StreamReader()
        transport: Any = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env={
                        **os.environ,
                        "_OCI_SYNCPIPE": str(sync_w),
                        "_OCI_ATTACHPIPE": str(attach_w),
                        "_OCI_STARTPIPE": str(start_r),
                    },
                    pass_fds=(sync_w, attach_w, start_r),
                    start_new_session=True,
                    cwd=directory,
                )
            finally:
                for fd in (sync_w, attach_w, start_r):
                    os.close(fd)
            os.write(start_w, b"0")  # conmon's first read, before it daemonizes
            _, stderr = await proc.communicate()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(sync), os.fdopen(sync_r, "rb", buffering=0)
            )
            sync_r = -1
            session = cls(directory, sync, transport)
            async with asyncio.timeout(EXEC_START_TIMEOUT):
                ready = await _read_line_fd(attach_r)
                if not ready:
                    detail = stderr.decode(errors="replace").strip() or "no message"
                    raise Unavailable(f"conmon failed to start the exec session: {detail}")
                session._attach = await AttachSocket.connect(directory)
                os.write(start_w, b"0")  # now runc may start the process
                session.pid = _reply(await sync.readline(), "starting the process")
            return session
        except BaseException:
            if transport is not None:
                transport.close()
            # Without this, conmon would read the closed start pipe as "go" and run the
            # process with nobody attached.
            _kill_conmon(directory / "conmon.pid")
            raise
        finally:
            for fd in (sync_r, attach_r, start_w):
                if fd >= 0:
                    os.close(fd)

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """What the process writes to its terminal (all "stdout"), until conmon closes."""
        assert self._attach is not None
        async for stream, data in self._attach.packets():
            yield stream, data

    async def write(self, data: bytes) -> None:
        assert self._attach is not None
        await self._attach.write(data)

    async def close_stdin(self) -> None:
        """A terminal has no end of input but the EOF character the client types: nothing."""

    async def resize(self, rows: int, columns: int) -> None:
        resize(self.directory, rows, columns)

    async def wait(self) -> tuple[int, bool]:
        """The exit code (128 + signal when a signal ended it) and whether OOM killed it."""
        if self._exit is None:
            line = await self._sync.readline()
            code = _exit_code(line)
            if code is None:  # conmon died without a word: its exit file, if any
                with contextlib.suppress(OSError, ValueError, StopIteration):
                    code = int(next((self.directory / "exit").iterdir()).read_text())
            self._exit = 255 if code is None else code
            self.close()
            self.remove()
        return self._exit, False

    def detach(self) -> None:
        """Leave the process running; its conmon goes on relaying to nobody."""
        self.close()

    def hang_up(self) -> None:
        """The client vanished without detaching: hang the terminal up, as a closed terminal
        window does (SIGHUP to the process)."""
        if self._exit is None and self.pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGHUP)
        self.close()

    def close(self) -> None:
        if self._attach is not None:
            self._attach.close()
        self._sync_transport.close()

    def remove(self) -> None:
        """Delete the session's files (after the process exited)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _kill_conmon(pid_file: Path) -> None:
    pid = Runtime.conmon_pid(pid_file)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _read_line_fd(fd: int) -> bytes:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    try:
        return await reader.readline()
    finally:
        transport.close()


def _reply(line: bytes, what: str) -> int:
    """The pid in conmon's sync pipe message; raises with runc's words when it failed."""
    try:
        reply = json.loads(line)
        value = int(reply["data"])
    except (ValueError, KeyError, TypeError):
        raise Unavailable(f"conmon failed {what}: no answer") from None
    if value <= 0:
        message = _runc_message(str(reply.get("message", "")).encode()) or "no message"
        raise exec_failure(message)
    return value


def _exit_code(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["data"])
    except (ValueError, KeyError, TypeError):
        return None
