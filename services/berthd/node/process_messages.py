"""berth.types.v1 ProcessInput / ProcessOutput <-> the node's attach events (berthd.node.attach),
and the request streams of Exec and AttachContainer (a `start` first, then `input`s)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from berth.types.v1 import container_pb2 as pb
from berthd.common.errors import InvalidArgument
from berthd.node.attach import (
    CloseStdin,
    Detached,
    Event,
    ExecOptions,
    Exit,
    Input,
    Output,
    Resize,
    Stdin,
)


def process_input(message: pb.ProcessInput) -> Input | None:
    """The event of one ProcessInput; None for an empty one (nothing set: ignored)."""
    kind = message.WhichOneof("input")
    if kind == "stdin":
        return Stdin(message.stdin)
    if kind == "resize":
        return Resize(message.resize.rows, message.resize.columns)
    if kind == "close_stdin":
        return CloseStdin() if message.close_stdin else None
    return None


def process_output(event: Event) -> pb.ProcessOutput:
    if isinstance(event, Output):
        if event.stream == "stderr":
            return pb.ProcessOutput(stderr=event.data)
        return pb.ProcessOutput(stdout=event.data)
    if isinstance(event, Exit):
        return pb.ProcessOutput(
            exit=pb.ProcessExit(exit_code=event.code, oom_killed=event.oom_killed)
        )
    if isinstance(event, Detached):
        return pb.ProcessOutput(detached=True)
    raise TypeError(f"not a process event: {event!r}")


async def first_request(requests: AsyncIterator[Any], rpc: str) -> Any:
    """The `start` of an Exec or AttachContainer request stream."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("request") != "start":
        raise InvalidArgument(f"the first {rpc} message must be the start", field="start")
    return first.start


async def inputs(requests: AsyncIterator[Any], rpc: str) -> AsyncIterator[Input]:
    """The `input`s that follow the start; a second start is refused."""
    async for request in requests:
        kind = request.WhichOneof("request")
        if kind == "start":
            raise InvalidArgument(f"only the first {rpc} message may be the start", field="start")
        if kind == "input" and (event := process_input(request.input)) is not None:
            yield event


def exec_options(process: pb.ExecProcess) -> ExecOptions:
    size = process.terminal_size
    return ExecOptions(
        container=process.container,
        command=list(process.command),
        env=list(process.env),
        working_dir=process.working_dir,
        user=process.user,
        tty=process.tty,
        rows=size.rows,
        columns=size.columns,
    )
