"""Tables for the builder's enums (berth.builder.v1)."""

from __future__ import annotations

from berth.builder.v1 import builder_pb2 as pb
from berth.enums import EnumTable

# Upper case, as BuildKit prints them.
STEP_STATUSES = EnumTable(
    pb.StepStatus,
    {
        pb.STEP_STATUS_RUNNING: "RUNNING",
        pb.STEP_STATUS_CACHED: "CACHED",
        pb.STEP_STATUS_DONE: "DONE",
        pb.STEP_STATUS_FAILED: "FAILED",
    },
)

TABLES = (STEP_STATUSES,)
