"""`request_id` idempotency keys: a retried mutation returns the first attempt's result.

A client that retries `RunContainer` after a lost answer must not run a second container. The
first call with a `request_id` claims `requests/<scope>/<request_id>` in etcd; when it
succeeds, its response (serialized protobuf) replaces the claim: put after the work, or, for
work that writes one transaction (`once_recorded`: RunContainer's placement), in that very
transaction, so the call is one etcd write shorter and its response is recorded exactly when
its work is. Responses expire with a lease
the hour's keys share, so a response is kept at least `TTL` seconds. A later call with the
same id gets that response back; one that arrives while the first is in flight gets ABORTED.

Claims are bound to one lease per process and store (`CLAIM_TTL`), granted by the first claim
and kept alive by one background task while claims are in flight (it lets the lease lapse
once the process has none for a while, and the next claim grants another). A call costs
etcd two round trips: the claim's create and the response's put (which moves the key to the
hour's lease); a failed call's release is a delete guarded by the claim's own value (unique
per call), so the retry does the work. When etcd refuses that release, the background task
tries it again until etcd takes it; when the process is killed, its lease expires and its
claims with it within `CLAIM_TTL` of etcd's return, so a retry is ABORTED for that long at
most, never for the day. A call whose response could not be recorded reported UNAVAILABLE to
its client and released its claim, so its outcome is unknown and the retry does the work
again. A claim whose lease expired meanwhile (the process starved or cut off from etcd for
longer than `CLAIM_TTL`) is gone: the call still records its response, and the next claim
grants a new lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from berthd.common.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from berthd.common.store import LeaseNotFound, Store

log = logging.getLogger("berthd.idempotency")

TTL = 24 * 3600
# How long a claim outlives the process or the etcd connection that holds it.
CLAIM_TTL = 30
# A call in flight holds CLAIM and a token of its own (what its release compares); a finished
# one its response prefixed with DONE, so a response that serializes to no bytes is still told
# from a claim.
CLAIM = b"claim"
DONE = b"done:"
MAX_REQUEST_ID = 128
LEASE_REUSE = 3600
_leases: weakref.WeakKeyDictionary[Store, tuple[int, float]] = weakref.WeakKeyDictionary()

Response = TypeVar("Response", bound=Message)
Result = TypeVar("Result")


class Recording(Generic[Result]):
    """Handed to the work of a claimed `once_recorded` call: `op(result)` is the write that
    records the call's response, for the work's own transaction; the work calls `committed()`
    once that transaction succeeded, and the call then writes nothing after it. A transaction
    etcd refuses for this write's lease (LeaseNotFound: it lost the hour's lease) is tried
    again without it after `lease_lost()`; the call then puts the response itself."""

    def __init__(
        self, store: Store, key: str, lease: int, respond: Callable[[Result], Message]
    ) -> None:
        self._store = store
        self._key = key
        self._lease = lease
        self._respond = respond
        self._pending: Message | None = None  # what `op` wrote last
        self.response: Message | None = None  # the same, once committed

    def op(self, result: Result) -> Any:
        response = self._respond(result)
        self._pending = response
        value = DONE + response.SerializeToString()
        return self._store.op_put(self._key, value, lease=self._lease)

    def committed(self) -> None:
        self.response = self._pending

    def lease_lost(self) -> None:
        held = _leases.get(self._store)
        if held is not None and held[0] == self._lease:
            _leases.pop(self._store, None)


class _Claims:
    """A process's claims on one store: their shared lease, how many are in flight, the
    releases etcd refused (key -> claim value), and the one task that keeps it all."""

    def __init__(self) -> None:
        self.lease = 0  # 0: none held; the next claim grants one
        self.in_flight = 0
        self.active = False  # a claim was taken since the keeper's last round
        self.orphans: dict[str, bytes] = {}
        self.keeper: asyncio.Task[None] | None = None
        self.granting: asyncio.Lock | None = None


_claims: weakref.WeakKeyDictionary[Store, _Claims] = weakref.WeakKeyDictionary()


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

    async def unrecorded(_: Recording[Response] | None) -> Response:
        return await work()

    return await _once(store, scope, request_id, response_type, None, unrecorded)


async def once_recorded(
    store: Store,
    scope: str,
    request_id: str,
    response_type: type[Response],
    respond: Callable[[Result], Response],
    work: Callable[[Recording[Result] | None], Awaitable[Result]],
) -> Response:
    """As `once`, for work that writes its result in one etcd transaction: `work` gets a
    `Recording` (None without a request_id) to write the response (`respond(result)`) in
    that transaction. A retry then finds the response whenever the work's writes exist."""
    return await _once(store, scope, request_id, response_type, respond, work)


