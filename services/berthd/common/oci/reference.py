"""Repository names, tags and image references per the OCI distribution-spec grammar.

The grammar itself lives in the client package (`berth.reference`), so the CLI and the
services accept and refuse exactly the same names with the same words. This module is the
server's face of it: the same functions, raising `InvalidArgument` instead.
"""

from __future__ import annotations

from berth import reference as grammar
from berth.reference import MAX_REPOSITORY_LENGTH, is_digest
from berthd.common.errors import invalid_argument

__all__ = [
    "MAX_REPOSITORY_LENGTH",
    "Reference",
    "invalid_argument",
    "is_digest",
    "parse_reference",
    "validate_reference",
    "validate_repository",
    "validate_tag",
]


def validate_repository(name: str) -> str:
    """Return `name` if it is a valid repository name (`library/alpine`), else raise."""
    with invalid_argument():
        return grammar.validate_repository(name)


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`), else raise."""
    with invalid_argument():
        return grammar.validate_tag(tag)


def validate_reference(text: str) -> str:
    """Validate the `<reference>` of `/v2/<name>/manifests/<reference>`: a tag or a digest."""
    with invalid_argument():
        return grammar.validate_reference(text)


class Reference(grammar.Reference):
    """A parsed `[registry/]repository[:tag][@digest]`; every field is validated."""

    def __post_init__(self) -> None:
        with invalid_argument():
            super().__post_init__()


def parse_reference(text: str, default_tag: str | None = "latest") -> Reference:
    """Parse `[host[:port]/]name[:tag][@digest]`; `default_tag` applies when neither is given."""
    with invalid_argument():
        return Reference.parse(text, default_tag)
