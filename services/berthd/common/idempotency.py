"""`request_id` idempotency keys: a retried mutation returns the first attempt's result.

A client that retries `RunContainer` after a lost answer must not run a second container. The
first call with a `request_id` claims `requests/<scope>/<request_id>` in etcd; when it
succeeds, its response (serialized protobuf) replaces the claim. Keys expire with a lease
the hour's keys share, so a response is kept at least `TTL` seconds. A later call with the
same id gets that response back; one that arrives while the first is in flight gets ABORTED.
A failed call releases its claim, so the retry does the work.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from berthd.common.errors import Aborted, InvalidArgument
from berthd.common.store import Store

TTL = 24 * 3600
# A call in flight holds CLAIM; a finished one its response prefixed with DONE, so a response
# that serializes to no bytes is still told from a claim.
CLAIM = b"claim"
DONE = b"done:"
MAX_REQUEST_ID = 128
LEASE_REUSE = 3600
_leases: weakref.WeakKeyDictionary[Store, tuple[int, float]] = weakref.WeakKeyDictionary()

Response = TypeVar("Response", bound=Message)


def _key(scope: str, request_id: str) -> str:
    return f"requests/{scope}/{request_id}"


async def once(
    store: Store,
    scope: str,
    request_id: str,
    response_type: type[Response],
    work: Callable[[], Awaitable[Response]],
) -> Response:
    """Run `work` once per (`scope`, `request_id`); without a request_id, just run it."""
    if not request_id:
        return await work()
    if len(request_id) > MAX_REQUEST_ID or "/" in request_id:
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID} characters without '/'",
            field="request_id",
        )
    key = _key(scope, request_id)
    if not await store.create(key, CLAIM, lease=await _lease(store)):
        entry = await store.get(key)
        if entry is not None and entry.value.startswith(DONE):
            return response_type.FromString(entry.value[len(DONE) :])
        raise Aborted(
            f"a request with request_id {request_id!r} is in progress; retry in a moment",
            reason="REQUEST_IN_PROGRESS",
            metadata={"request_id": request_id},
        )
    try:
        response = await work()
    except BaseException:
        await store.delete(key)  # releases the claim: a retry does the work
        raise
    await store.put(key, DONE + response.SerializeToString(), lease=await _lease(store))
    return response


async def _lease(store: Store) -> int:
    """The lease the keys of this hour share: one grant an hour instead of one per call (an
    etcd write on RunContainer's path). It lives TTL + LEASE_REUSE seconds, so a key lives at
    least TTL."""
    held = _leases.get(store)
    now = time.monotonic()
    if held is None or now - held[1] > LEASE_REUSE:
        held = (await store.grant_lease(TTL + LEASE_REUSE), now)
        _leases[store] = held
    return held[0]
