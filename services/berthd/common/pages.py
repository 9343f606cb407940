"""Pages of a listing (docs/api.md, Pagination): one page size rule and one page token for
every List and Search call of every service.

A token is opaque to clients. It carries the listing it belongs to (`scope`: the call and its
filters, hashed) and where the listing goes on (`position`: an offset, or the sort key of the
last item returned, which stays right when items are added or removed between pages). A token
given back with other filters, or to another call, is refused with INVALID_ARGUMENT, reason
INVALID_PAGE_TOKEN, field `page_token`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from berthd.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page_size(requested: int) -> int:
    """The page size a request's `page_size` means: 0 is the default, at most the maximum."""
    if requested < 0:
        raise InvalidArgument(f"page_size must not be negative, got {requested}", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def scope_of(listing: str, *filters: object) -> str:
    """A scope naming a call ("registry.Search") and its filters, short whatever they are."""
    text = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return f"{listing}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def request_scope(listing: str, request: Message) -> str:
    """The scope of a request: its call and every field but the paging ones."""
    filters = type(request)()
    filters.CopyFrom(request)
    for name in ("page_size", "page_token"):
        filters.ClearField(name)
    return scope_of(listing, filters.SerializeToString(deterministic=True).hex())


def bad_token(why: str = "") -> InvalidArgument:
    return InvalidArgument(
        "invalid page_token: pass back the next_page_token of the previous page, with the same "
        f"filters{why}",
        reason="INVALID_PAGE_TOKEN",
        field="page_token",
    )


def encode_token(scope: str, *position: Any) -> str:
    """The token of the page after `position` in the listing `scope` names."""
    text = json.dumps([scope, *position], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_token(token: str, scope: str) -> list[Any] | None:
    """The position in a token encode_token made for `scope`; None for a first page (no token).
    The caller checks the position's shape and raises bad_token() when it is wrong."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise bad_token() from None
    if not isinstance(data, list) or not data or not data[1:]:
        raise bad_token()
    if data[0] != scope:
        raise bad_token(" (it belongs to another call or other filters)")
    return data[1:]


def paginate(listing: str, request: Message, items: Sequence[T]) -> tuple[list[T], str]:
    """The page of `items` (the whole listing, in its order) that `request` asks for, and the
    next page's token ("" on the last page). `listing` names the call ("cluster.ListNodes")."""
    size = page_size(int(getattr(request, "page_size", 0)))
    scope = request_scope(listing, request)
    position = decode_token(getattr(request, "page_token", ""), scope)
    start = 0
    if position is not None:
        if len(position) != 1 or not isinstance(position[0], int) or position[0] < 0:
            raise bad_token()
        start = position[0]
    end = start + size
    return list(items[start:end]), encode_token(scope, end) if end < len(items) else ""
