"""`request_id` idempotency keys: a retried mutation returns the first attempt's result.

A client that retries `RunContainer` after a lost answer must not run a second container. The
first call with a `request_id` claims `requests/<scope>/<request_id>` in etcd; when it
succeeds, its response (serialized protobuf) replaces the claim. Responses expire with a lease
the hour's keys share, so a response is kept at least `TTL` seconds. A later call with the
same id gets that response back; one that arrives while the first is in flight gets ABORTED.

A claim holds a lease of its own (`CLAIM_TTL`), kept alive while the work runs: a failed call
revokes it (the retry does the work), and when the release or the response cannot be written
(etcd failing, the process killed) the claim expires within `CLAIM_TTL` of etcd's return, so
a retry is ABORTED for that long at most, never for the day. A call whose response could not
be recorded reported UNAVAILABLE to its client, so its outcome is unknown and the retry does
the work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from berthd.common.errors import Aborted, InvalidArgument, Unavailable
from berthd.common.store import Store

log = logging.getLogger("berthd.idempotency")

TTL = 24 * 3600
# How long a claim outlives the process or the etcd connection that holds it.
CLAIM_TTL = 30
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
    claim = await store.grant_lease(CLAIM_TTL)
    try:
        if not await store.create(key, CLAIM, lease=claim):
            entry = await store.get(key)
            if entry is not None and entry.value.startswith(DONE):
                return response_type.FromString(entry.value[len(DONE) :])
            raise Aborted(
                f"a request with request_id {request_id!r} is in progress; retry in a moment",
                reason="REQUEST_IN_PROGRESS",
                metadata={"request_id": request_id},
            )
        keeper = asyncio.create_task(_keep_alive(store, claim))
        try:
            response = await work()
        finally:
            keeper.cancel()
        # Moving the key to the hour's lease takes it off the claim's, which is revoked next.
        await store.put(key, DONE + response.SerializeToString(), lease=await _lease(store))
        return response
    finally:
        # Revoking deletes the claim if it is still one: a failed call's retry does the work.
        # When etcd refuses that too, the claim expires with its lease.
        with contextlib.suppress(Unavailable):
            await store.revoke_lease(claim)


async def _keep_alive(store: Store, lease: int) -> None:
    """Refresh a claim's lease while its work runs. A failed refresh is retried: etcd away,
    the lease keeps its time (and gets its full TTL back when etcd restarts)."""
    while True:
        await asyncio.sleep(CLAIM_TTL / 3)
        try:
            await store.refresh_lease(lease)
        except Unavailable as exc:
            log.warning("cannot refresh a request_id claim: %s", exc)


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
