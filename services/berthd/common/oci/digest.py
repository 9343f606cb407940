"""Content digests as OCI uses them: `sha256:<64 lowercase hex>`, nothing else."""

from __future__ import annotations

import hashlib
import os

from berth.reference import DIGEST_ALGORITHM as ALGORITHM
from berth.reference import quoted, validate_digest
from berthd.common.oci.reference import invalid_argument

__all__ = [
    "ALGORITHM",
    "Digester",
    "digest_bytes",
    "digest_file",
    "hex_of",
    "parse_digest",
    "quoted",
]

_READ_SIZE = 1024 * 1024


def parse_digest(value: str) -> str:
    """Return `value` if it is a sha256 digest berth accepts, else raise InvalidArgument.

    The syntax is `berth.reference.validate_digest`, shared with the client."""
    with invalid_argument():
        return validate_digest(value)


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
