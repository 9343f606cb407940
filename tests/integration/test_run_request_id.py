"""RunContainer with a `request_id` against a real etcd, through the cluster's servicer: the
response is recorded in the placement's own transaction, so a run is two etcd writes (the
claim's create and the placement) where it was three (and a response put after it), and a
retry still gets the same container."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from berth.cluster.v1 import cluster_pb2 as pb
from berth.types.v1 import container_pb2
from berthd.cluster.core import ClusterCore
from berthd.cluster.service import ClusterServicer
from berthd.common import idempotency
from berthd.common.state.containers import CONTAINERS
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store

from .counting import RequestCountingStore, opened

pytestmark = pytest.mark.integration

GiB = 1 << 30
SCOPE = "cluster.RunContainer"


class Requests(RequestCountingStore):
    """Counts the puts (a response recorded after the work) and the placement transactions
    apart: a placement refused because the watched view lagged is one more transaction,
    which the machine's timing decides."""

    puts = 0
    placements = 0

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        self.puts += 1
        await super().put(key, value, lease)

    async def txn_at(self, compare, success):  # type: ignore[no-untyped-def]
        self.placements += 1
        return await super().txn_at(compare, success)


@pytest.fixture
async def requests(etcd_endpoint: str, etcd_prefix: str) -> AsyncIterator[Requests]:
    async with opened(Requests, etcd_endpoint, etcd_prefix) as s:
        yield s


@pytest.fixture
async def servicer(
    store: Store, requests: Requests, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ClusterServicer]:
    # No keep-alive round of the claims' lease falls inside a test, however slow the machine.
    monkeypatch.setattr(idempotency, "CLAIM_TTL", 600)
    for node in ("n1", "n2", "n3"):
        await NODES.put(store, node, NodeRecord(node, cpus=4, memory_bytes=4 * GiB))
    core = ClusterCore(requests)
    yield ClusterServicer(core)
    await core.close()


def run_request(request_id: str, name: str = "") -> pb.RunContainerRequest:
    return pb.RunContainerRequest(
        spec=container_pb2.ContainerSpec(image="busybox", name=name, command=["true"]),
        request_id=request_id,
    )


async def test_a_run_with_a_request_id_is_two_etcd_writes(
    servicer: ClusterServicer, requests: Requests
) -> None:
    # The first run grants what the process's runs share (the claims' lease, the hour's lease)
    # and loads the placement view.
    await servicer.RunContainer(run_request("warm"), None)
    requests.writes = requests.puts = requests.placements = 0
    for n in range(10):
        await servicer.RunContainer(run_request(f"r{n}", name=f"c{n}"), None)
    # Each: the claim's create and the placement's transaction, which records the response;
    # no put after it (before: 30 writes, 10 of them the responses' puts).
    assert requests.puts == 0
    assert requests.writes == 10 + requests.placements
    assert requests.placements < 13


async def test_a_retry_gets_the_container_of_the_first_run(
    servicer: ClusterServicer, requests: Requests, store: Store
) -> None:
    request_id = uuid.uuid4().hex
    first = await servicer.RunContainer(run_request(request_id, name="web"), None)
    again = await servicer.RunContainer(run_request(request_id, name="web"), None)
    assert again == first
    assert [*await CONTAINERS.records(store)] == [first.container.id]
    # The response outlives the claim: it is on the hour's lease, not the claims' one.
    entry = await store.get(f"requests/{SCOPE}/{request_id}")
    assert entry is not None and entry.value.startswith(idempotency.DONE)
    assert entry.lease == idempotency._leases[requests][0]


async def test_a_burst_records_every_response(
    servicer: ClusterServicer, requests: Requests
) -> None:
    await servicer.RunContainer(run_request("warm"), None)
    ids = [uuid.uuid4().hex for _ in range(30)]
    requests.writes = requests.puts = requests.placements = 0
    runs = await asyncio.gather(*(servicer.RunContainer(run_request(i), None) for i in ids))
    # 30 claims and the burst's few placement transactions; no response put after them.
    assert requests.puts == 0 and requests.placements < 15
    assert requests.writes == 30 + requests.placements
    again = await asyncio.gather(*(servicer.RunContainer(run_request(i), None) for i in ids))
    assert again == runs and len({r.container.id for r in runs}) == 30


async def test_a_lost_hour_lease_still_records_the_response(
    servicer: ClusterServicer, requests: Requests
) -> None:
    await servicer.RunContainer(run_request("warm"), None)
    # etcd no longer has the hour's lease the responses go on.
    await requests.revoke_lease(idempotency._leases[requests][0])
    first = await servicer.RunContainer(run_request("after-loss"), None)
    again = await servicer.RunContainer(run_request("after-loss"), None)
    assert again == first
