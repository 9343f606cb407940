"""berthd.node.ingress: which slices the routing mesh holds on a node, and which it gives back.
The claims and releases are recorded, not made (the integration tests make them in etcd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berthd.common.state.containers import ContainerStatus
from berthd.common.state.networks import NetworkRecord, Slice
from berthd.node import ingress
from berthd.node.ingress import Ingress
from berthd.node.network import Attachment, bridge_name
from berthd.node.ports import Mesh, replica_of


class Recorded:
    def __init__(self) -> None:
        self.claimed: list[str] = []
        self.released: list[tuple[str, str]] = []

    async def claim(self, network: NetworkRecord) -> Slice:
        self.claimed.append(network.id)
        return Slice(network.subnet.replace(".0.0/16", ".3.0/24"))

    async def release(self, network_id: str, subnet: str) -> None:
        self.released.append((network_id, subnet))


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    monkeypatch.setattr(ingress, "IP_FORWARD", tmp_path / "ip_forward")
    return Recorded()


def attached(network_id: str, slice_: str) -> Attachment:
    return Attachment("n", network_id, "10.90.0.0/16", slice_, "bn-x", False, "/ns")


async def test_the_mesh_holds_a_slice_only_where_no_container_holds_one(
    recorded: Recorded,
) -> None:
    held = Ingress(None, "node-2", recorded.claim, recorded.release)
    local = [attached("bbb", "10.90.1.0/24")]
    wanted = {"aaa": ("front", "10.91.0.0/16"), "bbb": ("back", "10.90.0.0/16")}
    stand_ins, dropped = await held.sync(local, wanted)
    # A claim for the network with no container here; the other's slice is its container's.
    assert recorded.claimed == ["aaa"]
    assert [(a.network_id, a.slice, a.bridge) for a in stand_ins] == [
        ("aaa", "10.91.3.0/24", bridge_name("aaa", "node-2"))
    ]
    assert dropped == []
    assert held.holds("aaa") and held.holds("bbb")
    # Held already: no claim again.
    await held.sync(local, wanted)
    assert recorded.claimed == ["aaa"]
    # The backends go: the mesh's own slice is given back, the container's is not.
    stand_ins, dropped = await held.sync(local, {})
    assert stand_ins == []
    assert [a.network_id for a in dropped] == ["aaa"]
    await held.release_all(dropped)
    assert recorded.released == [("aaa", "10.91.3.0/24")]
    assert not held.holds("bbb")


async def test_a_claim_that_fails_leaves_the_network_for_the_next_change(
    recorded: Recorded,
) -> None:
    async def full(network: NetworkRecord) -> Slice:
        raise RuntimeError("no free slice")

    held = Ingress(None, "node-2", full, recorded.release)
    stand_ins, _ = await held.sync([], {"aaa": ("front", "10.91.0.0/24")})
    assert stand_ins == [] and not held.holds("aaa")


def test_the_mesh_knows_its_replicas_networks() -> None:
    status = ContainerStatus(
        state="running",
        ingress="8088:80/tcp",
        network={"ip_address": "10.90.1.2", "network_id": "aaa", "network": "front",
                 "subnet": "10.90.0.0/16"},
    )  # fmt: skip
    mesh = Mesh(None, lambda ports: None)  # type: ignore[arg-type]
    replica = replica_of(status)
    assert replica is not None
    mesh.replicas = {"c1": replica}
    assert mesh.networks() == {"aaa": ("front", "10.90.0.0/16")}
