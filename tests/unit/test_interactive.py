"""Interactive sessions without processes: detach keys, the ProcessInput/ProcessOutput plumbing on
the node (events, the relay) and in the client (ProcessSession), and the raw log reading of
an attached terminal."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import termios
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from berth.cli.interactive import check_tty, detach_keys_option, raw_terminal
from berth.client.sessions import Detached as ClientDetached
from berth.client.sessions import Exited, ProcessSession, output_event
from berth.client.sessions import Output as ClientOutput
from berth.detach_keys import DetachMatcher, parse_detach_keys
from berth.errors import BerthClientError, InvalidArgumentError
from berth.node.v1 import node_pb2
from berth.types.v1 import container_pb2 as pb
from berthd.common.errors import InvalidArgument
from berthd.common.streaming import session_start
from berthd.node.attach import (
    CloseStdin,
    Detached,
    Exit,
    Output,
    Resize,
    Stdin,
    _RawParser,
    detach_sequence,
    relay,
)
from berthd.node.process_messages import (
    exec_options,
    inputs,
    process_input,
    process_output,
)

# --- detach keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("", b"\x10\x11"),  # Docker's default, ctrl-p,ctrl-q
        ("ctrl-p,ctrl-q", b"\x10\x11"),
        ("ctrl-a", b"\x01"),
        ("ctrl-@,ctrl-[,ctrl-\\,ctrl-],ctrl-^,ctrl-_", b"\x00\x1b\x1c\x1d\x1e\x1f"),
        ("CTRL-X,x", b"\x18x"),
        ("a,b,c", b"abc"),
    ],
)
def test_parse_detach_keys(text: str, keys: bytes) -> None:
    assert parse_detach_keys(text) == keys


@pytest.mark.parametrize(
    "text", ["ctrl-", "ctrl-1", "ctrl-pp", "alt-p", "ctrl-p,,ctrl-q", ",", "é"]
)
def test_bad_detach_keys_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid detach keys"):
        parse_detach_keys(text)


def test_detach_sequence_only_with_a_terminal() -> None:
    assert detach_sequence("", tty=False) is None
    assert detach_sequence("", tty=True) == b"\x10\x11"
    with pytest.raises(InvalidArgument):
        detach_sequence("nope", tty=True)


def feed_all(matcher: DetachMatcher, chunks: list[bytes]) -> tuple[bytes, bool]:
    out = b""
    for chunk in chunks:
        data, hit = matcher.feed(chunk)
        out += data
        if hit:
            return out, True
    return out, False


@pytest.mark.parametrize(
    ("chunks", "passed", "detached"),
    [
        ([b"ls\r"], b"ls\r", False),
        ([b"ab\x10\x11cd"], b"ab", True),  # what follows the keys is not sent
        ([b"ab\x10", b"\x11"], b"ab", True),  # across chunks
        ([b"\x10", b"x"], b"\x10x", False),  # a broken sequence is passed on, in order
        ([b"\x10\x10\x11"], b"\x10", True),  # the key that breaks it may start it again
        ([b"\x11\x10"], b"\x11", False),  # a started sequence is held back
    ],
)
def test_detach_matcher(chunks: list[bytes], passed: bytes, detached: bool) -> None:
    assert feed_all(DetachMatcher(b"\x10\x11"), chunks) == (passed, detached)


def test_detach_matcher_with_no_keys_passes_everything() -> None:
    assert DetachMatcher(b"").feed(b"\x10\x11") == (b"\x10\x11", False)


# --- node: messages <-> events ---------------------------------------------------------------


def test_process_input_events() -> None:
    assert process_input(pb.ProcessInput(stdin=b"x")) == Stdin(b"x")
    size = pb.TerminalSize(rows=30, columns=100)
    assert process_input(pb.ProcessInput(resize=size)) == Resize(30, 100)
    assert process_input(pb.ProcessInput(close_stdin=True)) == CloseStdin()
    assert process_input(pb.ProcessInput(close_stdin=False)) is None
    assert process_input(pb.ProcessInput()) is None


def test_process_output_messages() -> None:
    assert process_output(Output("stdout", b"o")) == pb.ProcessOutput(stdout=b"o")
    assert process_output(Output("stderr", b"e")) == pb.ProcessOutput(stderr=b"e")
    assert process_output(Exit(3, True)) == pb.ProcessOutput(
        exit=pb.ProcessExit(exit_code=3, oom_killed=True)
    )
    assert process_output(Detached()) == pb.ProcessOutput(detached=True)


async def requests(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def test_request_streams() -> None:
    start = pb.ExecProcess(
        container="c",
        command=["sh"],
        tty=True,
        terminal_size=pb.TerminalSize(rows=24, columns=80),
    )
    stream = requests(
        node_pb2.ExecRequest(start=start),
        node_pb2.ExecRequest(input=pb.ProcessInput(stdin=b"a")),
        node_pb2.ExecRequest(input=pb.ProcessInput()),
        node_pb2.ExecRequest(input=pb.ProcessInput(close_stdin=True)),
    )
    first = await session_start(stream, "Exec")
    assert exec_options(first).tty and (exec_options(first).rows, exec_options(first).columns) == (
        24,
        80,
    )
    assert [e async for e in inputs(stream, "Exec")] == [Stdin(b"a"), CloseStdin()]

    with pytest.raises(InvalidArgument, match="first Exec message must be the start"):
        await session_start(requests(node_pb2.ExecRequest(input=pb.ProcessInput())), "Exec")
    with pytest.raises(InvalidArgument, match="first Exec message"):
        await session_start(requests(), "Exec")
    again = requests(node_pb2.ExecRequest(start=start))
    with pytest.raises(InvalidArgument, match="only the first"):
        _ = [e async for e in inputs(again, "Exec")]


# --- node: the relay ---------------------------------------------------------------------------


class FakeSession:
    """Echoes stdin upper-cased on stdout until stdin closes, then exits 7."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sizes: list[tuple[int, int]] = []
        self.written: list[bytes] = []
        self.ended = ""

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        yield "stderr", b"hello\n"
        while (data := await self.queue.get()) is not None:
            yield "stdout", data.upper()

    async def write(self, data: bytes) -> None:
        self.written.append(data)
        await self.queue.put(data)

    async def close_stdin(self) -> None:
        await self.queue.put(None)

    async def resize(self, rows: int, columns: int) -> None:
        self.sizes.append((rows, columns))

    async def wait(self) -> tuple[int, bool]:
        return 7, False

    def detach(self) -> None:
        self.ended = "detached"

    def hang_up(self) -> None:
        self.ended = "hung up"


