"""Networks without etcd or a kernel: the slice allocator, subnets, the CNI config and the
nftables ruleset a node writes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from berthd.common.state.networks import (
    NETWORKS,
    NetworkRecord,
    Slice,
    first_free_slice,
    free_subnet,
    overlapping,
)
from berthd.node.network import Attachment, bridge_name, cni_config, nft_ruleset, table_name

NET_ID = "3f" * 32


def test_slices_are_the_first_free_24_after_the_networks_first() -> None:
    assert first_free_slice("10.89.0.0/16", []) == "10.89.1.0/24"
    assert first_free_slice("10.89.0.0/16", ["10.89.1.0/24"]) == "10.89.2.0/24"
    # A gap left by a node that released its slice is reused first.
    assert first_free_slice("10.89.0.0/16", ["10.89.2.0/24", "10.89.3.0/24"]) == "10.89.1.0/24"


def test_a_small_network_is_one_slice_and_a_full_one_has_none() -> None:
    assert first_free_slice("192.168.7.0/24", []) == "192.168.7.0/24"
    assert first_free_slice("192.168.7.0/24", ["192.168.7.0/24"]) is None
    taken = [f"10.1.{n}.0/24" for n in range(1, 4)]
    assert first_free_slice("10.1.0.0/22", taken) is None


def test_slice_gateway_is_its_first_address() -> None:
    assert Slice("10.89.4.0/24").gateway == "10.89.4.1"


def test_overlap_and_automatic_subnets() -> None:
    default = NetworkRecord(id="a", name="berth", subnet="10.89.0.0/16")
    assert overlapping("10.89.200.0/24", [default]) is default
    assert overlapping("10.90.0.0/16", [default]) is None
    assert free_subnet([default]) == "10.90.0.0/16"
    assert free_subnet([]) == "10.89.0.0/16"


def test_network_family_skips_the_names_and_slices_subtrees() -> None:
    assert NETWORKS.id_of(f"networks/{NET_ID}") == NET_ID
    assert NETWORKS.id_of("networks/names/web") is None
    assert NETWORKS.id_of(f"networks/slices/{NET_ID}/host1") is None


def test_record_round_trips() -> None:
    record = NetworkRecord(id=NET_ID, name="web", subnet="10.90.0.0/16", internal=True)
    assert NetworkRecord.decode(NET_ID, record.encode()) == record


def test_cni_config_is_a_bridge_over_host_local_in_the_slice(tmp_path: Path) -> None:
    network = NetworkRecord(id=NET_ID, name="web", subnet="10.90.0.0/16")
    bridge = bridge_name(NET_ID, "host1")
    config = cni_config(network, Slice("10.90.3.0/24"), tmp_path, bridge)
    # Two agents in one namespace (berthd up) have bridges and tables of their own.
    assert bridge.startswith("bn-3f3f3f") and bridge != bridge_name(NET_ID, "host2")
    assert table_name("host1") != table_name("host2")
    assert config["type"] == "bridge" and config["bridge"] == bridge
    assert config["isGateway"] and config["hairpinMode"] and not config["ipMasq"]
    assert config["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.90.3.0/24", "gateway": "10.90.3.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(tmp_path),
    }
    assert len(config["bridge"]) <= 15
    json.dumps(config)


def attachment(network_id: str, slice_: str, subnet: str, internal: bool = False) -> Attachment:
    return Attachment(
        network=network_id[:4],
        network_id=network_id,
        subnet=subnet,
        slice=slice_,
        bridge=f"bn-{network_id[:8]}",
        internal=internal,
        netns="/nonexistent",
    )


def test_ruleset_masquerades_slices_and_isolates_bridges() -> None:
    a = attachment("aa" * 32, "10.89.1.0/24", "10.89.0.0/16")
    b = attachment("bb" * 32, "10.90.1.0/24", "10.90.0.0/16")
    c = attachment("cc" * 32, "10.91.1.0/24", "10.91.0.0/16", internal=True)
    rules = nft_ruleset("berth_1234", [a, a, b, c])
    assert rules.startswith("table inet berth_1234 {}\nflush table inet berth_1234\n")
    # Another network's bridge is refused; the network's own bridges and vxlan device are
    # not (berthd.node.overlay, tests/unit/test_overlay.py).
    assert (
        'iifname "bn-aaaaaaaa" oifname "bn-*" oifname != "bn-aaaaaa*" oifname != "vx-aaaaaaaa" '
        "reject with icmpx type admin-prohibited" in rules
    )
    assert (
        'ip saddr 10.89.1.0/24 ip daddr != 10.89.0.0/16 oifname != "bn-aaaaaaaa" masquerade'
        in rules
    )
    assert rules.count("masquerade") == 2  # one per network, none for the internal one
    assert 'iifname "bn-cccccccc" oifname != "bn-cccccc*" oifname != "vx-cccccccc" reject' in rules


@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables is not installed")
def test_ruleset_is_valid_nft_syntax() -> None:
    rules = nft_ruleset(
        "berth_1234",
        [
            attachment("aa" * 32, "10.89.1.0/24", "10.89.0.0/16"),
            attachment("cc" * 32, "10.91.1.0/24", "10.91.0.0/16", internal=True),
        ],
    )
    # --check parses and validates against the kernel without changing anything.
    done = subprocess.run(
        ["nft", "--check", "-f", "-"], input=rules, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_a_network_name_travels_as_network_mode_network_plus_its_name() -> None:
    from berth.containers import ContainerConfig, InvalidContainerConfig, from_spec, to_spec
    from berth.types.v1 import container_pb2 as pb

    spec = to_spec(ContainerConfig("busybox", network_mode="front"))
    assert (spec.network_mode, spec.network) == (pb.NETWORK_MODE_NETWORK, "front")
    assert from_spec(spec).network_mode == "front"
    for mode in ("none", "host"):
        spec = to_spec(ContainerConfig("busybox", network_mode=mode))
        assert spec.network == "" and from_spec(spec).network_mode == mode
    with pytest.raises(InvalidContainerConfig, match="needs the network's name"):
        from_spec(pb.ContainerSpec(image="busybox", network_mode=pb.NETWORK_MODE_NETWORK))
    for bad in ("bridge", "a/b", ""):
        with pytest.raises(InvalidContainerConfig, match="unsupported network mode"):
            ContainerConfig("busybox", network_mode=bad).validate()


class _NoStore:
    """A store whose every use fails: the test shows nothing asks etcd."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"etcd asked ({name})")


def test_a_node_already_on_the_network_asks_etcd_nothing(tmp_path: Path) -> None:
    import asyncio

    from berthd.node.network import NetworkManager

    manager = NetworkManager(_NoStore(), "node-1", tmp_path / "data", tmp_path / "run")  # type: ignore[arg-type]
    other = Attachment(
        network="front",
        network_id=NET_ID,
        subnet="10.90.0.0/16",
        slice="10.90.3.0/24",
        bridge=bridge_name(NET_ID, "node-1"),
        internal=True,
        netns="",
    )
    network, slice_ = asyncio.run(manager._network_and_slice("front", [other]))
    assert (network.id, network.name, network.subnet, network.internal) == (
        NET_ID,
        "front",
        "10.90.0.0/16",
        True,
    )
    assert slice_ == Slice("10.90.3.0/24")
    # Another network's container is no help: etcd is asked (and fails here).
    with pytest.raises(AssertionError, match="etcd asked"):
        asyncio.run(manager._network_and_slice("back", [other]))
