"""etcd's request limits through Store, against a real etcd (default --max-txn-ops 128 and
--max-request-bytes 1.5 MiB): a request over them is RESOURCE_EXHAUSTED with reason
ETCD_REQUEST_TOO_LARGE and one line a person can act on, not UNAVAILABLE (a retry fails the
same way) and not the client library's text; nothing of the request is written. An etcd whose
database reached its quota (an etcd of the test's own, with a small one) is RESOURCE_EXHAUSTED
ETCD_SPACE_EXCEEDED for every write, and still answers reads."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from berthd.common.errors import ResourceExhausted
from berthd.common.store import ETCD_REQUEST_TOO_LARGE, ETCD_SPACE_EXCEEDED, Store

from .conftest import ClusterCA
from .own_etcd import OwnEtcd


def _assert_one_clear_line(exc: ResourceExhausted, reason: str = ETCD_REQUEST_TOO_LARGE) -> None:
    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.reason == reason
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


async def test_a_full_etcd_refuses_writes_as_space_exceeded_and_still_answers_reads(
    tmp_path: Path, cluster_ca: ClusterCA
) -> None:
    etcd = OwnEtcd(tmp_path / "etcd", cluster_ca, f"--quota-backend-bytes={4 * 1024 * 1024}")
    etcd.directory.mkdir()
    etcd.start()
    store = Store(etcd.endpoint, "/full/")
    try:
        await store.connect()
        await store.put("first", b"kept")
        with pytest.raises(ResourceExhausted) as raised:
            for n in range(100):  # 100 MiB: far past the 4 MiB quota
                await store.put(f"filler/{n}", b"x" * (1024 * 1024))
        _assert_one_clear_line(raised.value, ETCD_SPACE_EXCEEDED)
        assert "quota" in str(raised.value)
        assert (await store.get("first")).value == b"kept"
        with pytest.raises(ResourceExhausted):
            await store.txn([], [store.op_put("second", b"x")])
        # Deletes still work: a claim's release, an operator's clean-up.
        assert await store.delete("first")
    finally:
        await store.close()
        etcd.stop()
