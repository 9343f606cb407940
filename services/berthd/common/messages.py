"""Conversions every servicer shares between domain values and protobuf messages."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from berth.enums.progress import PROGRESS_STATES, PROGRESS_UNITS
from berth.types.v1 import progress_pb2


def timestamp(seconds: float | None) -> Timestamp | None:
    """Seconds since the epoch as a Timestamp; None (not known) stays unset."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def duration(seconds: float) -> Duration:
    message = Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def progress(
    id: str,
    state: str,
    *,
    current: int = 0,
    total: int = 0,
    unit: str = "",
    message: str = "",
    seconds: float | None = None,
) -> progress_pb2.Progress:
    """One berth.types.v1.Progress: `state` and `unit` are names of berth.enums.progress;
    `seconds`, the time the item took, once it is over."""
    event = progress_pb2.Progress(
        id=id,
        state=PROGRESS_STATES.value(state),
        current=current,
        total=total,
        unit=PROGRESS_UNITS.value(unit),
        message=message,
    )
    if seconds is not None:
        event.duration.CopyFrom(duration(seconds))
    return event
