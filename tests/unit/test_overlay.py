"""The overlay's pure parts: VNI and MAC derivation, the plan from slices and node addresses,
the kernel commands for a difference, and the forward rules (berthd.node.overlay)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from berthd.node.network import Attachment, bridge_name, nft_ruleset
from berthd.node.overlay import (
    Device,
    Peer,
    Underlay,
    commands,
    forward_rules,
    host_of,
    owned,
    plan,
    slice_key,
    vni,
    vtep_mac,
    vxlan_name,
)

NET = "3f" * 32
OTHER = "a7" * 32
SLICES = {
    NET: {"host1": "10.90.1.0/24", "host2": "10.90.2.0/24", "host3": "10.90.3.0/24"},
    OTHER: {"host3": "10.91.1.0/24"},
}
ADDRESSES = {"host1": "10.213.5.11", "host2": "10.213.5.12", "host3": "10.213.5.13"}
UNDERLAY = Underlay("10.213.5.11", 1500, frozenset({"10.213.5.11", "127.0.0.1"}))


def attached(network_id: str, slice_: str, node: str = "host1", internal: bool = False):
    return Attachment(
        network=network_id[:4],
        network_id=network_id,
        subnet="10.90.0.0/16",
        slice=slice_,
        bridge=bridge_name(network_id, node),
        internal=internal,
        netns="/nonexistent",
    )


def test_vni_and_mac_are_stable_24_bit_and_locally_administered() -> None:
    assert vni(NET) == vni(NET) and 0 <= vni(NET) < 2**24
    assert vni(NET) != vni(OTHER)
    mac = vtep_mac(NET, "host1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert mac == vtep_mac(NET, "host1") != vtep_mac(NET, "host2") != vtep_mac(OTHER, "host2")
    name = vxlan_name(bridge_name(NET, "host1"))
    assert name.startswith("vx-3f3f3f") and len(name) == 13 == len(bridge_name(NET, "host1"))
    assert owned(name, name[-4:]) and not owned(bridge_name(NET, "host1"), name[-4:])
    assert not owned(name, vxlan_name(bridge_name(NET, "host2"))[-4:])


def test_plan_has_a_peer_per_remote_slice_of_the_nodes_networks_only() -> None:
    devices = plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, ADDRESSES, UNDERLAY)
    name = vxlan_name(bridge_name(NET, "host1"))
    assert devices == {
        name: Device(
            name=name,
            vni=vni(NET),
            mac=vtep_mac(NET, "host1"),
            local="10.213.5.11",
            address="10.90.1.0/32",
            mtu=1450,
            peers=(
                Peer("host2", "10.90.2.0/24", "10.90.2.0", vtep_mac(NET, "host2"), "10.213.5.12"),
                Peer("host3", "10.90.3.0/24", "10.90.3.0", vtep_mac(NET, "host3"), "10.213.5.13"),
            ),
        )
    }


def test_a_peer_in_this_namespace_or_of_unknown_address_gets_no_tunnel() -> None:
    # host2 shares the namespace (berthd up): its bridge's connected route already leads there.
    shared = Underlay("10.213.5.11", 9000, frozenset({"10.213.5.11", "10.213.5.12"}))
    addresses = {k: v for k, v in ADDRESSES.items() if k != "host3"}
    (device,) = plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, addresses, shared).values()
    assert device.peers == () and device.mtu == 8950
    # A loopback node address (berthd up) or none known yet: no device at all.
    loopback = Underlay("127.0.0.1", 65536, frozenset({"127.0.0.1"}))
    assert plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, ADDRESSES, loopback) == {}
    assert plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, ADDRESSES, None) == {}
    assert not loopback.tunnels and UNDERLAY.tunnels


def test_commands_create_a_device_with_its_peers() -> None:
    devices = plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, ADDRESSES, UNDERLAY)
    (name,) = devices
    ip, fdb = commands(devices, {}, [], [], [])
    mac2, mac3 = vtep_mac(NET, "host2"), vtep_mac(NET, "host3")
    assert ip == [
        f"link add {name} type vxlan id {vni(NET)} local 10.213.5.11 dstport 4789 nolearning",
        f"link set {name} address {vtep_mac(NET, 'host1')} mtu 1450 up",
        f"addr flush dev {name} scope global",
        f"addr add 10.90.1.0/32 dev {name}",
        f"neigh replace 10.90.2.0 lladdr {mac2} dev {name} nud permanent",
        f"route replace 10.90.2.0/24 via 10.90.2.0 dev {name} onlink",
        f"neigh replace 10.90.3.0 lladdr {mac3} dev {name} nud permanent",
        f"route replace 10.90.3.0/24 via 10.90.3.0 dev {name} onlink",
    ]
    assert fdb == [
        f"fdb replace {mac2} dev {name} dst 10.213.5.12 self permanent",
        f"fdb replace {mac3} dev {name} dst 10.213.5.13 self permanent",
    ]


def kernel_view(device: Device) -> tuple[dict, list, list, list]:
    """What `ip -j`/`bridge -j` print for `device` as the kernel holds it."""
    found = {
        device.name: {
            "ifname": device.name,
            "address": device.mac,
            "mtu": device.mtu,
            "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
            "linkinfo": {
                "info_kind": "vxlan",
                "info_data": {
                    "id": device.vni,
                    "local": device.local,
                    "port": 4789,
                    "learning": False,
                },
            },
            "addr_info": [{"family": "inet", "local": device.address[:-3], "prefixlen": 32}],
        }
    }
    routes = [{"dst": p.subnet, "gateway": p.vtep, "dev": device.name} for p in device.peers]
    routes.append({"dst": "10.213.5.0/24", "dev": "eth0"})
    neighbours = [{"dst": p.vtep, "dev": device.name, "lladdr": p.mac} for p in device.peers]
    fdb = [{"mac": p.mac, "dst": p.underlay, "ifname": device.name} for p in device.peers]
    return found, routes, neighbours, fdb


def test_commands_write_only_the_difference() -> None:
    before = plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, ADDRESSES, UNDERLAY)
    (device,) = before.values()
    # The kernel holds the plan: nothing to write.
    assert commands(before, *kernel_view(device)) == ([], [])
    # host3 released its slice and host2 moved to another address.
    slices = {NET: {"host1": "10.90.1.0/24", "host2": "10.90.2.0/24"}}
    after = plan(
        "host1",
        [attached(NET, "10.90.1.0/24")],
        slices,
        {**ADDRESSES, "host2": "10.213.5.22"},
        UNDERLAY,
    )
    ip, fdb = commands(after, *kernel_view(device))
    name, mac2, mac3 = device.name, vtep_mac(NET, "host2"), vtep_mac(NET, "host3")
    assert ip == [f"route del 10.90.3.0/24 dev {name}", f"neigh del 10.90.3.0 dev {name}"]
    assert fdb == [
        f"fdb del {mac3} dev {name} dst 10.213.5.13 self",
        f"fdb replace {mac2} dev {name} dst 10.213.5.22 self permanent",
    ]


def test_commands_remake_a_changed_device_and_delete_one_no_longer_planned() -> None:
    devices = plan("host1", [attached(NET, "10.90.1.0/24")], SLICES, ADDRESSES, UNDERLAY)
    (device,) = devices.values()
    found, routes, neighbours, fdb = kernel_view(device)
    found[device.name]["linkinfo"]["info_data"]["local"] = "10.213.5.99"  # the node moved
    stale = vxlan_name(bridge_name(OTHER, "host1"))
    found[stale] = {"ifname": stale}
    ip, _ = commands(devices, found, routes, neighbours, fdb)
    assert ip[:3] == [
        f"link del {stale}",
        f"link del {device.name}",
        f"link add {device.name} type vxlan id {vni(NET)} local 10.213.5.11 dstport 4789 "
        "nolearning",
    ]
    # The new device's entries are written again: the old ones went with the old device.
    assert f"route replace 10.90.2.0/24 via 10.90.2.0 dev {device.name} onlink" in ip
    assert commands({}, {stale: {"ifname": stale}}, [], [], []) == ([f"link del {stale}"], [])


def test_slice_keys_and_node_addresses() -> None:
    assert slice_key(f"networks/slices/{NET}/host2") == (NET, "host2")
    assert slice_key(f"networks/{NET}") is None
    assert slice_key("networks/slices/x/") is None
    assert host_of("10.213.5.11:40123") == "10.213.5.11"
    assert host_of("[::1]:5") == "::1"
    assert host_of("") is None


def test_forward_rules_keep_a_network_to_its_own_devices() -> None:
    bridge = bridge_name(NET, "host1")
    vx, mine = vxlan_name(bridge), "bn-3f3f3f*"
    reject = "reject with icmpx type admin-prohibited"
    assert forward_rules(bridge, internal=False) == [
        f'iifname "{vx}" oifname != "{bridge}" {reject}',
        f'iifname "{bridge}" oifname "bn-*" oifname != "{mine}" oifname != "{vx}" {reject}',
        f'iifname "{bridge}" oifname "vx-*" oifname != "{mine}" oifname != "{vx}" {reject}',
    ]
    assert forward_rules(bridge, internal=True) == [
        f'iifname "{vx}" oifname != "{bridge}" {reject}',
        f'iifname "{bridge}" oifname != "{mine}" oifname != "{vx}" {reject}',
        f'oifname "{bridge}" iifname != "{mine}" iifname != "{vx}" {reject}',
    ]


@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables is not installed")
def test_the_ruleset_with_the_overlays_rules_is_valid_nft() -> None:
    rules = nft_ruleset(
        "berth_1234",
        [attached(NET, "10.90.1.0/24"), attached(OTHER, "10.91.1.0/24", internal=True)],
    )
    assert 'oifname != "vx-3f3f3f' in rules and 'iifname "vx-a7a7a7' in rules
    done = subprocess.run(
        ["nft", "--check", "-f", "-"], input=rules, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
