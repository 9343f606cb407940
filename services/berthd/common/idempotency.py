"""`request_id` idempotency keys: a retried mutation returns the first attempt's result.

A client that retries `RunContainer` after a lost answer must not run a second container. The
first call with a `request_id` claims `requests/<scope>/<request_id>` in etcd; when it
succeeds, its response (serialized protobuf) replaces the claim, under a lease of `TTL`
seconds. A later call with the same id gets that response back; one that arrives while the
first is in flight gets ABORTED. A failed call releases its claim, so the retry does the work.
"""

from __future__ import annotations

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
    lease = await store.grant_lease(TTL)
    if not await store.create(key, CLAIM, lease=lease):
        await store.revoke_lease(lease)
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
        await store.revoke_lease(lease)  # releases the claim: a retry does the work
        raise
    await store.put(key, DONE + response.SerializeToString(), lease=lease)
    return response
