"""Resumable blob transfers: the rules the blocking client and the services' async client share.

A download appends to `<dest>.partial` and hashes as it goes, so a later attempt goes on from
the bytes already there; a stream the connection broke is retried from where it stopped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import grpc

from berth.error_details import ErrorDetails
from berth.reference import InvalidReference

CHUNK_SIZE = 1 << 20
# Connection failures surface as UNAVAILABLE or CANCELLED, and sometimes as INTERNAL/UNKNOWN
# carrying transport text when the peer vanished mid-stream.
_BROKEN_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
_BROKEN_HINTS = ("stream removed", "rst_stream", "socket closed", "connection reset", "goaway")


def committed_offset(details: ErrorDetails) -> int | None:
    """Where an upload stands, as the registry's UPLOAD_OFFSET_MISMATCH refusal of a write at
    another offset says (a write whose answer was lost); None for any other error."""
    offset = details.metadata.get("offset", "")
    if details.reason != "UPLOAD_OFFSET_MISMATCH" or not offset.isdigit():
        return None
    return int(offset)


def is_broken_stream(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Whether a failed call was cut by the connection (worth resuming), not refused."""
    if code in _BROKEN_CODES:
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        lowered = (details or "").lower()
        return any(hint in lowered for hint in _BROKEN_HINTS)
    return False


def digest_hasher(digest: str) -> tuple[Any, str]:
    """(a new hasher of the digest's algorithm, the expected hex digest)."""
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "sha512") or not expected:
        raise InvalidReference(f'unsupported digest "{digest}"')
    return hashlib.new(algorithm), expected


def resume_download(partial: Path, digest: str, total: int) -> tuple[Any, str, int]:
    """(hasher fed with the partial file's bytes, expected hex digest, bytes already there).
    A partial file longer than the blob is not a prefix of it: it is deleted, and 0 returned."""
    hasher, expected = digest_hasher(digest)
    try:
        with open(partial, "rb") as existing:
            length = os.fstat(existing.fileno()).st_size
            if length > total:
                length = 0
            else:
                while chunk := existing.read(CHUNK_SIZE):
                    hasher.update(chunk)
    except FileNotFoundError:
        return hasher, expected, 0
    if length == 0:
        partial.unlink(missing_ok=True)
        hasher = hashlib.new(hasher.name)
    return hasher, expected, length
