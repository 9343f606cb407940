"""Repository names, tags and image references per the OCI distribution-spec grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import parse_digest, quoted

MAX_REPOSITORY_LENGTH = 255
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_MAX_TAG_LENGTH = 128
# host[:port]: DNS labels joined by dots, or a bracketed IPv6 address.
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[a-fA-F0-9:]+\])(?::(?P<port>[0-9]+))?")


def validate_repository(name: str) -> str:
    """Return `name` if it is a valid repository name (`library/alpine`), else raise."""
    prefix = f"invalid repository name {quoted(name)}"
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{prefix}: must be a non-empty string")
    if len(name) > MAX_REPOSITORY_LENGTH:
        raise InvalidArgument(
            f"{prefix}: {len(name)} characters, the limit is {MAX_REPOSITORY_LENGTH}"
        )
    components = name.split("/")
    if "" in components:
        raise InvalidArgument(f"{prefix}: path components between / must not be empty")
    if all(_COMPONENT_RE.fullmatch(c) for c in components):
        return name
    # Uppercase is the most common mistake; say so and offer the fix.
    if name != name.lower() and all(_COMPONENT_RE.fullmatch(c) for c in name.lower().split("/")):
        raise InvalidArgument(f"{prefix}: names must be lowercase (try {quoted(name.lower())})")
    raise InvalidArgument(
        f"{prefix}: components must be lowercase letters, digits and separators . _ __ - "
        "(a separator cannot start or end a component)"
    )


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`), else raise."""
    if isinstance(tag, str) and _TAG_RE.fullmatch(tag):
        return tag
    prefix = f"invalid tag {quoted(tag)}"
    if not isinstance(tag, str) or not tag:
        raise InvalidArgument(f"{prefix}: must be a non-empty string")
    if len(tag) > _MAX_TAG_LENGTH:
        raise InvalidArgument(f"{prefix}: {len(tag)} characters, the limit is {_MAX_TAG_LENGTH}")
    raise InvalidArgument(
        f"{prefix}: use letters, digits, _ . and - only, and do not start with . or -"
    )


def is_digest(text: str) -> bool:
    """True if `text` is a digest berth accepts (sha256)."""
    try:
        parse_digest(text)
    except InvalidArgument:
        return False
    return True


def validate_reference(text: str) -> str:
    """Validate the `<reference>` of `/v2/<name>/manifests/<reference>`: a tag or a digest."""
    # A tag can never contain ':', so anything with one is meant as a digest.
    if isinstance(text, str) and ":" in text:
        try:
            return parse_digest(text)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"invalid reference {quoted(text)}: neither a tag (a tag cannot contain ':') "
                f"nor a digest ({exc})"
            ) from None
    return validate_tag(text)


def _validate_registry(host: str) -> str:
    m = _REGISTRY_RE.fullmatch(host)
    if not m or (m.group("port") is not None and not 0 < int(m.group("port")) < 65536):
        raise InvalidArgument(
            f"invalid registry host {quoted(host)}: expected host[:port] with port 1-65535"
        )
    return host


def _is_registry_host(component: str) -> bool:
    """Docker's rule for whether the first path component names a registry, not a repo."""
    return "." in component or ":" in component or component == "localhost"


@dataclass(frozen=True)
class Reference:
    """A parsed `[registry/]repository[:tag][@digest]`; every field is validated."""

    registry: str | None
    repository: str
    tag: str | None
    digest: str | None

    def __post_init__(self) -> None:
        if self.registry is not None:
            _validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            parse_digest(self.digest)

    def __str__(self) -> str:
        text = self.repository if self.registry is None else f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def reference(self) -> str | None:
        """What to fetch: the digest if pinned, else the tag."""
        return self.digest if self.digest is not None else self.tag


def parse_reference(text: str, default_tag: str | None = "latest") -> Reference:
    """Parse `[host[:port]/]name[:tag][@digest]`; `default_tag` applies when neither is given."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"invalid image reference {quoted(text)}: must be a non-empty string")
    name, at, digest = text.partition("@")
    first, slash, rest = name.partition("/")
    registry = None
    if slash and _is_registry_host(first):
        registry, name = first, rest
    # With the host gone, a ':' can only introduce the tag.
    repository, colon, tag = name.partition(":")
    if not colon and not at:
        return Reference(registry, repository, default_tag, None)
    return Reference(registry, repository, tag if colon else None, digest if at else None)
