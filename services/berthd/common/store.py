"""The one place that talks to etcd: a key prefix, JSON values, transactions, watches, leases.

Services address keys relative to the prefix (`registry/tags/<repo>/<tag>`), so several test
runs or clusters can share one etcd. Racing writes go through `txn` with compares on create or
mod revisions, never read-then-write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd import rpc, transactions, utils, watcher

from berth.errors import is_transport_failure, one_line
from berth.tls import plaintext_mode
from berthd.common.config import split_host_port
from berthd.common.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger("berthd.store")


@dataclass(frozen=True)
class Entry:
    """One key-value pair; `key` is relative to the store's prefix."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    # The revision of the change (of a delete: the revision that deleted the key), so a
    # reader that also reads keys directly can tell which of the two is newer.
    mod_revision: int = 0


@dataclass(frozen=True)
class Page:
    """Keys of one range read, the store revision they were read at, and whether keys beyond
    the limit remain in the range."""

    entries: list[Entry]
    revision: int
    more: bool


class RevisionCompacted(Aborted):
    """A read asked for a revision that etcd has compacted away; start over at the latest."""


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (non-empty): a range end."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


Compare = transactions.BaseCompare
Op = transactions.Put | transactions.Delete | transactions.Get


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _txn_bytes(*branches: Sequence[Op]) -> int:
    """The keys and values a transaction writes, in bytes (what a size error names)."""
    return sum(
        len(op.key) + len(getattr(op, "value", b"") or b"") for ops in branches for op in ops
    )


# The reason of every error that comes from etcd being unreachable or failing (docs/api.md).
ETCD_UNAVAILABLE = "ETCD_UNAVAILABLE"

# How the errors of etcd's client library arrive: aetcd's own (wrapping grpc's), grpc's from
# the stubs called directly, and the client's connect wait.
ETCD_ERRORS = (etcd_errors.ClientError, grpc.RpcError, TimeoutError)


def etcd_unavailable(endpoint: str, exc: BaseException) -> Unavailable:
    """The one error for etcd failing a call, whatever the call: UNAVAILABLE with reason
    ETCD_UNAVAILABLE and a message that names the store and the cause in one line, never the
    library's text with its repr and debug string."""
    reachable, cause = _etcd_cause(exc)
    what = "cannot be reached" if not reachable else "failed"
    return Unavailable(
        f"the cluster state store (etcd at {endpoint}) {what} ({cause}); retry once it is back",
        reason=ETCD_UNAVAILABLE,
        metadata={"endpoint": endpoint},
    )


def _etcd_cause(exc: BaseException) -> tuple[bool, str]:
    """(whether etcd answered at all, the cause in a few words)."""
    rpc_error = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    if isinstance(exc, TimeoutError):
        return False, "no answer in time"
    if isinstance(rpc_error, grpc.RpcError) and callable(getattr(rpc_error, "code", None)):
        code = rpc_error.code()
        details = one_line(rpc_error.details() or "")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, "no answer in time"
        if code == grpc.StatusCode.UNAVAILABLE and is_transport_failure(details):
            # grpc's text ends with the root cause ("...: Connection refused").
            return False, details.rsplit(": ", 1)[-1].strip(" []").lower() or "unavailable"
        if code == grpc.StatusCode.UNAVAILABLE:
            return False, details or "unavailable"
        return True, details or code.name
    if isinstance(exc, etcd_errors.ConnectionFailedError | etcd_errors.ConnectionTimeoutError):
        return False, one_line(str(exc)) or "no connection"
    return True, one_line(str(exc)) or type(exc).__name__


# The reason of a request etcd refuses for its size: more operations in one transaction than
# --max-txn-ops, or more bytes than --max-request-bytes. A retry fails the same way, so it is
# not UNAVAILABLE.
ETCD_REQUEST_TOO_LARGE = "ETCD_REQUEST_TOO_LARGE"


def _too_large(exc: BaseException) -> str | None:
    """ "ops" or "bytes" when etcd refused the request for its size, else None."""
    rpc_error = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    if not isinstance(rpc_error, grpc.RpcError) or not callable(getattr(rpc_error, "code", None)):
        return None
    code, details = rpc_error.code(), rpc_error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT and "too many operations" in details:
        return "ops"
    if code == grpc.StatusCode.INVALID_ARGUMENT and "request is too large" in details:
        return "bytes"
    # Past etcd's gRPC message limit (--max-request-bytes plus 512 KiB), gRPC refuses it first.
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return "bytes"
    return None


