"""Pages of a listing (docs/api.md, Pagination) for the node's and the cluster's List calls.

A listing is computed whole (it is read from memory or one etcd range), sorted, then cut: the
page token is opaque to clients and carries the offset of the next item plus a fingerprint of
the call and its filters, so a token given back with other filters (or to another call) is
refused with INVALID_ARGUMENT, reason INVALID_PAGE_TOKEN, field `page_token`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

from berthd.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def _fingerprint(listing: str, request: Message) -> str:
    """The call and its filters: the request without its paging fields."""
    filters = type(request)()
    filters.CopyFrom(request)
    for name in ("page_size", "page_token"):
        filters.ClearField(name)
    digest = hashlib.sha256(
        listing.encode() + b"\0" + filters.SerializeToString(deterministic=True)
    )
    return digest.hexdigest()[:16]


def _bad_token(listing: str) -> InvalidArgument:
    return InvalidArgument(
        f"invalid page_token for {listing}: pass back the next_page_token of the previous page, "
        "with the same filters",
        reason="INVALID_PAGE_TOKEN",
        field="page_token",
    )


def page_size(request: Message) -> int:
    size = int(getattr(request, "page_size", 0))
    if size < 0:
        raise InvalidArgument(
            f"page_size must not be negative, got {size}",
            reason="INVALID_ARGUMENT",
            field="page_size",
        )
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _offset(listing: str, request: Message) -> int:
    token = getattr(request, "page_token", "")
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
        offset, fingerprint = int(data["o"]), str(data["f"])
    except (ValueError, KeyError, TypeError):
        raise _bad_token(listing) from None
    if offset < 0 or fingerprint != _fingerprint(listing, request):
        raise _bad_token(listing)
    return offset


def _token(listing: str, request: Message, offset: int) -> str:
    data = json.dumps({"o": offset, "f": _fingerprint(listing, request)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def paginate(listing: str, request: Message, items: Sequence[T]) -> tuple[list[T], str]:
    """The page of `items` (the whole listing, in its order) that `request` asks for, and the
    next page's token ("" on the last page). `listing` names the call ("cluster.ListNodes")."""
    size = page_size(request)
    start = _offset(listing, request)
    end = start + size
    token = _token(listing, request, end) if end < len(items) else ""
    return list(items[start:end]), token
