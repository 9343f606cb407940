"""Tables for the node agent's enums (berth.node.v1); a pull's progress is
berth.enums.progress."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.node.v1 import node_pb2 as pb

# The letters `docker diff` prints.
CHANGE_KINDS = EnumTable(
    pb.ChangeKind,
    {pb.CHANGE_KIND_ADDED: "A", pb.CHANGE_KIND_CHANGED: "C", pb.CHANGE_KIND_DELETED: "D"},
)

TABLES = (CHANGE_KINDS,)
