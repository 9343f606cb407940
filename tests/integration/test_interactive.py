"""`berth exec -it`, `berth run -it` and `berth attach` driven through a real pty, against a
cluster started with `berthd up`: the remote process gets a terminal (/dev/pts/N), what we type
is echoed and run, resizes reach it, Ctrl-C interrupts it, the detach keys leave it running,
and its exit code is the CLI's."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.client import RegistryClient

from .images import busybox_layer, push_image
from .test_localcluster import BERTHD, free_base_port, run

pytestmark = pytest.mark.integration

BERTH = [sys.executable, "-m", "berth"]
IMAGE = "test/busybox:1"
PROMPT = re.compile(rb"[#$] (\x1b\[6n)?")
CTRL_C = b"\x03"
CTRL_P_Q = b"\x10\x11"


class Terminal:
    """A command on a new pty, as a person at a terminal runs it: the pty is its controlling
    terminal (SIGWINCH on a resize), we type into the master and read what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 24, columns: int = 80):
        self.master, slave = os.openpty()
        self.set_size(rows, columns, fd=slave)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = b""

    def set_size(self, rows: int, columns: int, fd: int | None = None) -> None:
        size = struct.pack("HHHH", rows, columns, 0, 0)
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, size)

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command exited and the slave side is closed
            return b""
        self.seen += data
        return data

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 20) -> bytes:
        """Read until `pattern` shows up after what was matched before; the text up to it."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while True:
            found = regex.search(self.seen, start)
            if found:
                return self.seen[start : found.end()]
            left = deadline - time.monotonic()
            if left <= 0 or (not self.read(min(left, 0.2)) and self.proc.poll() is not None):
                if (found := regex.search(self.seen, start)) is not None:
                    return self.seen[start : found.end()]
                raise AssertionError(f"{pattern!r} not seen; the terminal shows {self.seen!r}")

    def until(self, command: bytes, pattern: bytes, timeout: float = 60) -> None:
        """Type `command` until its output shows `pattern`: for what the remote side takes in
        a moment after we act (a resize, an attach that starts forwarding what we type)."""
        deadline = time.monotonic() + timeout
        while True:
            self.type(command)
            try:
                self.expect(pattern, timeout=1)
                return
            except AssertionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A one-node cluster (`berthd up`) with a busybox image; the environment for the CLI."""
    tmp = tmp_path_factory.mktemp("interactive")
    env = {"BERTH_STATE_DIR": str(tmp / "state")}
    started = run([*BERTHD, "up", "--base-port", str(free_base_port())], env)
    try:
        assert started.returncode == 0, started.stderr
        state = json.loads((tmp / "state" / "cluster.json").read_text())
        with RegistryClient(state["services"]["registry"]["address"]) as registry:
            push_image(registry, "test/busybox", "1", [busybox_layer()], tmp)
        yield env
    finally:
        stopped = run([*BERTHD, "down"], env)
        assert stopped.returncode == 0, stopped.stderr


def berth(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BERTH, *args], input=stdin, capture_output=True, env={**os.environ, **env}, timeout=120
    )


def state_of(env: dict[str, str], name: str) -> str:
    result = berth(env, "inspect", name)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["State"]["Status"]


@pytest.fixture(scope="module")
def box(cluster: dict[str, str]) -> str:
    """A running container to exec into."""
    started = berth(cluster, "run", "-d", "--name", "box", IMAGE, "sleep", "600")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 60
    while state_of(cluster, "box") != "running":
        assert time.monotonic() < deadline, "box did not start"
        time.sleep(0.2)
    return "box"


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def test_exec_it_gives_a_terminal(
    cluster: dict[str, str], box: str, terminals: list[Terminal]
) -> None:
    term = Terminal([*BERTH, "exec", "-it", "box", "sh"], cluster, rows=24, columns=80)
    terminals.append(term)
    term.expect(PROMPT)
    term.type(b"tty\r")
    term.expect(re.compile(rb"/dev/pts/\d+\r\n"))
    # What we type is echoed by the remote terminal, and run.
    term.type(b"echo $((6 * 7))\r")
    term.expect(b"\r\n42\r\n")
    assert b"echo $((6 * 7))" in term.seen
    # The size we start with, then a resize (SIGWINCH here, ProcessInput.resize there).
    term.type(b"stty size\r")
    term.expect(b"\r\n24 80\r\n")
    term.set_size(33, 101)
    term.until(b"stty size\r", b"\r\n33 101\r\n")
    # Ctrl-C reaches the remote foreground process as SIGINT, through its pty: 130, and the
    # sleep never finished (it would say "slept" and $? would be 0).
    term.type(b"sleep 60; echo slept\r")
    deadline = time.monotonic() + 60
    while not re.search(rb"sleep 60\s*$", berth(cluster, "exec", "box", "ps").stdout, re.M):
        assert time.monotonic() < deadline, "the sleep did not start"
        time.sleep(0.2)
    term.type(CTRL_C)
    term.type(b"echo status=$?\r")
    term.expect(b"status=130\r\n", timeout=50)
    assert b"slept" not in term.seen.replace(b"echo slept", b"")
    # The exit code is the CLI's.
    term.type(b"exit 3\r")
    assert term.wait() == 3
    # A command that cannot start: runc's words, no session left behind.
    term = Terminal([*BERTH, "exec", "-it", "box", "no-such-command"], cluster)
    terminals.append(term)
    assert term.wait() == 127  # Docker's code for a command not found
    assert b"executable file not found" in term.seen and b"{" not in term.seen, term.seen


