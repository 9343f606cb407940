"""etcd's request limits through Store, against a real etcd (default --max-txn-ops 128 and
--max-request-bytes 1.5 MiB): a request over them is RESOURCE_EXHAUSTED with reason
ETCD_REQUEST_TOO_LARGE and one line a person can act on, not UNAVAILABLE (a retry fails the
same way) and not the client library's text; nothing of the request is written."""

from __future__ import annotations

import grpc
import pytest

from berthd.common.errors import ResourceExhausted
from berthd.common.store import ETCD_REQUEST_TOO_LARGE, Store


def _assert_one_clear_line(exc: ResourceExhausted) -> None:
    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.reason == ETCD_REQUEST_TOO_LARGE
    message = str(exc)
    assert "\n" not in message and "etcd" in message
    for raw in ("AioRpcError", "etcdserver:", "InvalidArgumentError", "debug_error_string"):
        assert raw not in message


async def test_a_transaction_over_the_op_limit(store: Store) -> None:
    ops = [store.op_put(f"many/{n:03}", b"x") for n in range(200)]
    with pytest.raises(ResourceExhausted) as raised:
        await store.txn([], ops)
    _assert_one_clear_line(raised.value)
    assert "200" in str(raised.value) and "128" in str(raised.value)
    with pytest.raises(ResourceExhausted) as raised:
        await store.txn_at([], ops)
    _assert_one_clear_line(raised.value)
    assert await store.list("many/") == []


@pytest.mark.parametrize("size", [1700 * 1024, 3 * 1024 * 1024])
async def test_a_put_over_the_request_size_limit(store: Store, size: int) -> None:
    """1.7 MiB: etcd's own "request is too large"; 3 MiB: past its gRPC message limit too."""
    with pytest.raises(ResourceExhausted) as raised:
        await store.put("big", b"x" * size)
    _assert_one_clear_line(raised.value)
    assert await store.get("big") is None
    # The store still works.
    await store.put("small", b"x")
    assert (await store.get("small")).value == b"x"