async def test_relay_to_the_exit() -> None:
    session = FakeSession()
    client = requests(Resize(10, 20), Stdin(b"ab"), Stdin(b"c"))  # then the inputs end
    events = [e async for e in relay(session, client)]
    assert events == [
        Output("stderr", b"hello\n"),
        Output("stdout", b"AB"),
        Output("stdout", b"C"),
        Exit(7, False),
    ]
    assert session.sizes == [(10, 20)]
    assert session.ended == ""


async def test_relay_detaches_on_the_keys() -> None:
    session = FakeSession()
    client = requests(Stdin(b"ab\x10"), Stdin(b"\x11ignored"))
    events = [e async for e in relay(session, client, b"\x10\x11")]
    assert events[-1] == Detached()
    assert session.written == [b"ab"]  # not the keys, nor what follows them
    assert session.ended == "detached"


async def test_relay_hangs_up_when_the_client_goes() -> None:
    session = FakeSession()

    async def forever() -> AsyncIterator[Stdin]:
        yield Stdin(b"x")
        await asyncio.Event().wait()

    events = relay(session, forever())
    assert await anext(events) == Output("stderr", b"hello\n")
    await events.aclose()
    assert session.ended == "hung up"


async def test_relay_raises_what_the_input_refuses() -> None:
    session = FakeSession()

    async def bad() -> AsyncIterator[Stdin]:
        raise InvalidArgument("only the first Exec message may be the start")
        yield Stdin(b"")

    with pytest.raises(InvalidArgument):
        _ = [e async for e in relay(session, bad())]
    assert session.ended == "hung up"


# --- node: an attached terminal reads the log raw -------------------------------------------


def test_raw_log_records_keep_partial_lines_and_carriage_returns() -> None:
    parser = _RawParser()
    first = parser.feed(
        b"2026-01-01T00:00:00.000000000+00:00 stdout F hi\r\n"
        b"2026-01-01T00:00:00.000000000+00:00 stdout P / # \n"
        b"2026-01-01T00:00:00.000000000+00:00 stderr F err\n"
        b"2026-01-01T00:00:00.000000000+00:00 stdout F incomp"
    )
    assert [(r.stream, r.data) for r in first] == [
        ("stdout", b"hi\r\n"),
        ("stdout", b"/ # "),  # a prompt: no newline added, sent at once
        ("stderr", b"err\n"),
    ]
    assert [r.data for r in parser.feed(b"lete\nnot a record\n")] == [b"incomplete\n"]


