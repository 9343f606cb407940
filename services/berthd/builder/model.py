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
    RUNNING = "RUNNING"
    CACHED = "CACHED"
    DONE = "DONE"
    FAILED = "FAILED"


@dataclass(frozen=True)
class StepEvent:
    """A step's status change, or (status RUNNING, `output` set) a line a RUN printed."""

    number: int  # from 1, across the stages being built
    total: int
    stage: str  # the stage's name, `stage-<index>` in a multi-stage build, else ""
    instruction: str
    line: int
    status: StepStatus
    output: str = ""
    layer: str = ""  # digest of the layer the step added
    duration: float | None = None  # seconds, once cached, done or failed
    exit_code: int = 0


@dataclass(frozen=True)
class BuildMessage:
    """A line for people that belongs to no step."""

    text: str


BuildEvent = StepEvent | BuildMessage


@dataclass(frozen=True)
class BuildResult:
    digest: str  # manifest digest
    id: str  # config digest
    tags: list[str]
    cached_steps: int
    total_steps: int
