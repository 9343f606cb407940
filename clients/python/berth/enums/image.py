"""Tables for the image service's enums (berth.image.v1)."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.image.v1 import image_pb2 as pb

# skopeo's transport names; the zero value means docker-archive.
ARCHIVE_FORMATS = EnumTable(
    pb.ArchiveFormat,
    {pb.ARCHIVE_FORMAT_DOCKER: "docker-archive", pb.ARCHIVE_FORMAT_OCI: "oci-archive"},
    unspecified="docker-archive",
)
TRANSFER_STATES = EnumTable(
    pb.TransferState,
    {
        pb.TRANSFER_STATE_WAITING: "waiting",
        pb.TRANSFER_STATE_TRANSFERRING: "transferring",
        pb.TRANSFER_STATE_VERIFYING: "verifying",
        pb.TRANSFER_STATE_COMPLETE: "complete",
        pb.TRANSFER_STATE_ALREADY_EXISTS: "already_exists",
        pb.TRANSFER_STATE_MOUNTED: "mounted",
    },
)
# Docker's words for them, which differ between the two directions. A blob berth's registry
# links from another of its repositories was not downloaded: "Already exists".
PULL_WORDS = TRANSFER_STATES.wording(
    {
        "waiting": "Waiting",
        "transferring": "Downloading",
        "verifying": "Verifying Checksum",
        "complete": "Pull complete",
        "already_exists": "Already exists",
        "mounted": "Already exists",
    }
)
PUSH_WORDS = TRANSFER_STATES.wording(
    {
        "waiting": "Waiting",
        "transferring": "Pushing",
        "verifying": "Verifying Checksum",
        "complete": "Pushed",
        "already_exists": "Layer already exists",
        "mounted": "Mounted from another repository",
    }
)
COMMIT_STAGES = EnumTable(
    pb.CommitStage,
    {
        pb.COMMIT_STAGE_RESOLVING: "resolving",
        pb.COMMIT_STAGE_EXPORTING: "exporting",
        pb.COMMIT_STAGE_WRITING: "writing",
        pb.COMMIT_STAGE_DONE: "done",
    },
)

TABLES = (ARCHIVE_FORMATS, TRANSFER_STATES, COMMIT_STAGES)
WORDINGS = (PULL_WORDS, PUSH_WORDS)
