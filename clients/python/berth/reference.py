"""Image references: the OCI distribution-spec grammar, written once for client and server.

`[host[:port]/]repository[:tag][@digest]` and its parts. Every check raises InvalidReference
(code INVALID_ARGUMENT) with a one-line message a person can act on; berthd imports this
module and re-raises the same message as its own InvalidArgument.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Self

from berth.errors import InvalidArgumentError

MAX_REPOSITORY_LENGTH = 255
MAX_TAG_LENGTH = 128
DIGEST_ALGORITHM = "sha256"

_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
# The image-spec's general digest grammar; a value matching it with another algorithm is
# well-formed but unsupported, which deserves a different message than garbage.
_ANY_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):[a-zA-Z0-9=_-]+")
# host[:port]: DNS labels joined by dots, or a bracketed IPv6 address.
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[a-fA-F0-9:]+\])(?::(?P<port>[0-9]+))?")
_MAX_SHOWN = 200


class InvalidReference(InvalidArgumentError):
    """A malformed repository name, tag, digest, registry host or image reference."""


def quoted(value: object) -> str:
    """Render a user-supplied value for a one-line error message: JSON-quoted, truncated."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = f"{text[:_MAX_SHOWN]}...({len(text)} chars)"
    return text


def validate_repository(name: str) -> str:
    """Return `name` if it is a valid repository name (`library/alpine`), else raise."""
    prefix = f"invalid repository name {quoted(name)}"
    if not isinstance(name, str) or not name:
        raise InvalidReference(f"{prefix}: must be a non-empty string")
    if len(name) > MAX_REPOSITORY_LENGTH:
        raise InvalidReference(
            f"{prefix}: {len(name)} characters, the limit is {MAX_REPOSITORY_LENGTH}"
        )
    components = name.split("/")
    if "" in components:
        raise InvalidReference(f"{prefix}: path components between / must not be empty")
    if all(_COMPONENT_RE.fullmatch(c) for c in components):
        return name
    # Uppercase is the most common mistake; say so and offer the fix.
    if name != name.lower() and all(_COMPONENT_RE.fullmatch(c) for c in name.lower().split("/")):
        raise InvalidReference(f"{prefix}: names must be lowercase (try {quoted(name.lower())})")
    raise InvalidReference(
        f"{prefix}: components must be lowercase letters, digits and separators . _ __ - "
        "(a separator cannot start or end a component)"
    )


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`), else raise."""
    if isinstance(tag, str) and _TAG_RE.fullmatch(tag):
        return tag
    prefix = f"invalid tag {quoted(tag)}"
    if not isinstance(tag, str) or not tag:
        raise InvalidReference(f"{prefix}: must be a non-empty string")
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidReference(f"{prefix}: {len(tag)} characters, the limit is {MAX_TAG_LENGTH}")
    raise InvalidReference(
        f"{prefix}: use letters, digits, _ . and - only, and do not start with . or -"
    )


def validate_digest(value: str) -> str:
    """Return `value` if it is a digest berth accepts (`sha256:<64 lowercase hex>`), else raise.

    Syntax only: hashing content lives with whoever has the content."""
    if isinstance(value, str) and _SHA256_RE.fullmatch(value):
        return value
    if isinstance(value, str):
        m = _ANY_DIGEST_RE.fullmatch(value)
        if m and m.group(1) != DIGEST_ALGORITHM:
            raise InvalidReference(
                f"unsupported digest algorithm {quoted(m.group(1))} in {quoted(value)}: "
                f"only {DIGEST_ALGORITHM} is supported"
            )
    raise InvalidReference(f"invalid digest {quoted(value)}: expected sha256:<64 lowercase hex>")


def is_digest(text: str) -> bool:
    """True if `text` is a digest berth accepts (sha256)."""
    try:
        validate_digest(text)
    except InvalidReference:
        return False
    return True


def validate_reference(text: str) -> str:
    """Validate the `<reference>` of `/v2/<name>/manifests/<reference>`: a tag or a digest."""
    # A tag can never contain ':', so anything with one is meant as a digest.
    if isinstance(text, str) and ":" in text:
        try:
            return validate_digest(text)
        except InvalidReference as exc:
            raise InvalidReference(
                f"invalid reference {quoted(text)}: neither a tag (a tag cannot contain ':') "
                f"nor a digest ({exc.message})"
            ) from None
    return validate_tag(text)


def validate_registry(host: str) -> str:
    """Return `host` if it is `host[:port]` (DNS name, IPv4, or bracketed IPv6), else raise."""
    m = _REGISTRY_RE.fullmatch(host) if isinstance(host, str) else None
    if not m or (m.group("port") is not None and not 0 < int(m.group("port")) < 65536):
        raise InvalidReference(
            f"invalid registry host {quoted(host)}: expected host[:port] with port 1-65535"
        )
    return host


def is_registry_host(text: str) -> bool:
    """Whether `text` is a valid `host[:port]`."""
    try:
        validate_registry(text)
    except InvalidReference:
        return False
    return True


def names_registry(component: str) -> bool:
    """Docker's rule for whether a reference's first path component names a registry host
    rather than a repository: it has a '.' or a ':', or is `localhost`."""
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
            validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            validate_digest(self.digest)

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

    @classmethod
    def parse(cls, text: str, default_tag: str | None = "latest", *, registry: bool = True) -> Self:
        """Parse `[host[:port]/]name[:tag][@digest]`; `default_tag` applies when neither a tag
        nor a digest is given. With registry=False there is no host part (a name in one
        registry): `my.org/app` is then a repository, and a `host:port/` prefix is refused."""
        if not isinstance(text, str) or not text:
            raise InvalidReference(
                f"invalid image reference {quoted(text)}: must be a non-empty string"
            )
        name, at, digest = text.partition("@")
        first, slash, rest = name.partition("/")
        host = None
        if slash and names_registry(first):
            if registry:
                host, name = first, rest
            elif ":" in first and is_registry_host(first):
                raise InvalidReference(
                    f"invalid image reference {quoted(text)}: a registry host is not allowed "
                    f"here (drop {quoted(first + '/')})"
                )
        # With the host gone, a ':' can only introduce the tag.
        repository, colon, tag = name.partition(":")
        if not colon and not at:
            return cls(host, repository, default_tag, None)
        return cls(host, repository, tag if colon else None, digest if at else None)


def parse_reference(
    text: str, default_tag: str | None = "latest", *, registry: bool = True
) -> Reference:
    """`Reference.parse`: `[host[:port]/]name[:tag][@digest]` into its validated parts."""
    return Reference.parse(text, default_tag, registry=registry)


def parse_container_image(text: str, default_tag: str | None = "latest") -> Reference:
    """A container's image as a node pulls it: `repo[:tag]` or `repo@digest` in berth's
    registry, which has no host part, so a host-looking first component is part of the
    repository (`a.b/c` is the repository `a.b/c`; `host:5000/c` is refused, a repository name
    has no ':'). The node pulls with this rule and the cluster refuses up front what it
    refuses (ContainerConfig.validate), so no container waits Pending on a bad name."""
    ref = Reference.parse(text, default_tag)
    if ref.registry is None:
        return ref
    repository = validate_repository(f"{ref.registry}/{ref.repository}")
    return Reference(None, repository, ref.tag, ref.digest)
