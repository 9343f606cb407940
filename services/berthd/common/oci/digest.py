"""Content digests as OCI uses them: `sha256:<64 lowercase hex>`, nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import re

from berthd.common.errors import InvalidArgument

ALGORITHM = "sha256"
_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
# The image-spec's general digest grammar; a value matching it with another algorithm is
# well-formed but unsupported, which deserves a different message than garbage.
_ANY_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):[a-zA-Z0-9=_-]+")
_READ_SIZE = 1024 * 1024
_MAX_SHOWN = 200


def quoted(value: object) -> str:
    """Render a user-supplied value for a one-line error message: JSON-quoted, truncated."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = f"{text[:_MAX_SHOWN]}...({len(text)} chars)"
    return text


def parse_digest(value: str) -> str:
    """Return `value` if it is a sha256 digest berth accepts, else raise InvalidArgument."""
    if isinstance(value, str) and _SHA256_RE.fullmatch(value):
        return value
    if isinstance(value, str):
        m = _ANY_DIGEST_RE.fullmatch(value)
        if m and m.group(1) != ALGORITHM:
            raise InvalidArgument(
                f"unsupported digest algorithm {quoted(m.group(1))} in {quoted(value)}: "
                "only sha256 is supported"
            )
    raise InvalidArgument(f"invalid digest {quoted(value)}: expected sha256:<64 lowercase hex>")


def digest_bytes(data: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def hex_of(digest: str) -> str:
    """The hex part of a digest, e.g. for blob paths `blobs/sha256/<hex>`."""
    return parse_digest(digest).partition(":")[2]


def digest_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Digest and size of a file, read in 1 MiB chunks so large layers need no memory."""
    d = Digester()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_SIZE):
            d.update(chunk)
    return d.digest, d.size


class Digester:
    """Incremental sha256 that also counts bytes, for verifying streamed uploads."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self._size += len(data)

    @property
    def digest(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"

    @property
    def size(self) -> int:
        return self._size

    def copy(self) -> Digester:
        """An independent digester with the same state (e.g. to checkpoint a chunked upload)."""
        other = Digester.__new__(Digester)
        other._hash = self._hash.copy()
        other._size = self._size
        return other
