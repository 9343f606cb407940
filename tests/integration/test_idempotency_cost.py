"""What a `request_id` call costs etcd, against a real etcd: once the process's claim lease is
granted, a claimed call is two round trips (the claim's create and the response's put) and a
failed one two (the create and the release), where each granted and revoked a lease of its own
(four)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from berth.types.v1 import types_pb2
from berthd.common import idempotency
from berthd.common.errors import NotFound

from .counting import RequestCountingStore, opened

pytestmark = pytest.mark.integration


@pytest.fixture
async def requests(etcd_endpoint: str, etcd_prefix: str) -> AsyncIterator[RequestCountingStore]:
    async with opened(RequestCountingStore, etcd_endpoint, etcd_prefix) as s:
        yield s


async def test_a_claimed_call_is_two_etcd_round_trips(
    requests: RequestCountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No keep-alive round falls inside the test, however slow the machine.
    monkeypatch.setattr(idempotency, "CLAIM_TTL", 600)

    async def work() -> types_pb2.Descriptor:
        return types_pb2.Descriptor(size=1)

    async def fails() -> types_pb2.Descriptor:
        raise NotFound("no such image")

    # The first call grants what the process's calls share (the claim lease, the hour's lease).
    await idempotency.once(requests, "t", "warm", types_pb2.Descriptor, work)
    requests.writes = requests.reads = 0
    for n in range(10):
        await idempotency.once(requests, "t", f"r{n}", types_pb2.Descriptor, work)
    assert (requests.writes, requests.reads) == (20, 0)
    requests.writes = 0
    for n in range(10):
        with pytest.raises(NotFound):
            await idempotency.once(requests, "t", f"f{n}", types_pb2.Descriptor, fails)
    assert (requests.writes, requests.reads) == (20, 0)
    # Nothing of the failed calls is left: their retries do the work.
    assert await requests.list("requests/t/f") == []
    # A retry of a done call reads its response: the create (refused) and one read.
    requests.writes = requests.reads = 0
    again = await idempotency.once(requests, "t", "r3", types_pb2.Descriptor, fails)
    assert again.size == 1 and (requests.writes, requests.reads) == (1, 1)
