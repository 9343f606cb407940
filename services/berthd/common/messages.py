"""Conversions every servicer shares between domain values and protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(seconds: float | None) -> Timestamp | None:
    """Seconds since the epoch as a Timestamp; None (not known) stays unset."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
