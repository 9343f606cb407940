"""Conversions every servicer shares between domain values and protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from berth.enums import UNSPECIFIED, EnumTable
from berth.enums.progress import PROGRESS_STATES, PROGRESS_UNITS
from berth.types.v1 import progress_pb2
from berthd.common.errors import InvalidArgument

# The reason of a request enum value the server has no name for (docs/api.md).
UNKNOWN_ENUM_VALUE = "UNKNOWN_ENUM_VALUE"


def timestamp(seconds: float | None) -> Timestamp | None:
    """Seconds since the epoch as a Timestamp; None (not known) stays unset."""
    if seconds is None:
        return None
    nanos = int(seconds * 1e9)
    if _MIN_NANOS <= nanos <= _MAX_NANOS:
        # The constructor: FromNanoseconds checks the same range in Python, a cost listings
        # pay twice per item.
        return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)
    ts = Timestamp()
    ts.FromNanoseconds(nanos)  # out of Timestamp's range: its ValueError, as before
    return ts


# The range a Timestamp holds: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_NANOS = -62135596800 * 1_000_000_000
_MAX_NANOS = 253402300800 * 1_000_000_000 - 1


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


def enum_name(table: EnumTable, value: int, field: str) -> str:
    """The name of a request's enum value; "" for UNSPECIFIED (a filter not set). A value the
    table has no name for (a newer client's, or garbage) is INVALID_ARGUMENT naming `field`,
    never a filter that silently matches nothing or a KeyError."""
    if value == UNSPECIFIED:
        return ""
    name = table.name(value, "")
    if not name:
        raise InvalidArgument(
            f"unknown {field} {value}: expected one of {', '.join(table.names)}",
            reason=UNKNOWN_ENUM_VALUE,
            metadata={"value": value, "enum": table.full_name},
            field=field,
        )
    return name


def enum_names(table: EnumTable, values: Iterable[int], field: str) -> list[str]:
    """enum_name of each value of a repeated field (`field[i]` names a bad one)."""
    return [n for i, v in enumerate(values) if (n := enum_name(table, v, f"{field}[{i}]"))]
