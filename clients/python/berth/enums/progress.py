"""Tables for berth.types.v1.Progress, the one progress message of every long operation (pull,
push, commit, build, import, load, save, garbage collection), and Docker's words for a blob's
states in each direction."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.types.v1 import progress_pb2 as pb

PROGRESS_STATES = EnumTable(
    pb.ProgressState,
    {
        pb.PROGRESS_STATE_WAITING: "waiting",
        pb.PROGRESS_STATE_RUNNING: "running",
        pb.PROGRESS_STATE_DOWNLOADING: "downloading",
        pb.PROGRESS_STATE_UPLOADING: "uploading",
        pb.PROGRESS_STATE_VERIFYING: "verifying",
        pb.PROGRESS_STATE_EXTRACTING: "extracting",
        pb.PROGRESS_STATE_DONE: "done",
        pb.PROGRESS_STATE_ALREADY_EXISTS: "already_exists",
        pb.PROGRESS_STATE_MOUNTED: "mounted",
        pb.PROGRESS_STATE_CACHED: "cached",
        pb.PROGRESS_STATE_FAILED: "failed",
    },
)
PROGRESS_UNITS = EnumTable(
    pb.ProgressUnit,
    {pb.PROGRESS_UNIT_BYTES: "bytes", pb.PROGRESS_UNIT_ITEMS: "items"},
    unspecified="",
)
# Docker's words for a blob's states, which differ between the two directions. A blob that was
# linked from another repository (a node's or the catalog's) was not downloaded: "Already
# exists". A push's MOUNTED line names the repository ("Mounted from x", the event's message).
PULL_WORDS = PROGRESS_STATES.wording(
    {
        "waiting": "Waiting",
        "running": "Downloading",
        "downloading": "Downloading",
        "uploading": "Pushing",
        "verifying": "Verifying Checksum",
        "extracting": "Extracting",
        "done": "Pull complete",
        "already_exists": "Already exists",
        "mounted": "Already exists",
        "cached": "Already exists",
        "failed": "Failed",
    }
)
PUSH_WORDS = PROGRESS_STATES.wording(
    {
        "waiting": "Waiting",
        "running": "Pushing",
        "downloading": "Pushing",
        "uploading": "Pushing",
        "verifying": "Verifying Checksum",
        "extracting": "Extracting",
        "done": "Pushed",
        "already_exists": "Layer already exists",
        "mounted": "Mounted from another repository",
        "cached": "Layer already exists",
        "failed": "Failed",
    }
)

TABLES = (PROGRESS_STATES, PROGRESS_UNITS)
WORDINGS = (PULL_WORDS, PUSH_WORDS)