# --- client: ProcessSession ---------------------------------------------------------------------


class FakeCall:
    """A bidirectional call: reads requests in a thread, answers with `replies(requests)`."""

    def __init__(self, request_iterator: Iterator[Any], replies: Any) -> None:
        self.seen: list[Any] = []
        self.cancelled = False
        self._replies = replies
        self._requests = request_iterator

    def __iter__(self) -> Iterator[Any]:
        return self._replies(self)

    def take(self) -> Any:
        message = next(self._requests)
        self.seen.append(message)
        return message

    def cancel(self) -> None:
        self.cancelled = True


def test_output_events() -> None:
    assert output_event(pb.ProcessOutput(stdout=b"o")) == ClientOutput("stdout", b"o")
    assert output_event(pb.ProcessOutput(stderr=b"e")) == ClientOutput("stderr", b"e")
    assert output_event(pb.ProcessOutput(exit=pb.ProcessExit(exit_code=2))) == Exited(2, False)
    assert output_event(pb.ProcessOutput(detached=True)) == ClientDetached()
    assert output_event(pb.ProcessOutput()) is None


def test_process_session_sends_start_then_inputs() -> None:
    calls: list[FakeCall] = []

    def replies(call: FakeCall) -> Iterator[Any]:
        call.take()  # the start
        while True:
            message = call.take()
            if message.input.HasField("stdin"):
                yield node_pb2.ExecResponse(output=pb.ProcessOutput(stdout=message.input.stdin))
            elif message.input.close_stdin:
                yield node_pb2.ExecResponse(output=pb.ProcessOutput(exit=pb.ProcessExit()))
                return

    def method(request_iterator: Iterator[Any]) -> FakeCall:
        calls.append(FakeCall(request_iterator, replies))
        return calls[-1]

    start = pb.ExecProcess(container="c", command=["cat"])
    session = ProcessSession(method, node_pb2.ExecRequest, start, lambda err: err)
    session.resize(24, 80)
    session.resize(0, 80)  # no size: not sent
    session.send(b"")  # nothing: not sent
    session.send(b"x")
    threading.Timer(0.1, session.close_stdin).start()
    assert list(session) == [ClientOutput("stdout", b"x"), Exited(0, False)]
    assert session.exited
    seen = calls[0].seen
    assert seen[0].start == start
    assert [m.input.WhichOneof("input") for m in seen[1:]] == ["resize", "stdin", "close_stdin"]
    assert calls[0].cancelled  # the call is ended once the process is


def test_process_session_errors_are_the_clients() -> None:
    class Failure(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.FAILED_PRECONDITION

    def replies(call: FakeCall) -> Iterator[Any]:
        raise Failure()
        yield

    def error(err: grpc.RpcError) -> Exception:
        return BerthClientError("container box is not running", "FAILED_PRECONDITION")

    session = ProcessSession(
        lambda it: FakeCall(it, replies), node_pb2.ExecRequest, pb.ExecProcess(), error
    )
    with pytest.raises(BerthClientError, match="not running"):
        list(session)


# --- CLI: the client's terminal -------------------------------------------------------------


def test_it_needs_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(BerthClientError, match="the input device is not a TTY"):
        check_tty(interactive=True, tty_mode=True)
    check_tty(interactive=False, tty_mode=True)  # -t alone: a terminal's output, no input
    check_tty(interactive=True, tty_mode=False)


def test_detach_keys_option() -> None:
    assert detach_keys_option("ctrl-a,d") == "ctrl-a,d"
    with pytest.raises(argparse.ArgumentTypeError, match="invalid detach keys"):
        detach_keys_option("ctrl-")


def test_raw_mode_is_restored_even_on_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = os.openpty()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as raw_in:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(raw_in)))
            before = termios.tcgetattr(slave)
            assert before[3] & termios.ECHO and before[3] & termios.ICANON
            with pytest.raises(RuntimeError), raw_terminal(True):
                during = termios.tcgetattr(slave)
                assert not during[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
                raise RuntimeError("boom")
            assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
