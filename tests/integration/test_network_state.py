"""Networks against a real etcd, without processes: the cluster's create/remove transactions
and the nodes' slice claims, raced."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from berthd.cluster.networks import NetworkCore
from berthd.common.errors import AlreadyExists, BerthError, NotFound
from berthd.common.state.networks import DEFAULT_NETWORK, NAMES, slices
from berthd.common.store import Store
from berthd.node.network import NetworkManager

pytestmark = pytest.mark.integration


async def test_nodes_racing_for_slices_each_get_their_own(store: Store, tmp_path: Path) -> None:
    core = NetworkCore(store)
    network = await core.create("race", "10.150.0.0/16")
    managers = [
        NetworkManager(store, f"node{n}", tmp_path / f"node{n}", tmp_path / f"run{n}")
        for n in range(8)
    ]
    claimed = await asyncio.gather(*(m.claim_slice(network) for m in managers))
    subnets = [s.subnet for s in claimed]
    assert sorted(subnets) == sorted(f"10.150.{n}.0/24" for n in range(1, 9))
    # A node asking again keeps its slice.
    assert (await managers[3].claim_slice(network)).subnet == subnets[3]
    # A release frees the slice for the next node that asks.
    await managers[0].release_slice(network.id, subnets[0])
    late = NetworkManager(store, "late", tmp_path / "late", tmp_path / "runlate")
    assert (await late.claim_slice(network)).subnet == subnets[0]
    # Removing the network takes every slice with it.
    await core.remove("race")
    assert await slices(network.id).records(store) == {}


async def test_creates_racing_for_one_name_or_range_make_one_network(store: Store) -> None:
    core = NetworkCore(store)
    same_name = await asyncio.gather(
        *(core.create("twin", "") for _ in range(4)), return_exceptions=True
    )
    made = [r for r in same_name if not isinstance(r, BaseException)]
    assert len(made) == 1
    assert all(isinstance(r, AlreadyExists) for r in same_name if isinstance(r, BaseException))
    same_range = await asyncio.gather(
        *(core.create(f"r{n}", "10.160.0.0/16") for n in range(4)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in same_range) == 1
    refused = [r for r in same_range if isinstance(r, BerthError)]
    assert {r.reason for r in refused} == {"SUBNET_OVERLAP"}
    # Automatic ranges never overlap either.
    auto = await asyncio.gather(*(core.create(f"a{n}") for n in range(4)))
    assert len({a.subnet for a in auto}) == 4


async def test_the_default_network_is_made_once(store: Store) -> None:
    await asyncio.gather(*(NetworkCore(store).ensure_default() for _ in range(3)))
    assert await NAMES.get(store, DEFAULT_NETWORK) is not None
    assert [n.name for n in await NetworkCore(store).list()] == [DEFAULT_NETWORK]
    with pytest.raises(NotFound):
        await NetworkCore(store).remove("nope")
