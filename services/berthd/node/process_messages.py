"""berth.types.v1 ProcessInput / ProcessOutput <-> the node's attach events (berthd.node.attach),
and the input events of an Exec or AttachContainer request stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from berth.types.v1 import container_pb2 as pb
from berthd.common.streaming import session_inputs
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


async def inputs(requests: AsyncIterator[Any], rpc: str) -> AsyncIterator[Input]:
    """The input events that follow the start; a second start is refused."""
    async for message in session_inputs(requests, rpc):
        if (event := process_input(message)) is not None:
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