def etcd_request_too_large(
    endpoint: str, kind: str, ops: int | None, size: int | None
) -> ResourceExhausted:
    if kind == "ops":
        what = f"a transaction of {ops} operations" if ops else "a transaction"
        limit = "its limit of operations per transaction (--max-txn-ops, 128 by default)"
    else:
        what = f"a request of {size} bytes" if size else "a request"
        limit = "its request size limit (--max-request-bytes, 1.5 MiB by default)"
    return ResourceExhausted(
        f"the cluster state store (etcd at {endpoint}) refused {what}: over {limit}",
        reason=ETCD_REQUEST_TOO_LARGE,
        metadata={"endpoint": endpoint},
    )


# The reason of every write refused because etcd's database reached its quota (a NOSPACE
# alarm): writes fail until an operator compacts, defragments and disarms the alarm, so a retry
# does not help; reads still work.
ETCD_SPACE_EXCEEDED = "ETCD_SPACE_EXCEEDED"


def _space_exceeded(exc: BaseException) -> bool:
    rpc_error = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    if not isinstance(rpc_error, grpc.RpcError) or not callable(getattr(rpc_error, "code", None)):
        return False
    return rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in (
        rpc_error.details() or ""
    )


def etcd_space_exceeded(endpoint: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"the cluster state store (etcd at {endpoint}) is full: its database reached its quota "
        "(--quota-backend-bytes); compact and defragment it, then disarm the NOSPACE alarm",
        reason=ETCD_SPACE_EXCEEDED,
        metadata={"endpoint": endpoint},
    )


class LeaseNotFound(Unavailable):
    """A write named a lease etcd no longer has (it expired): grant another and write again.
    To a caller that does not, it is etcd failing like any other (ETCD_UNAVAILABLE)."""


def _lease_not_found(exc: BaseException) -> bool:
    rpc_error = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
    if not isinstance(rpc_error, grpc.RpcError) or not callable(getattr(rpc_error, "code", None)):
        return False
    return rpc_error.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in (
        rpc_error.details() or ""
    )


@contextlib.contextmanager
def _etcd_errors(endpoint: str, ops: int | None = None, size: int | None = None) -> Iterator[None]:
    try:
        yield
    except etcd_errors.RevisionCompactedError as exc:
        raise RevisionCompacted(f"etcd revision was compacted: {exc}") from exc
    except ETCD_ERRORS as exc:
        if kind := _too_large(exc):
            raise etcd_request_too_large(endpoint, kind, ops, size) from exc
        if _space_exceeded(exc):
            raise etcd_space_exceeded(endpoint) from exc
        if _lease_not_found(exc):
            error = etcd_unavailable(endpoint, exc)
            raise LeaseNotFound(str(error), details=error.details) from exc
        raise etcd_unavailable(endpoint, exc) from exc


# grpc waits up to 2 minutes between reconnection attempts after a long outage; etcd back
# must be found within seconds (health turns SERVING again, calls work).
CHANNEL_OPTIONS = {"grpc.max_reconnect_backoff_ms": 2000}
# Keys per transaction of Store.get_many: under etcd's --max-txn-ops (128 by default).
GET_MANY_BATCH = 100


class _TlsClient(aetcd.Client):
    """aetcd's client over TLS with a client certificate: aetcd 1.0 only opens plaintext
    channels, so `connect` is aetcd's own with the channel made by berthd.common.rpc. The
    credentials are asked for at each (re)connection, so a renewed certificate is used."""

    def __init__(
        self, host: str, port: int, credentials: Callable[[], grpc.ChannelCredentials]
    ) -> None:
        super().__init__(host=host, port=port, timeout=10, options=CHANNEL_OPTIONS)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        from berthd.common.rpc.channels import etcd_channel

        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = etcd_channel(target, self._credentials(), list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def env_credentials() -> Callable[[], grpc.ChannelCredentials] | None:
    """etcd client credentials from BERTH_TLS_CA/CERT/KEY (tools and tests), or None."""
    ca, cert, key = (os.environ.get(f"BERTH_TLS_{n}") for n in ("CA", "CERT", "KEY"))
    if not ca:
        return None
    creds = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(),
        Path(key).read_bytes() if key else None,
        Path(cert).read_bytes() if cert else None,
    )
    return lambda: creds


