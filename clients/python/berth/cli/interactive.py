"""The client side of `run -it`, `exec -it` and `attach`: our terminal in raw mode, our stdin to
the session, its output to our stdout/stderr, window sizes on SIGWINCH.

In raw mode every key goes to the remote process as typed: Ctrl-C is byte 3, which the remote
pty's line discipline turns into SIGINT for its foreground process; echo and line editing are
the remote terminal's. The detach keys are recognized by the node (it reads the input), which
then ends the stream with `detached`. Our terminal's settings are restored however we leave.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Any

from berth.client.sessions import Detached, Exited, Output, ProcessSession
from berth.detach_keys import parse_detach_keys
from berth.errors import BerthClientError

STDIN_CHUNK = 64 * 1024


def check_tty(interactive: bool, tty_mode: bool) -> None:
    """Docker's rule: `-it` needs a terminal on stdin ("the input device is not a TTY")."""
    if interactive and tty_mode and not sys.stdin.isatty():
        raise BerthClientError("the input device is not a TTY", "INVALID_ARGUMENT")


def detach_keys_option(keys: str) -> str:
    """--detach-keys, checked before any call (the node checks it again)."""
    try:
        parse_detach_keys(keys)
    except BerthClientError as err:
        raise argparse.ArgumentTypeError(err.message) from None
    return keys


def terminal_size() -> tuple[int, int] | None:
    """(rows, columns) of our terminal: stdout's, else stdin's; None without one."""
    for stream in (sys.stdout, sys.stdin):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(stream.fileno())
            return size.lines, size.columns
    return None


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Our stdin's terminal in raw mode (no echo, no line editing, no signals from keys), with
    its settings restored at the end, also on an error or a signal."""
    if not enabled or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def window_changes(session: ProcessSession, enabled: bool) -> Iterator[None]:
    """Send our terminal's size whenever it changes (SIGWINCH), while the session runs."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def changed(signum: int, frame: Any) -> None:
        size = terminal_size()
        if size is not None:
            session.resize(*size)

    previous = signal.signal(signal.SIGWINCH, changed)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _read_stdin() -> Callable[[], bytes]:
    """What reads our stdin: the file descriptor itself, whatever has arrived (a line typed,
    or a key in raw mode). Not the buffered file object: the reading thread may still be in
    read() when the interpreter exits, and must not hold its lock then."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stdin (tests): no descriptor
        return lambda: sys.stdin.buffer.read1(STDIN_CHUNK)
    return lambda: os.read(fd, STDIN_CHUNK)


def _pump_stdin(session: ProcessSession, close_at_eof: bool) -> None:
    read = _read_stdin()
    while True:
        try:
            data = read()
        except (OSError, ValueError):
            data = b""
        if not data:
            if close_at_eof:
                session.close_stdin()
            return
        session.send(data)


def run_session(session: ProcessSession, *, stdin: bool, tty_mode: bool) -> int:
    """Relay until the process exits (its exit code) or we detach (0)."""
    raw = tty_mode and stdin and sys.stdin.isatty()
    with session, raw_terminal(raw), window_changes(session, tty_mode):
        if stdin:
            # A daemon thread: it may still be blocked in read() when the process ends.
            reader = threading.Thread(
                target=_pump_stdin, args=(session, not tty_mode), name="stdin", daemon=True
            )
            reader.start()
        else:
            session.close_stdin()  # the process reads an empty stdin, as with Docker
        for event in session:
            if isinstance(event, Output):
                write(event.stream, event.data)
            elif isinstance(event, Exited):
                return event.exit_code
            elif isinstance(event, Detached):
                return 0
    raise BerthClientError("the session ended without an exit code", "UNKNOWN")


def write(stream: str, data: bytes) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.flush()
    out.buffer.write(data)
    out.buffer.flush()
