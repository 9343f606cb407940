"""The builder's error reasons (`ErrorInfo.reason`), written once: raise sites use these names,
docs/builder.md and builder.proto list them with their codes and metadata."""

from __future__ import annotations

from dataclasses import replace

from berthd.common.errors import BerthError, InvalidArgument, ResourceExhausted

# INVALID_ARGUMENT, metadata `line`: the Dockerfile cannot be parsed, or an instruction is wrong.
DOCKERFILE_INVALID = "DOCKERFILE_INVALID"
# INVALID_ARGUMENT, metadata `path`: the context has no Dockerfile where the options say.
DOCKERFILE_NOT_FOUND = "DOCKERFILE_NOT_FOUND"
# INVALID_ARGUMENT, metadata `step`, `line`: a COPY/ADD source is missing or cannot be copied.
COPY_FAILED = "COPY_FAILED"
# FAILED_PRECONDITION, metadata `step`, `line`, `exit_code`: a RUN's command exited non-zero.
RUN_FAILED = "RUN_FAILED"
# FAILED_PRECONDITION, metadata `step`, `line`, `node_id`: the node could not create or start
# the step's container (a bad USER, a failing pull, runc refusing it).
RUN_NOT_STARTED = "RUN_NOT_STARTED"
# UNAVAILABLE, metadata `step`, `line`, `node_id`: the container did not start in time.
RUN_START_TIMEOUT = "RUN_START_TIMEOUT"
# FAILED_PRECONDITION, metadata `step`, `line`: no node can take a RUN step's container.
NO_NODE = "NO_NODE"
# NOT_FOUND, metadata `image`, `step`, `line`: a FROM names an image berth's registry lacks.
BASE_IMAGE_NOT_FOUND = "BASE_IMAGE_NOT_FOUND"
# NOT_FOUND, metadata `stage`: the target names no stage of the Dockerfile.
STAGE_NOT_FOUND = "STAGE_NOT_FOUND"
# INVALID_ARGUMENT, metadata `tag`: a tag is not name[:tag] in berth's registry.
TAG_INVALID = "TAG_INVALID"
# INVALID_ARGUMENT, metadata `name`: a build arg has an empty or malformed name.
BUILD_ARG_INVALID = "BUILD_ARG_INVALID"
# INVALID_ARGUMENT: the context is not a tar as Build specifies, its .dockerignore is
# malformed, or the stream does not start with the options.
CONTEXT_INVALID = "CONTEXT_INVALID"
# RESOURCE_EXHAUSTED, metadata `limit_bytes` or `limit_files`: the context is past a limit.
CONTEXT_TOO_LARGE = "CONTEXT_TOO_LARGE"
# INVALID_ARGUMENT: a ListCache page token the builder did not give.
INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"

REASONS = (
    DOCKERFILE_INVALID,
    DOCKERFILE_NOT_FOUND,
    COPY_FAILED,
    RUN_FAILED,
    RUN_NOT_STARTED,
    RUN_START_TIMEOUT,
    NO_NODE,
    BASE_IMAGE_NOT_FOUND,
    STAGE_NOT_FOUND,
    TAG_INVALID,
    BUILD_ARG_INVALID,
    CONTEXT_INVALID,
    CONTEXT_TOO_LARGE,
    INVALID_PAGE_TOKEN,
)


def context_invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=CONTEXT_INVALID, field="context")


def context_too_large(message: str, **limit: int) -> ResourceExhausted:
    """`limit` is limit_bytes=... or limit_files=..."""
    return ResourceExhausted(message, reason=CONTEXT_TOO_LARGE, metadata=limit, field="context")


def annotate(exc: BerthError, metadata: dict[str, object], *, reason: str = "") -> None:
    """Add facts to an error on its way up (the step and line it happened at): keys it has
    already keep their values. `reason` replaces a generic one (the code's name)."""
    details = exc.details
    merged = {k: str(v) for k, v in metadata.items()}
    merged.update(details.metadata)
    generic = details.reason in ("", exc.code.name)
    exc.details = replace(
        details, metadata=merged, reason=reason if reason and generic else details.reason
    )


def move_field(exc: BerthError, old: str, new: str) -> None:
    """Name another request field as the one at fault (the Dockerfile came as text)."""
    details = exc.details
    fields = tuple((new if name == old else name, text) for name, text in details.field_violations)
    exc.details = replace(details, field_violations=fields)
