"""Interactive process streams: Exec and AttachContainer, of the node and of the cluster.

Both RPCs take a `start` (ExecProcess or AttachOptions), then ProcessInput messages (stdin
bytes, terminal resizes, the end of stdin), and answer with ProcessOutput messages: stdout,
stderr, then how it ended (the exit, or that the client detached). A ProcessSession holds one
such call: `send`, `resize` and `close_stdin` may be called from any thread while another
iterates the output.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from berth.types.v1 import container_pb2 as pb

__all__ = ["Detached", "Exited", "Output", "ProcessSession", "output_event"]


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class Exited:
    exit_code: int
    oom_killed: bool = False


@dataclass(frozen=True)
class Detached:
    """The detach keys were typed: the process goes on without us."""


Event = Output | Exited | Detached


def output_event(message: pb.ProcessOutput) -> Event | None:
    """The event of one ProcessOutput; None for one with nothing set."""
    kind = message.WhichOneof("output")
    if kind == "stdout":
        return Output("stdout", message.stdout)
    if kind == "stderr":
        return Output("stderr", message.stderr)
    if kind == "exit":
        return Exited(message.exit.exit_code, message.exit.oom_killed)
    if kind == "detached":
        return Detached()
    return None


class ProcessSession:
    """One Exec or AttachContainer call.

    `method` is the stub's bidirectional method, `request_type` its request message (with a
    `start` and an `input` field), `error` turns a grpc.RpcError into the client's exception.
    Iterate the session for its events; the last is Exited or Detached.
    """

    def __init__(
        self,
        method: Callable[..., Any],
        request_type: type,
        start: Any,
        error: Callable[[grpc.RpcError], Exception],
    ) -> None:
        self._request_type = request_type
        self._start = start
        self._inputs: queue.SimpleQueue[pb.ProcessInput | None] = queue.SimpleQueue()
        self._error = error
        self._closed = False
        # Whether the process exited (not detached) by the end of the stream.
        self.exited = False
        self._call = method(self._requests())

    def _requests(self) -> Iterator[Any]:
        yield self._request_type(start=self._start)
        while (item := self._inputs.get()) is not None:
            yield self._request_type(input=item)

    def send(self, data: bytes) -> None:
        if data:
            self._inputs.put(pb.ProcessInput(stdin=data))

    def resize(self, rows: int, columns: int) -> None:
        if rows > 0 and columns > 0:
            self._inputs.put(pb.ProcessInput(resize=pb.TerminalSize(rows=rows, columns=columns)))

    def close_stdin(self) -> None:
        self._inputs.put(pb.ProcessInput(close_stdin=True))

    def close(self) -> None:
        """End the call (what is still running on the server side is hung up)."""
        if self._closed:
            return
        self._closed = True
        self._inputs.put(None)
        self._call.cancel()

    def __iter__(self) -> Iterator[Event]:
        try:
            for reply in self._call:
                event = output_event(reply.output)
                if event is not None:
                    self.exited = isinstance(event, Exited)
                    yield event
                    if isinstance(event, (Exited, Detached)):
                        return
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and self._closed:
                return  # we closed it
            raise self._error(err) from err
        finally:
            self.close()

    def __enter__(self) -> ProcessSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
