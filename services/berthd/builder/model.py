"""What a build takes and gives: the builder core's plain values, which the servicer turns into
messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class BuildOptions:
    dockerfile: str = "Dockerfile"  # path in the context
    dockerfile_content: str = ""  # the Dockerfile itself, when it is not in the context
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    tags: list[str] = field(default_factory=list)
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)


class StepStatus(StrEnum):
    """A step's state: names of berth.enums.progress.PROGRESS_STATES."""

    RUNNING = "running"
    CACHED = "cached"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class StepEvent:
    """A step's status change."""

    number: int  # from 1, across the stages being built
    total: int
    stage: str  # the stage's name, `stage-<index>` in a multi-stage build, else ""
    instruction: str
    line: int
    status: StepStatus
    layer_digest: str = ""  # of the layer the step added
    duration: float | None = None  # seconds, once cached, done or failed
    exit_code: int | None = None  # of a RUN whose command exited non-zero


@dataclass(frozen=True)
class StepOutput:
    """A line a step's process wrote, with its newline (the last bytes may have none)."""

    step: int
    stream: str  # "stdout" or "stderr"
    data: bytes


class ProgressState(StrEnum):
    """The states of berth.types.v1.Progress the builder reports for what is not a step."""

    DOWNLOADING = "downloading"
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True)
class BuildProgress:
    """Progress of something that belongs to no step: "context" (bytes received), "export",
    "warning/<n>" (a line for people in `message`)."""

    id: str
    state: ProgressState
    message: str = ""
    current: int = 0  # bytes, when `bytes` is set
    total: int = 0
    bytes: bool = False  # current and total count bytes
    duration: float | None = None  # seconds, once done


BuildEvent = StepEvent | StepOutput | BuildProgress


@dataclass(frozen=True)
class BuildResult:
    digest: str  # manifest digest
    id: str  # config digest
    tags: list[str]
    cached_steps: int
    total_steps: int
