"""The OCI runtime layer of the node agent: runc for the container life cycle, conmon per container.

Containers must outlive the agent. Each one is created by its own `conmon`, which daemonizes at
once (re-parented to PID 1, its own session), runs `runc create`, holds the container's stdout and
stderr pipes and writes them to a k8s-file log, and writes the exit code to `<exit dir>/<id>` when
the container ends. A restarted agent finds its containers again with `list_containers()` (runc
state lives in this agent's private `--root`) and their exit codes in the exit directory.

Facts this module relies on (runc 1.1.5, conmon 2.1.6, checked on the CI host):
- conmon reports creation on the pipe named by `_OCI_SYNCPIPE`: one line `{"data": <pid>}`, or
  `{"data": -1, "message": "<runc's error>"}`. It keeps the pipe open until the container exits,
  so we read one line, not to EOF.
- `--syslog=false` turns syslog ON (glib ignores the value of a flag without argument): we leave
  the flag out.
- On an OOM kill conmon creates `<persist dir>/oom` (cgroup v1 eventfd notification); the
  cgroup's `memory.oom_control` `oom_kill` counter says the same until `runc delete` removes it.
- The init of a PID namespace ignores signals it has no handler for (SIGTERM to a bare `sleep`).

Nothing here knows gRPC; errors are berthd.common.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from signal import SIGKILL
from typing import Any, BinaryIO

from berthd.common.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from berthd.common.timestamps import parse_rfc3339
from berthd.node import cgroups

# runc's own rule for container ids; it also keeps ids safe as file names in the exit dir.
_ID = re.compile(r"^[\w+\-.]+$")
_TEXT_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
CREATE_TIMEOUT = 30.0
EXIT_POLL_INTERVAL = 0.05
# How often a starting exec looks for the pid file runc writes once the process runs.
EXEC_START_POLL = 0.005


@dataclass(frozen=True)
class RuntimeState:
    """What runc knows of a container (`runc state` / `runc list`)."""

    id: str
    status: str  # "creating", "created", "running", "paused" or "stopped"
    pid: int  # 0 once stopped
    bundle: Path
    created: datetime | None


class Runtime:
    """runc under a private `--root`, with one conmon per container.

    Several agents may share a host: each must use its own `root` (never runc's default
    /run/runc) and its own cgroup parent in the configs it generates.
    """

    def __init__(self, root: Path, runc: str = "runc", conmon: str = "conmon") -> None:
        self.root = Path(root).absolute()
        # conmon needs the runtime's full path (it checks it with access(2)).
        self.runc = _which(runc)
        self.conmon = _which(conmon)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.create_timeout = CREATE_TIMEOUT

    # --- life cycle --------------------------------------------------------------------------

    async def create(
        self,
        container_id: str,
        bundle: Path,
        *,
        log_path: Path,
        exit_dir: Path,
        persist_dir: Path,
        pid_file: Path,
        conmon_pid_file: Path,
        name: str | None = None,
        log_size_max: int | None = None,
        terminal: bool = False,
        stdin: bool = False,
    ) -> int:
        """Create the container under a new conmon; return the container's pid (not started).

        `terminal` (config.json must say `terminal: true` too) has conmon take the pty runc
        makes and keep stdin open across attached clients; `stdin` gives a process without a
        terminal a stdin pipe that conmon closes when the first attached client ends its input
        (berthd.node.terminal describes the attach socket and the ctl fifo).

        `exit_dir/<id>` receives the exit code, `persist_dir` conmon's `exit` and `oom` files;
        files left there by a previous run of the same id are removed first.
        """
        _check_id(container_id)
        # runc keeps a container's state in <root>/<id>: checking the directory spares a
        # `runc state` call on every start (runc create would refuse the id anyway).
        if (self.root / container_id).exists():
            raise AlreadyExists(f"container {container_id} already exists")
        bundle, log_path, exit_dir, persist_dir, pid_file, conmon_pid_file = (
            Path(p).absolute()
            for p in (bundle, log_path, exit_dir, persist_dir, pid_file, conmon_pid_file)
        )
        if not (bundle / "config.json").is_file():
            # conmon would fail after daemonizing, where its messages go nowhere.
            raise InvalidArgument(f"bundle {bundle} has no config.json")
        socket_dir = persist_dir / "attach"
        for directory in (exit_dir, socket_dir, log_path.parent, pid_file.parent):
            directory.mkdir(parents=True, exist_ok=True)
        conmon_pid_file.parent.mkdir(parents=True, exist_ok=True)
        # A re-created container (restart) must not report its previous run's exit or OOM.
        stale = (exit_dir / container_id, persist_dir / "exit", persist_dir / "oom", pid_file)
        for path in (*stale, conmon_pid_file):
            path.unlink(missing_ok=True)

        argv = [
            self.conmon,
            "--api-version", "1",
            "-c", container_id,
            "-u", container_id,
            "-n", name or container_id,
            "-r", self.runc,
            "--runtime-arg", f"--root={self.root}",
            "--runtime-arg", "--log-format=json",
            "-b", str(bundle),
            "-p", str(pid_file),
            "--conmon-pidfile", str(conmon_pid_file),
            "-l", f"k8s-file:{log_path}",
            "--exit-dir", str(exit_dir),
            "--persist-dir", str(persist_dir),
            "--socket-dir-path", str(socket_dir),
            "--log-level", "info",
        ]  # fmt: skip
        if terminal:
            argv += ["--terminal", "--leave-stdin-open"]
        elif stdin:
            argv += ["--stdin"]
        if log_size_max:
            argv += ["--log-size-max", str(log_size_max)]

        read_fd, write_fd = os.pipe()
        sync_pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            try:
                # New session: the agent's terminal or process-group signals never reach conmon.
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env={**os.environ, "_OCI_SYNCPIPE": str(write_fd)},
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    # conmon also writes an `oom` file into its working directory; keep it in
                    # the container's own directory, not wherever the agent was started.
                    cwd=persist_dir,
                )
            finally:
                os.close(write_fd)  # conmon holds the only write end now: EOF if it dies
            try:
                message = await asyncio.wait_for(_read_line(sync_pipe), self.create_timeout)
            except TimeoutError:
                message = None
            # The foreground conmon exits as soon as it has daemonized.
            _, stderr = await proc.communicate()
        finally:
            sync_pipe.close()
        if message is None:
            await self._abandon(container_id, conmon_pid_file)
            raise Unavailable(
                f"conmon did not create container {container_id} in {self.create_timeout:.0f}s"
            )
        return self._created_pid(container_id, message, stderr)

    def _created_pid(self, container_id: str, message: bytes, conmon_stderr: bytes) -> int:
        try:
            reply = json.loads(message)
            pid = int(reply["data"])
        except (ValueError, KeyError, TypeError):
            detail = conmon_stderr.decode(errors="replace").strip() or "no message"
            raise Unavailable(f"conmon failed to create {container_id}: {detail}") from None
        if pid <= 0:
            detail = _runc_message(str(reply.get("message", "")).encode()) or "no message"
            failure = exec_failure(detail, f"creating container {container_id}")
            if isinstance(failure, ProcessNotStarted):
                raise failure  # no such command, not executable: Docker's exit codes
            raise _error_for(f"creating container {container_id}", detail)
        return pid

    async def _abandon(self, container_id: str, conmon_pid_file: Path) -> None:
        """Undo a create that hung: stop its conmon and whatever runc made."""
        pid = self.conmon_pid(conmon_pid_file)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SIGKILL)
        with contextlib.suppress(BerthError):
            await self.delete(container_id, force=True)

    async def start(self, container_id: str) -> None:
        """Run the created container's process (`runc start`)."""
        await self._runc("start", container_id)

    async def state(self, container_id: str) -> RuntimeState | None:
        """The container as runc sees it, or None if runc does not know it."""
        _check_id(container_id)
        try:
            out = await self._runc("state", container_id)
        except NotFound:
            return None
        return _state(json.loads(out))

    async def list_containers(self) -> list[RuntimeState]:
        """Every container runc knows under this root: what a restarted agent re-adopts."""
        out = await self._runc("list", "--format", "json")
        return [_state(item) for item in json.loads(out) or []]

    async def kill(self, container_id: str, signal: int | str, all: bool = False) -> None:
        """Send a signal (number or name, e.g. 15 or "TERM") to the init, or to every process."""
        _check_id(container_id)
        await self._runc("kill", *(["--all"] if all else []), container_id, str(signal))

    async def pause(self, container_id: str) -> None:
        """Freeze every process of the container (cgroup freezer, `runc pause`)."""
        _check_id(container_id)
        await self._runc("pause", container_id)

    async def resume(self, container_id: str) -> None:
        """Thaw a paused container (`runc resume`)."""
        _check_id(container_id)
        await self._runc("resume", container_id)

    async def delete(self, container_id: str, force: bool = False) -> None:
        """Forget a stopped container (with `force`, SIGKILL a running one first).

        Deleting a container runc does not know is not an error: callers use it to make sure
        no state is left from a previous run, before a create or after a crash.
        """
        _check_id(container_id)
        with contextlib.suppress(NotFound):
            await self._runc("delete", *(["--force"] if force else []), container_id)

    # --- exec --------------------------------------------------------------------------------

    async def exec(
        self,
        container_id: str,
        args: Sequence[str],
        *,
        env: Iterable[str] = (),
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> asyncio.subprocess.Process:
        """Start a process in a running container, with stdin/stdout/stderr pipes to it.

        The process gets the container process's capabilities, rlimits and security settings;
        `env` entries ("KEY=value") override or extend the container's environment. The returned
        runc process exits with the process's status (128 + signal if it was killed). Returns
        once the process runs: a process that could not start raises ProcessNotStarted (126,
        127) or the error `exec_failure` gives, never an exit status of runc's own. Exec
        sessions are children of the agent: unlike containers they do not survive it.
        """
        if not args:
            raise InvalidArgument("exec needs a command")
        state = await self.state(container_id)
        if state is None:
            raise NotFound(f"container {container_id} does not exist")
        if state.status != "running":
            raise FailedPrecondition(f"container {container_id} is {state.status}, not running")
        config = json.loads((state.bundle / "config.json").read_text())
        process = _exec_process(config["process"], args, env, cwd, uid, gid)
        # The spec and runc's log go through memfds, the pid file (written by runc once the
        # process runs) into a private directory: nothing is left when the session ends.
        spec_fd = os.memfd_create("berth-exec-process", os.MFD_CLOEXEC)
        log_fd = os.memfd_create("berth-exec-log", os.MFD_CLOEXEC)
        scratch = Path(tempfile.mkdtemp(prefix="exec-", dir=self.root))
        try:
            os.write(spec_fd, json.dumps(process).encode())
            # With --log, runc's errors go to the log (and one plain line to stderr, which is
            # the process's too: that line is never relayed, since the process never ran).
            proc = await asyncio.create_subprocess_exec(
                self.runc,
                "--root",
                str(self.root),
                "--log",
                f"/proc/self/fd/{log_fd}",
                "--log-format",
                "json",
                "exec",
                "--pid-file",
                str(scratch / "pid"),
                "--process",
                f"/proc/self/fd/{spec_fd}",
                container_id,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(spec_fd, log_fd),
            )
            if await _started(proc, scratch / "pid"):
                return proc
            os.lseek(log_fd, 0, os.SEEK_SET)
            log = b""
            while chunk := os.read(log_fd, 65536):
                log += chunk
            await proc.communicate()  # runc's own plain line on stderr: dropped
            raise exec_failure(_runc_message(log) or f"runc exited with {proc.returncode}")
        finally:
            os.close(spec_fd)
            os.close(log_fd)
            shutil.rmtree(scratch, ignore_errors=True)

    # --- what conmon leaves behind -----------------------------------------------------------

    @staticmethod
    def exit_code(exit_dir: Path, container_id: str) -> int | None:
        """The exit code conmon recorded (128 + signal for a killed process), or None yet."""
        _check_id(container_id)
        try:
            return int((Path(exit_dir) / container_id).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None  # not exited, or conmon is still writing the file

    async def wait_exit(
        self, exit_dir: Path, container_id: str, timeout: float | None = None
    ) -> int:
        """Wait for conmon to record the exit code; raises TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while (code := self.exit_code(exit_dir, container_id)) is None:
                await asyncio.sleep(EXIT_POLL_INTERVAL)
        return code

    @staticmethod
    def oom_killed(persist_dir: Path, cgroups_path: str | None = None) -> bool:
        """Whether the kernel OOM-killed a process of the container.

        conmon's `oom` file in the persist dir is the record that survives `runc delete`; the
        cgroup's own counter (v1 memory.oom_control, v2 memory.events) is checked too while the
        cgroup still exists, in case conmon missed the event.
        """
        if (Path(persist_dir) / "oom").exists():
            return True
        return cgroups_path is not None and (cgroups.oom_kills(cgroups_path) or 0) > 0

    @staticmethod
    def conmon_pid(conmon_pid_file: Path) -> int | None:
        """The pid of the container's conmon if that process is still alive, else None."""
        try:
            pid = int(Path(conmon_pid_file).read_text().strip())
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return None
        # "pid (comm) state ...": a zombie nobody reaped (PID 1 may not) is dead; a reused pid
        # belongs to another program.
        comm, _, rest = stat.partition(" (")[2].rpartition(") ")
        return pid if comm == "conmon" and not rest.startswith(("Z", "X")) else None

    async def version(self) -> str:
        """e.g. "runc 1.1.5+ds1, conmon 2.1.6"."""
        outputs = await asyncio.gather(
            _output(self.runc, "--version"), _output(self.conmon, "--version")
        )
        versions = []
        for tool, out in zip(("runc", "conmon"), outputs, strict=True):
            found = re.search(rf"{tool} version (\S+)", out)
            versions.append(f"{tool} {found[1] if found else 'unknown'}")
        return ", ".join(versions)

    # --- runc invocation ---------------------------------------------------------------------

    def _runc_argv(self) -> list[str]:
        return [self.runc, "--root", str(self.root), "--log-format", "json"]

    async def _runc(self, *args: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            *self._runc_argv(),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise _error_for(f"runc {args[0]}", _runc_message(err) or f"exit {proc.returncode}")
        return out


def _which(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise Unavailable(f"{program} is not installed")
    return str(Path(found).absolute())


def _check_id(container_id: str) -> None:
    if not _ID.match(container_id):
        raise InvalidArgument(f"invalid container id {container_id!r}")


async def _read_line(pipe: BinaryIO) -> bytes:
    """One line from a pipe without blocking the loop (b"" if the writer closed it first)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return await reader.readline()
    finally:
        transport.close()


async def _output(program: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        program, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


def _runc_message(stderr: bytes) -> str:
    """The error text of runc's log lines (JSON with --log-format=json, else logfmt)."""
    messages: list[str] = []
    for line in stderr.decode(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
            messages.append(str(entry.get("msg", line)) if isinstance(entry, dict) else line)
            continue
        except ValueError:
            pass
        found = _TEXT_MSG.search(line)
        messages.append(found[1].encode().decode("unicode_escape") if found else line)
    return "; ".join(messages)


class ProcessNotStarted(FailedPrecondition):
    """A process that could not start because of its command, which exec reports as a shell
    does: Docker's exit codes (127: no such command, 126: not executable) and one line for
    stderr. Where no exit code can be reported, it is a FAILED_PRECONDITION."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message, reason="PROCESS_NOT_STARTED", metadata={"exit_code": exit_code})
        self.exit_code = exit_code
        self.message = message


# runc's layers of context in front of what went wrong: the caller knows it was an exec.
_EXEC_PREFIXES = ("exec failed: ", "runc create failed: ", "unable to start container process: ")


def exec_failure(message: str, what: str = "exec failed") -> ProcessNotStarted | BerthError:
    """runc's message for a process that did not start -> an exit code or an error status."""
    detail = message.strip()
    stripped = True
    while stripped:
        stripped = False
        for prefix in _EXEC_PREFIXES:
            if detail.startswith(prefix):
                detail = detail[len(prefix) :]
                stripped = True
    line = f"{what}: " + " ".join(detail.split())
    # `exec: "name": ...` is runc's lookup of the executable, the last step before execve.
    if detail.startswith("exec: "):
        lowered = detail.lower()
        if "not found" in lowered or "no such file or directory" in lowered:
            return ProcessNotStarted(127, line)
        if "permission denied" in lowered or "is a directory" in lowered:
            return ProcessNotStarted(126, line)
    return FailedPrecondition(line, reason="EXEC_FAILED")


async def _started(proc: asyncio.subprocess.Process, pid_file: Path) -> bool:
    """Whether runc started the process: its pid file appears; else runc exits first."""
    exited = asyncio.ensure_future(proc.wait())
    try:
        while not pid_file.exists():
            if exited.done():
                return pid_file.exists()
            await asyncio.wait([exited], timeout=EXEC_START_POLL)
        return True
    finally:
        if not exited.done():
            exited.cancel()


def _error_for(what: str, message: str) -> BerthError:
    """runc's message -> the error that says what the caller can do about it."""
    text = f"{what}: {message}"
    lowered = message.lower()
    if "does not exist" in lowered and "container" in lowered:
        return NotFound(text)
    if "container with id exists" in lowered or "already exists" in lowered:
        return AlreadyExists(text)
    return FailedPrecondition(text)


def _state(raw: dict[str, Any]) -> RuntimeState:
    created = raw.get("created")
    return RuntimeState(
        id=raw["id"],
        status=raw.get("status", "unknown"),
        pid=int(raw.get("pid") or 0),
        bundle=Path(raw.get("bundle", "")),
        created=parse_rfc3339(created) if created else None,
    )


def _exec_process(
    base: dict[str, Any],
    args: Sequence[str],
    env: Iterable[str],
    cwd: str | None,
    uid: int | None,
    gid: int | None,
) -> dict[str, Any]:
    """An OCI process for `runc exec --process`: the container's process with these changes.

    runc takes that file as the whole process: without copying capabilities, rlimits and
    noNewPrivileges from config.json the exec'd process would get none of them.
    """
    process = {k: v for k, v in base.items() if k != "consoleSize"}
    merged = {item.partition("=")[0]: item for item in base.get("env", [])}
    merged.update((item.partition("=")[0], item) for item in env)
    user = dict(base.get("user", {"uid": 0, "gid": 0}))
    if uid is not None:
        user["uid"] = uid
    if gid is not None:
        user["gid"] = gid
    if uid is not None or gid is not None:
        user.pop("additionalGids", None)  # the image user's groups do not apply to another user
    process.update(
        terminal=False,
        args=list(args),
        env=list(merged.values()),
        cwd=cwd or base.get("cwd", "/"),
        user=user,
    )
    return process