def test_run_it_on_one_node(cluster: dict[str, str], terminals: list[Terminal]) -> None:
    node = json.loads((Path(cluster["BERTH_STATE_DIR"]) / "cluster.json").read_text())
    address = node["services"]["node"]["address"]
    term = Terminal([*BERTH, "--node", address, "run", "-it", "--rm", IMAGE, "sh"], cluster)
    terminals.append(term)
    term.expect(PROMPT, timeout=60)
    term.type(b"echo on-$((1 + 1))-node\r")
    term.expect(b"\r\non-2-node\r\n")
    term.type(b"exit 5\r")
    assert term.wait() == 5


def test_exec_detach_keys_leave_the_process_running(
    cluster: dict[str, str], box: str, terminals: list[Terminal]
) -> None:
    term = Terminal([*BERTH, "exec", "-it", "box", "sh", "-c", "echo ready; sleep 300"], cluster)
    terminals.append(term)
    term.expect(b"ready")
    term.type(CTRL_P_Q)
    assert term.wait() == 0
    ps = berth(cluster, "exec", "box", "ps")
    assert b"sleep 300" in ps.stdout, ps
    assert state_of(cluster, "box") == "running"
    # Other keys, in Docker's notation; a key that only starts the sequence is passed on.
    term = Terminal([*BERTH, "exec", "-it", "--detach-keys", "ctrl-x,x", "box", "sh"], cluster)
    terminals.append(term)
    term.expect(PROMPT)
    term.type(b"\x18echo passed-on\r")
    term.expect(b"\r\npassed-on\r\n")
    term.type(b"\x18x")
    assert term.wait() == 0


def test_run_it_detach_attach_and_exit_code(
    cluster: dict[str, str], terminals: list[Terminal]
) -> None:
    term = Terminal([*BERTH, "run", "-it", "--name", "shell", IMAGE, "sh"], cluster)
    terminals.append(term)
    term.expect(PROMPT, timeout=60)
    term.type(b"tty\r")
    term.expect(re.compile(rb"/dev/pts/\d+\r\n"))
    term.type(b"echo hello-$((40 + 2))\r")
    term.expect(b"\r\nhello-42\r\n")
    term.set_size(40, 120)
    term.until(b"stty size\r", b"\r\n40 120\r\n")
    term.type(CTRL_P_Q)
    assert term.wait() == 0
    assert state_of(cluster, "shell") == "running"
    # The terminal's output is the container's log.
    logs = berth(cluster, "logs", "shell")
    assert b"\r\nhello-42\r\n" in logs.stdout, logs

    term = Terminal([*BERTH, "attach", "shell"], cluster)
    terminals.append(term)
    # What we type before the CLI forwards it is flushed when it sets the terminal raw.
    term.until(b"echo again-$((1 + 1))\r", b"\r\nagain-2\r\n")
    term.type(b"exit 3\r")
    assert term.wait() == 3
    assert state_of(cluster, "shell") == "exited"
    refused = berth(cluster, "attach", "--no-stdin", "shell")
    assert refused.returncode == 1
    assert b"cannot attach to a stopped container" in refused.stderr, refused


