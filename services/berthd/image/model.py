"""What the image service's core returns: plain values the servicer turns into messages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from berthd.common.oci.manifest import Descriptor


@dataclass(frozen=True)
class HistoryStep:
    """One entry of an image config's history, with the layer it added (if any)."""

    layer: str  # layer digest; "" for an empty step
    created: float | None  # seconds since the epoch
    created_by: str
    size: int
    comment: str
    empty_layer: bool
    author: str = ""


@dataclass
class ImageDetail:
    digest: str  # manifest digest
    id: str  # config digest
    repo_tags: list[str]
    repo_digests: list[str]
    media_type: str
    manifest: bytes
    config: bytes
    layers: list[Descriptor]
    diff_ids: list[str]
    history: list[HistoryStep]  # oldest first
    created: float | None
    size: int  # compressed layers + config
    hosts: list[str] = field(default_factory=list)
    platform: str = ""
    origin: str = ""  # "commit" | "import" | "load" | "pull" | "" (pushed to the registry)
    origin_detail: str = ""


@dataclass(frozen=True)
class ImageRow:
    """One line of `berth images`: an image under one of its tags (tag "" when dangling)."""

    repository: str
    tag: str
    digest: str
    id: str
    created: float | None
    size: int
    shared_size: int
    hosts: tuple[str, ...] = ()
    containers: int = 0


@dataclass
class Removal:
    """What one `rmi` did, in Docker's words."""

    untagged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


class State(StrEnum):
    """Where one item of a long operation is; the values are the names of
    berth.types.v1.ProgressState (berth.enums.progress.PROGRESS_STATES)."""

    WAITING = "waiting"
    RUNNING = "running"
    DOWNLOADING = "downloading"
    UPLOADING = "uploading"
    VERIFYING = "verifying"
    DONE = "done"
    ALREADY_EXISTS = "already_exists"
    MOUNTED = "mounted"


class Unit(StrEnum):
    """What an event's current and total count."""

    NONE = ""
    BYTES = "bytes"
    ITEMS = "items"


# A pull's or push's events about the image config have this prefix before the digest
# (Docker shows no line for the config).
CONFIG_PREFIX = "config:"


@dataclass(frozen=True)
class Event:
    """Progress of one item of a long operation (berth.types.v1.Progress): a blob by digest
    in a pull or push, a stage ("resolve", "export", "write") of a commit, the bytes received
    ("upload") of an import or load."""

    id: str
    state: State
    current: int = 0
    total: int = 0
    unit: Unit = Unit.BYTES
    message: str = ""
    seconds: float | None = None  # time spent on the item, once it is DONE


Report = Callable[[Event], None]


def ignore(event: Event) -> None:
    """A Report that drops every event."""


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token)


# How an image came into the catalog (ImageDetail.origin).
ORIGIN_COMMIT = "commit"
ORIGIN_IMPORT = "import"
ORIGIN_LOAD = "load"
ORIGIN_PULL = "pull"
