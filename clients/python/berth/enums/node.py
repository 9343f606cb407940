"""Tables for the node agent's enums (berth.node.v1)."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.node.v1 import node_pb2 as pb

# The node agent's names for a layer's progress through a pull.
LAYER_STATES = EnumTable(
    pb.LayerState,
    {
        pb.LAYER_STATE_WAITING: "waiting",
        pb.LAYER_STATE_DOWNLOADING: "downloading",
        pb.LAYER_STATE_VERIFYING: "verifying",
        pb.LAYER_STATE_EXTRACTING: "extracting",
        pb.LAYER_STATE_PULL_COMPLETE: "pull_complete",
        pb.LAYER_STATE_ALREADY_EXISTS: "already_exists",
    },
)
# Docker's words for them, as `docker pull` prints.
LAYER_STATE_WORDS = LAYER_STATES.wording(
    {
        "waiting": "Waiting",
        "downloading": "Downloading",
        "verifying": "Verifying Checksum",
        "extracting": "Extracting",
        "pull_complete": "Pull complete",
        "already_exists": "Already exists",
    }
)
# The letters `docker diff` prints.
CHANGE_KINDS = EnumTable(
    pb.ChangeKind,
    {pb.CHANGE_KIND_ADDED: "A", pb.CHANGE_KIND_CHANGED: "C", pb.CHANGE_KIND_DELETED: "D"},
)

TABLES = (LAYER_STATES, CHANGE_KINDS)
WORDINGS = (LAYER_STATE_WORDS,)