class Store:
    """`credentials` gives the TLS client credentials for etcd (a service passes its
    instance's; by default BERTH_TLS_CA/CERT/KEY; plaintext only when none are set)."""

    def __init__(
        self,
        endpoint: str,
        prefix: str = "/berth/",
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
    ) -> None:
        host, port = split_host_port(endpoint)
        self.endpoint = endpoint
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        credentials = credentials or env_credentials()
        self._retired: list[aetcd.Client] = []
        if credentials is None or plaintext_mode():
            self._client = aetcd.Client(host=host, port=port, timeout=10, options=CHANNEL_OPTIONS)
        else:
            self._client = _TlsClient(host, port, credentials)

    async def reconnect(self) -> None:
        """A new connection for every call from now on, made with the credentials of now (a
        renewed certificate). Watches and calls in flight carry on over the old connection,
        kept open until `close` (one idle channel per renewal: a day's certificate makes one
        every 16 hours), so no watcher sees its stream cut by a renewal."""
        old = self._client
        if not isinstance(old, _TlsClient):
            return
        new = _TlsClient(old._host, old._port, old._credentials)
        with _etcd_errors(self.endpoint):
            await new.connect()
        self._client = new
        self._retired.append(old)

    async def connect(self) -> None:
        with _etcd_errors(self.endpoint):
            await self._client.connect()
            await self._client.status()

    async def ping(self, timeout: float = 2.0) -> None:
        """One cheap call (etcd's Status) that fails with ETCD_UNAVAILABLE within `timeout`
        when etcd cannot be reached: the health watchdog's probe."""
        with _etcd_errors(self.endpoint):
            await asyncio.wait_for(self._client.connect(), timeout)
            await self._client.maintenancestub.Status(rpc.StatusRequest(), timeout=timeout)

    async def close(self) -> None:
        for retired in self._retired:
            with contextlib.suppress(Exception):
                await retired.close()
        await self._client.close()

    # Keys -----------------------------------------------------------------

    def _abs(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _rel(self, key: bytes) -> str:
        return key.decode()[len(self.prefix) :]

    def written(self, op: Op) -> tuple[str, bytes | None]:
        """What a put or delete op writes: its key (relative) and value (None: a delete)."""
        value = op.value if isinstance(op, transactions.Put) else None
        return self._rel(op.key), value

    def _entry(self, kv: Any) -> Entry:
        return Entry(self._rel(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.lease)

    # Reads ----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        with _etcd_errors(self.endpoint):
            result = await self._client.get(self._abs(key))
        return self._entry(result) if result is not None else None

    async def get_at(self, key: str) -> tuple[Entry | None, int]:
        """Key `key` (or None) and the store revision it was read at: its absence is known as
        of that revision."""
        request = rpc.RangeRequest(key=self._abs(key))
        with _etcd_errors(self.endpoint):
            await self._client.connect()
            response = await self._client.kvstub.Range(request, timeout=10)
        entry = self._entry(response.kvs[0]) if response.kvs else None
        return entry, int(response.header.revision)

    async def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """Point reads of many keys, each key's entry (or None) in order: one transaction of
        range ops per GET_MANY_BATCH keys instead of one round trip per key. Each batch is
        consistent in itself (one revision); batches may be read at different revisions."""
        found: list[Entry | None] = []
        for start in range(0, len(keys), GET_MANY_BATCH):
            batch = keys[start : start + GET_MANY_BATCH]
            request = rpc.TxnRequest(
                success=[
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=self._abs(key)))
                    for key in batch
                ]
            )
            with _etcd_errors(self.endpoint, ops=len(batch)):
                await self._client.connect()
                response = await self._client.kvstub.Txn(request, timeout=10)
            for op in response.responses:
                kvs = op.response_range.kvs
                found.append(self._entry(kvs[0]) if kvs else None)
        return found

    async def get_json(self, key: str) -> Any | None:
        entry = await self.get(key)
        return entry.json() if entry else None

    async def list(
        self,
        prefix: str,
        *,
        start_after: str | None = None,
        limit: int = 0,
        keys_only: bool = False,
    ) -> list[Entry]:
        """Keys under `prefix` in key order, optionally after a key and at most `limit`."""
        end = utils.prefix_range_end(self._abs(prefix))
        start = self._abs(start_after) + b"\0" if start_after else self._abs(prefix)
        request = rpc.RangeRequest(
            key=start,
            range_end=end,
            limit=limit,
            keys_only=keys_only,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        with _etcd_errors(self.endpoint):
            await self._client.connect()
            response = await self._client.kvstub.Range(request, timeout=10)
        return [self._entry(kv) for kv in response.kvs]

    async def range(self, start: str, end: str, *, limit: int = 0, revision: int = 0) -> Page:
        """Keys in [start, end) in key order, at most `limit` (0: all), as they were at
        `revision` (0: now). The page carries the revision it was read at, so later reads at
        that revision see the same moment: one consistent view across several reads.
        `prefix_end(p)` as `end` ends the range after the keys starting with `p`."""
        request = rpc.RangeRequest(
            key=self._abs(start),
            range_end=self._abs(end),
            limit=limit,
            revision=revision,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )
        with _etcd_errors(self.endpoint):
            await self._client.connect()
            try:
                response = await self._client.kvstub.Range(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
                    raise RevisionCompacted(f"etcd revision {revision} was compacted") from exc
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "future" in details:
                    raise InvalidArgument(f"etcd revision {revision} is in the future") from exc
                raise
        # The header holds the store's current revision, which is the one read at only when
        # no revision was asked for.
        return Page(
            [self._entry(kv) for kv in response.kvs],
            revision or int(response.header.revision),
            bool(response.more),
        )

    async def snapshot(self, prefix: str) -> tuple[list[Entry], int]:
        """Every key under `prefix` and the store revision they were read at, so a watch
        started at revision + 1 misses nothing and repeats nothing."""
        request = rpc.RangeRequest(
            key=self._abs(prefix), range_end=utils.prefix_range_end(self._abs(prefix))
        )
        with _etcd_errors(self.endpoint):
            await self._client.connect()
            response = await self._client.kvstub.Range(request, timeout=10)
        return [self._entry(kv) for kv in response.kvs], int(response.header.revision)

    async def count(self, prefix: str) -> int:
        request = rpc.RangeRequest(
            key=self._abs(prefix),
            range_end=utils.prefix_range_end(self._abs(prefix)),
            count_only=True,
        )
        with _etcd_errors(self.endpoint):
            await self._client.connect()
            response = await self._client.kvstub.Range(request, timeout=10)
        return int(response.count)

    async def iterate(self, prefix: str, batch: int = 500) -> AsyncIterator[Entry]:
        """Every key under `prefix`, fetched in batches so huge prefixes stay cheap."""
        async for entry in self.iterate_range(prefix, prefix_end(prefix), batch=batch):
            yield entry

    async def iterate_range(
        self, start: str, end: str, *, revision: int = 0, batch: int = 500
    ) -> AsyncIterator[Entry]:
        """Every key in [start, end) as at `revision` (0: now), in batches that keep each
        reply small."""
        while True:
            page = await self.range(start, end, limit=batch, revision=revision)
            for entry in page.entries:
                yield entry
            if not page.more or not page.entries:
                return
            start = page.entries[-1].key + "\0"

    # Writes ---------------------------------------------------------------

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        with _etcd_errors(self.endpoint, size=len(value)):
            await self._client.put(self._abs(key), value, lease=lease)

    async def put_json(self, key: str, value: Any, lease: int | None = None) -> None:
        await self.put(key, encode(value), lease)

    async def create(self, key: str, value: bytes, lease: int | None = None) -> bool:
        """Put only if the key does not exist; False if it did."""
        ok, _ = await self.txn([self.absent(key)], [self.op_put(key, value, lease)])
        return ok

    async def delete(self, key: str) -> bool:
        with _etcd_errors(self.endpoint):
            return bool(await self._client.delete(self._abs(key)))

    async def delete_prefix(self, prefix: str) -> int:
        with _etcd_errors(self.endpoint):
            result = await self._client.delete_prefix(self._abs(prefix))
        return int(getattr(result, "deleted", 0))

    # Transactions -----------------------------------------------------------

    def absent(self, key: str) -> Compare:
        return transactions.Create(self._abs(key)) == 0

    def unchanged(self, key: str, mod_revision: int) -> Compare:
        """The key still has this mod revision (0: it still does not exist)."""
        return transactions.Mod(self._abs(key)) == mod_revision

    def value_is(self, key: str, value: bytes) -> Compare:
        return transactions.Value(self._abs(key)) == value

    def unchanged_since(self, prefix: str, revision: int) -> Compare:
        """No key under `prefix` was created or changed after `revision` (a deletion is not
        seen): a check over a whole family read at that revision, in one compare."""
        start = self._abs(prefix)
        mod = transactions.Mod(start, range_end=utils.prefix_range_end(start))
        return mod < revision + 1

    def op_put(self, key: str, value: bytes | Any, lease: int | None = None) -> Op:
        raw = value if isinstance(value, bytes) else encode(value)
        return transactions.Put(self._abs(key), raw, lease=lease)

    def op_delete(self, key: str) -> Op:
        return transactions.Delete(self._abs(key))

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> tuple[bool, list[Any]]:
        ops = max(len(compare), len(success), len(failure))
        with _etcd_errors(self.endpoint, ops=ops, size=_txn_bytes(success, failure)):
            return await self._client.transaction(list(compare), list(success), list(failure))

    async def txn_at(self, compare: Sequence[Compare], success: Sequence[Op]) -> tuple[bool, int]:
        """`txn` without failure ops, returning whether it succeeded and the store revision it
        ran at: the mod revision of every key it wrote, so the writer can apply its own writes
        to a view it keeps (the watch then brings them again at the same revision)."""
        request = rpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=self._client._ops_to_requests(list(success)),
        )
        ops = max(len(compare), len(success))
        with _etcd_errors(self.endpoint, ops=ops, size=_txn_bytes(success)):
            await self._client.connect()
            response = await self._client.kvstub.Txn(request, timeout=10)
        return bool(response.succeeded), int(response.header.revision)

    # Leases and watches -------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        with _etcd_errors(self.endpoint):
            lease = await self._client.lease(ttl)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive; returns its remaining TTL (0: it has expired)."""
        with _etcd_errors(self.endpoint):
            reply = await self._client.refresh_lease(lease_id)
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        with _etcd_errors(self.endpoint):
            await self._client.revoke_lease(lease_id)

    def watch_prefix(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        start = self._abs(prefix)
        return self._watch(start, utils.prefix_range_end(start), start_revision)

    def watch_range(
        self, start: str, end: str, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Changes of the keys in [start, end), in revision order (the changes of one
        transaction in the order of its ops), from `start_revision`."""
        return self._watch(self._abs(start), self._abs(end), start_revision)

    async def _watch(
        self, start: bytes, end: bytes, start_revision: int | None
    ) -> AsyncIterator[WatchEvent]:
        with _etcd_errors(self.endpoint):
            watch = await self._client.watch(start, range_end=end, start_revision=start_revision)
        try:
            # The stream breaks when etcd goes away: the same error as any other call.
            with _etcd_errors(self.endpoint):
                async for event in watch:
                    kind: Literal["put", "delete"] = "put" if event.kind == "PUT" else "delete"
                    kv = event.kv
                    yield WatchEvent(kind, self._rel(kv.key), kv.value, int(kv.mod_revision))
        finally:
            # Best effort: on a broken stream there is nothing left to cancel.
            with contextlib.suppress(*ETCD_ERRORS):
                await watch.cancel()


class LeaseKeeper:
    """Holds a lease alive in the background and re-registers keys if it ever expires."""

    def __init__(
        self,
        store: Store,
        ttl: int,
        keys: dict[str, bytes],
        on_register: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._keys = keys
        # Told each new lease id, for keys its owner writes later under the same lease.
        self._on_register = on_register
        self.lease_id = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._keep_alive())

    async def _register(self) -> None:
        self.lease_id = await self._store.grant_lease(self._ttl)
        for key, value in self._keys.items():
            await self._store.put(key, value, lease=self.lease_id)
        if self._on_register is not None:
            self._on_register(self.lease_id)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(max(self._ttl / 3, 0.5))
            try:
                if await self._store.refresh_lease(self.lease_id) <= 0:
                    log.warning("lease expired; registering again")
                    await self._register()
            except (Unavailable, ResourceExhausted) as exc:  # etcd away, or full: next round
                log.warning("lease keep-alive failed: %s", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Unavailable):
            await self._store.revoke_lease(self.lease_id)