def test_run_of_an_image_with_no_command_says_so(
    cluster: dict[str, str], terminals: list[Terminal], tmp_path: Path
) -> None:
    """Docker's "no command specified", one line and exit 125, with a terminal or without."""
    state = json.loads((Path(cluster["BERTH_STATE_DIR"]) / "cluster.json").read_text())
    with RegistryClient(state["services"]["registry"]["address"]) as registry:
        push_image(registry, "test/nocmd", "1", [busybox_layer()], tmp_path, cmd=[])
    term = Terminal([*BERTH, "run", "-it", "--rm", "test/nocmd:1"], cluster)
    terminals.append(term)
    assert term.wait(timeout=60) == 125, term.seen
    shown = term.seen.decode().strip().splitlines()
    assert len(shown) == 1 and "no command specified" in shown[0], term.seen
    plain = berth(cluster, "run", "--rm", "test/nocmd:1")
    assert plain.returncode == 125, plain
    lines = plain.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "no command specified" in lines[0], plain.stderr
    listed = berth(cluster, "ps", "-a", "--format", "json")
    assert "test/nocmd" not in listed.stdout.decode(), listed.stdout  # --rm: nothing left


def test_run_t_and_exec_i_without_a_terminal(cluster: dict[str, str], box: str) -> None:
    refused = berth(cluster, "exec", "-it", "box", "sh")
    assert refused.returncode == 1
    assert b"the input device is not a TTY" in refused.stderr
    refused = berth(cluster, "run", "-it", IMAGE, "sh")
    assert (refused.returncode, refused.stderr.strip()[-29:]) == (
        1,
        b"the input device is not a TTY",
    )
    piped = berth(cluster, "exec", "-i", "box", "sh", "-c", "tr a-z A-Z; exit 5", stdin=b"abc\n")
    assert (piped.returncode, piped.stdout) == (5, b"ABC\n")
    separate = berth(cluster, "exec", "box", "sh", "-c", "echo out; echo err >&2")
    assert (separate.returncode, separate.stdout, separate.stderr) == (0, b"out\n", b"err\n")
    # run -i without a terminal: our stdin is its stdin, closed at our end of input.
    upper = berth(
        cluster, "run", "-i", "--rm", IMAGE, "sh", "-c", "tr a-z A-Z; exit 6", stdin=b"abc\n"
    )
    assert (upper.returncode, upper.stdout) == (6, b"ABC\n"), upper
    big = bytes(range(256)) * (12 << 10)  # 3 MiB, through conmon's attach socket
    counted = berth(cluster, "run", "-i", "--rm", IMAGE, "md5sum", stdin=big)
    assert counted.stdout.split()[0] == hashlib.md5(big).hexdigest().encode(), counted
    counted = berth(cluster, "exec", "-i", "box", "md5sum", stdin=big)
    assert counted.stdout.split()[0] == hashlib.md5(big).hexdigest().encode(), counted
    # -t without -i: the output of a terminal (\r\n), no input.
    tty_out = berth(cluster, "run", "--rm", "-t", IMAGE, "sh", "-c", "tty; exit 4")
    assert tty_out.returncode == 4
    assert re.match(rb"/dev/pts/\d+\r\n", tty_out.stdout), tty_out


def test_exec_and_run_failures_are_docker_exit_codes_and_one_line(
    cluster: dict[str, str], box: str
) -> None:
    """Through the cluster and the CLI: 127 for a command not found, 126 for one that is not
    executable, a status for bad input; one line on stderr, never runc's JSON."""
    missing = berth(cluster, "exec", "box", "no-such-command")
    assert missing.returncode == 127, missing
    assert missing.stderr.count(b"\n") == 1 and b"{" not in missing.stderr, missing.stderr
    assert b'"no-such-command": executable file not found in $PATH' in missing.stderr
    denied = berth(cluster, "exec", "box", "/etc/passwd")
    assert denied.returncode == 126, denied
    assert b"permission denied" in denied.stderr and b"{" not in denied.stderr, denied.stderr
    nowhere = berth(cluster, "exec", "-w", "/no/such/dir", "box", "true")
    assert nowhere.returncode == 1, nowhere
    assert nowhere.stderr.count(b"\n") == 1 and b"/no/such/dir" in nowhere.stderr
    assert b"{" not in nowhere.stderr and b"\\" not in nowhere.stderr, nowhere.stderr
    nul = berth(cluster, "exec", "-e", "A=b\x01", "box", "sh", "-c", 'test "$A" = "b\x01"')
    assert nul.returncode == 0, nul  # (argv cannot carry a NUL: the node test sends one)
    run_missing = berth(cluster, "run", "--rm", IMAGE, "no-such-command")
    assert run_missing.returncode == 127, run_missing
    assert b"executable file not found" in run_missing.stderr
    assert b"{" not in run_missing.stderr, run_missing.stderr


def test_plain_run_still_follows_the_output(cluster: dict[str, str]) -> None:
    plain = berth(cluster, "run", "--rm", IMAGE, "sh", "-c", "echo plain; echo err >&2; exit 2")
    assert (plain.returncode, plain.stdout, plain.stderr) == (2, b"plain\n", b"err\n")