async def _once(
    store: Store,
    scope: str,
    request_id: str,
    response_type: type[Response],
    respond: Callable[[Any], Response] | None,
    work: Callable[[Any], Awaitable[Any]],
) -> Response:
    def response_of(result: Any) -> Response:
        return result if respond is None else respond(result)

    if not request_id:
        return response_of(await work(None))
    if len(request_id) > MAX_REQUEST_ID or "/" in request_id:
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID} characters without '/'",
            field="request_id",
        )
    key = _key(scope, request_id)
    claims = _claims.get(store)
    if claims is None:
        claims = _claims[store] = _Claims()
    claims.in_flight += 1
    claims.active = True
    if claims.keeper is None or claims.keeper.done():
        claims.keeper = asyncio.create_task(_keep(store, claims))
    try:
        claim = CLAIM + b":" + secrets.token_hex(8).encode()
        if not await _create(store, claims, key, claim):
            entry = await store.get(key)
            if entry is not None and entry.value.startswith(DONE):
                return response_type.FromString(entry.value[len(DONE) :])
            raise Aborted(
                f"a request with request_id {request_id!r} is in progress; retry in a moment",
                reason="REQUEST_IN_PROGRESS",
                metadata={"request_id": request_id},
            )
        recording = None
        if respond is not None:
            recording = Recording(store, key, await _lease(store), respond)
        recorded = False
        try:
            result = await work(recording)
            if recording is not None and recording.response is not None:
                recorded = True  # written with the work's own writes
                return recording.response  # type: ignore[return-value]
            response = response_of(result)
            # Moving the key to the hour's lease takes it off the claim's.
            await _put_done(store, key, DONE + response.SerializeToString())
            recorded = True
            return response
        finally:
            if not recorded:
                await _release(store, claims, key, claim)
    finally:
        claims.in_flight -= 1


async def close(store: Store) -> None:
    """Stop the keeper of `store`'s claims and give their lease back (shutdown, tests)."""
    claims = _claims.pop(store, None)
    if claims is None:
        return
    if claims.keeper is not None:
        claims.keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await claims.keeper
    if claims.lease and not claims.in_flight:
        with contextlib.suppress(Unavailable):
            await store.revoke_lease(claims.lease)


async def _create(store: Store, claims: _Claims, key: str, claim: bytes) -> bool:
    """Create the claim on the process's lease; once more on a new lease when etcd no longer
    has that one."""
    lease = await _claim_lease(store, claims)
    try:
        return await store.create(key, claim, lease=lease)
    except LeaseNotFound:
        if claims.lease == lease:
            claims.lease = 0
        return await store.create(key, claim, lease=await _claim_lease(store, claims))


async def _claim_lease(store: Store, claims: _Claims) -> int:
    """The lease the process's claims share: one grant for however many claims."""
    if claims.lease:
        return claims.lease
    if claims.granting is None:
        claims.granting = asyncio.Lock()
    async with claims.granting:  # a burst of first claims shares one grant
        if not claims.lease:
            claims.lease = await store.grant_lease(CLAIM_TTL)
    return claims.lease


async def _put_done(store: Store, key: str, value: bytes) -> None:
    try:
        await store.put(key, value, lease=await _lease(store))
    except LeaseNotFound:
        _leases.pop(store, None)  # etcd lost the hour's lease: grant another
        await store.put(key, value, lease=await _lease(store))


async def _release(store: Store, claims: _Claims, key: str, claim: bytes) -> None:
    """Delete the claim if it is still this call's; when etcd refuses, the keeper tries again
    (the claim's lease would otherwise keep it for as long as the process has claims)."""
    try:
        await store.txn([store.value_is(key, claim)], [store.op_delete(key)])
    except (Unavailable, ResourceExhausted) as exc:
        log.warning("cannot release a request_id claim, will try again: %s", exc)
        claims.orphans[key] = claim


async def _keep(store: Store, claims: _Claims) -> None:
    """Every CLAIM_TTL / 3 while claims are in flight (or releases are pending): release what
    etcd refused before, and refresh the lease. A failed refresh is retried: etcd away, the
    lease keeps its time (and gets its full TTL back when etcd restarts); one etcd no longer
    has is replaced by the next claim. Once a round finds nothing in flight, it ends and the
    lease lapses: an idle process writes nothing."""
    while True:
        await asyncio.sleep(CLAIM_TTL / 3)
        for key, claim in list(claims.orphans.items()):
            try:
                await store.txn([store.value_is(key, claim)], [store.op_delete(key)])
            except (Unavailable, ResourceExhausted):
                break
            if claims.orphans.get(key) == claim:
                del claims.orphans[key]
        if not (claims.in_flight or claims.active or claims.orphans):
            claims.lease = 0
            return
        claims.active = False
        if not claims.lease:
            continue
        try:
            if await store.refresh_lease(claims.lease) <= 0:
                claims.lease = 0
        except (Unavailable, ResourceExhausted) as exc:
            log.warning("cannot refresh the request_id claims' lease: %s", exc)


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
