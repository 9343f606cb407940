"""Containers of one network on different nodes: flannel's VXLAN backend, L3 per slice.

Each node holds a /24 slice of a network's range (berthd.common.state.networks), on its bridge
`bn-<6 hex of the network id><node tag>`. For each such network (and each network its routing
mesh reaches with no container of its own there: berthd.node.ingress, whose slice has no
bridge) the node also has a kernel vxlan device `vx-<same 10 hex>`:

    ip link add vx-… type vxlan id <VNI> local <underlay address> dstport 4789 nolearning

with a VNI from the network id (24 bits of its hash: the same on every node), a MAC from
(network id, node id) (so no node stores or publishes it), MTU = underlay MTU - 50 (the VXLAN
headers; containers get that MTU too, through the CNI config, so they never send a frame the
tunnel cannot carry) and the slice's .0 as a /32, so traffic the host itself sends into the
overlay has a source the peers route back. For every REMOTE slice of the network:

    ip route replace <remote /24> via <remote .0> dev vx-… onlink
    ip neigh replace <remote .0> lladdr <remote VTEP MAC> dev vx-… nud permanent
    bridge fdb replace <remote VTEP MAC> dev vx-… dst <remote underlay address> self permanent

so the kernel neither floods nor learns: every entry is written from etcd. The peers are the
slices under `networks/slices/` and the nodes' addresses (`nodes/<id>`: the host part of the
agent's advertised address), followed by one watch on each prefix while the node has any
network (node records are bound to their agent's lease, so an address can appear after the
slice of its node; a node record that expires keeps its last address here). Every change is
applied as a difference against what the kernel holds (read back, not remembered), so an agent
that restarts adopts its devices and corrects what changed meanwhile.

A peer whose underlay address is one of this namespace's own (the agents of `berthd up` share
one namespace) needs no tunnel: its bridge is in this namespace and its slice's connected
route already leads there; the nftables rules let bridges of one network forward to each other.
A node whose own address is a loopback one (`berthd up`) makes no vxlan devices at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from berthd.common.config import split_host_port
from berthd.common.state.networks import SLICES_PREFIX, Slice
from berthd.common.state.nodes import NODES
from berthd.common.store import Store
from berthd.node.network import BRIDGE_PREFIX, REJECT, Attachment, _run

log = logging.getLogger("berthd.node.overlay")

VXLAN_PREFIX = "vx-"
VXLAN_PORT = 4789  # IANA's VXLAN port, as flannel and Docker's overlay
# Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) headers.
VXLAN_OVERHEAD = 50
RETRY_SECONDS = 2.0


# Names and numbers -----------------------------------------------------------------------


def vxlan_name(bridge: str) -> str:
    """The vxlan device that goes with a network's bridge: `vx-` and the bridge's 10 hex
    (network and node), so `berthd down`'s sweep finds both by the node's tag."""
    return VXLAN_PREFIX + bridge[len(BRIDGE_PREFIX) :]


def vni(network_id: str) -> int:
    """The network's VXLAN id: 24 bits of a hash of its id, the same on every node."""
    return int(hashlib.sha256(network_id.encode()).hexdigest()[:6], 16)


def vtep_mac(network_id: str, node_id: str) -> str:
    """The MAC of a node's vxlan device of a network: a hash, unicast and locally administered,
    so any node computes any peer's without asking it."""
    raw = bytearray(hashlib.sha256(f"{network_id}/{node_id}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def vtep_address(subnet: str) -> str:
    """A slice's .0, the address of its node's vxlan device (as flannel's)."""
    return str(ipaddress.IPv4Network(subnet).network_address)


# The plan: what the kernel should hold, from the slices and the nodes' addresses -----------


@dataclass(frozen=True)
class Peer:
    """A remote node's slice of a network, reached through the tunnel."""

    node: str
    subnet: str
    vtep: str  # the slice's .0: the route's gateway, with a permanent neighbour entry
    mac: str
    underlay: str  # where its VXLAN packets go (the FDB entry)


@dataclass(frozen=True)
class Device:
    """One vxlan device and its peers."""

    name: str
    vni: int
    mac: str
    local: str
    address: str  # <slice .0>/32
    mtu: int
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class Underlay:
    """This node's address between hosts, its device's MTU and the namespace's addresses."""

    address: str
    mtu: int
    local_addresses: frozenset[str] = field(default_factory=frozenset)

    @property
    def tunnels(self) -> bool:
        """A loopback address (`berthd up`) reaches no other host: no tunnel to make."""
        return not ipaddress.IPv4Address(self.address).is_loopback

    @property
    def container_mtu(self) -> int:
        return self.mtu - VXLAN_OVERHEAD


def plan(
    node_id: str,
    local: Iterable[Attachment],
    slices: Mapping[str, Mapping[str, str]],
    addresses: Mapping[str, str],
    underlay: Underlay | None,
) -> dict[str, Device]:
    """The vxlan devices of this node, by name: one per network it has a bridge for (`local`:
    one attachment per network is enough), with a peer per slice of that network (`slices`:
    network id -> node -> subnet) held by a node whose underlay address is known and not in
    this namespace (`addresses`: node -> address)."""
    if underlay is None or not underlay.tunnels:
        return {}
    devices = {}
    for a in local:
        peers = []
        for node, subnet in sorted(slices.get(a.network_id, {}).items()):
            address = addresses.get(node)
            if node == node_id or address is None or address in underlay.local_addresses:
                continue
            mac = vtep_mac(a.network_id, node)
            peers.append(Peer(node, subnet, vtep_address(subnet), mac, address))
        name = vxlan_name(a.bridge)
        devices[name] = Device(
            name=name,
            vni=vni(a.network_id),
            mac=vtep_mac(a.network_id, node_id),
            local=underlay.address,
            address=f"{vtep_address(a.slice)}/32",
            mtu=underlay.container_mtu,
            peers=tuple(peers),
        )
    return devices


def forward_rules(bridge: str, internal: bool) -> list[str]:
    """The nftables forward rules of one network on this node (berth's table, see
    berthd.node.network.nft_ruleset). The network's own devices: its bridge here, its vxlan
    device here, and its bridges of other nodes in this namespace (`bn-<network's 6 hex>*`:
    the agents of `berthd up`). Between those, forwarding is accepted; a berth device of
    another network is refused; an internal network reaches nothing but its own devices."""
    vxlan = vxlan_name(bridge)
    same_network = f"{bridge[: len(BRIDGE_PREFIX) + 6]}*"
    own = f'oifname != "{same_network}" oifname != "{vxlan}"'
    rules = [
        # What comes out of the tunnel goes to the network's bridge here, nowhere else.
        f'iifname "{vxlan}" oifname != "{bridge}" {REJECT}',
    ]
    if internal:
        rules += [
            f'iifname "{bridge}" {own} {REJECT}',
            f'oifname "{bridge}" iifname != "{same_network}" iifname != "{vxlan}" {REJECT}',
        ]
    else:
        # Rejected, not dropped: a connection to another network fails at once.
        rules += [
            f'iifname "{bridge}" oifname "{BRIDGE_PREFIX}*" {own} {REJECT}',
            f'iifname "{bridge}" oifname "{VXLAN_PREFIX}*" {own} {REJECT}',
        ]
    return rules


# The kernel --------------------------------------------------------------------------------


def _json(argv: list[str]) -> list[dict[str, Any]]:
    out = _run(argv)
    return json.loads(out) if out.strip() else []


def underlay_of(address: str) -> Underlay:
    """The underlay for this node's address (an IPv4 address, or a name resolved here): the
    MTU of the device that holds it, and every address of this namespace."""
    try:
        ip = str(ipaddress.IPv4Address(address))
    except ValueError:
        ip = socket.gethostbyname(address)
    mtu, local = 1500, set()
    for link in _json(["ip", "-j", "addr", "show"]):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                local.add(info["local"])
                if info["local"] == ip:
                    mtu = int(link.get("mtu", mtu))
    return Underlay(ip, mtu, frozenset(local))


def owned(name: str, tag: str) -> bool:
    """A vxlan device of the node with this tag (`vx-` + 6 + 4 hex)."""
    return name.startswith(VXLAN_PREFIX) and name.endswith(tag) and len(name) == 13


def current_devices(tag: str) -> dict[str, dict[str, Any]]:
    """The node's vxlan devices in this namespace, by name: `ip -d addr` (link and
    addresses)."""
    return {
        link["ifname"]: link
        for link in _json(["ip", "-j", "-d", "addr", "show", "type", "vxlan"])
        if owned(link["ifname"], tag)
    }


def _same_device(found: dict[str, Any], device: Device) -> bool:
    data = found.get("linkinfo", {}).get("info_data", {})
    return (data.get("id"), data.get("local"), data.get("port"), data.get("learning")) == (
        device.vni,
        device.local,
        VXLAN_PORT,
        False,
    )


def commands(
    devices: Mapping[str, Device],
    found: Mapping[str, dict[str, Any]],
    routes: Collection[dict[str, Any]],
    neighbours: Collection[dict[str, Any]],
    fdb: Collection[dict[str, Any]],
) -> tuple[list[str], list[str]]:
    """The `ip -batch` and `bridge -batch` lines that turn what the kernel holds (`found`
    devices; `routes`, `neighbours` and `fdb` entries as `-j` prints them) into `devices`."""
    ip_lines: list[str] = []
    fdb_lines: list[str] = []
    for name in sorted(set(found) - set(devices)):
        ip_lines.append(f"link del {name}")
    for name, dev in sorted(devices.items()):
        existing = found.get(name)
        if existing is not None and not _same_device(existing, dev):
            ip_lines.append(f"link del {name}")
            existing = None
        if existing is None:
            ip_lines.append(
                f"link add {name} type vxlan id {dev.vni} local {dev.local} "
                f"dstport {VXLAN_PORT} nolearning"
            )
        if (
            existing is None
            or existing.get("address") != dev.mac
            or existing.get("mtu") != dev.mtu
            or "UP" not in existing.get("flags", [])
        ):
            ip_lines.append(f"link set {name} address {dev.mac} mtu {dev.mtu} up")
        addresses = {
            f"{a['local']}/{a['prefixlen']}"
            for a in (existing or {}).get("addr_info", [])
            if a.get("family") == "inet"
        }
        if addresses != {dev.address}:
            ip_lines.append(f"addr flush dev {name} scope global")
            ip_lines.append(f"addr add {dev.address} dev {name}")
        # Only what differs is written; entries of peers that left are deleted. A device
        # made now has none yet (a deleted one took its entries with it).
        kept_routes: dict[str, Any] = {}
        kept_neighbours: dict[str, Any] = {}
        kept_fdb: dict[str, Any] = {}
        if existing is not None:
            kept_routes = {r["dst"]: r.get("gateway") for r in routes if r.get("dev") == name}
            kept_neighbours = {
                n["dst"]: n.get("lladdr") for n in neighbours if n.get("dev") == name
            }
            kept_fdb = {
                f["mac"]: f.get("dst") for f in fdb if f.get("ifname") == name and "dst" in f
            }
        wanted_routes = {p.subnet: p.vtep for p in dev.peers}
        wanted_neighbours = {p.vtep: p.mac for p in dev.peers}
        wanted_fdb = {p.mac: p.underlay for p in dev.peers}
        for dst in sorted(set(kept_routes) - set(wanted_routes)):
            ip_lines.append(f"route del {dst} dev {name}")
        for dst in sorted(set(kept_neighbours) - set(wanted_neighbours)):
            ip_lines.append(f"neigh del {dst} dev {name}")
        for mac in sorted(set(kept_fdb) - set(wanted_fdb)):
            fdb_lines.append(f"fdb del {mac} dev {name} dst {kept_fdb[mac]} self")
        for p in dev.peers:
            if kept_neighbours.get(p.vtep) != p.mac:
                ip_lines.append(f"neigh replace {p.vtep} lladdr {p.mac} dev {name} nud permanent")
            if kept_routes.get(p.subnet) != p.vtep:
                ip_lines.append(f"route replace {p.subnet} via {p.vtep} dev {name} onlink")
            if kept_fdb.get(p.mac) != p.underlay:
                fdb_lines.append(f"fdb replace {p.mac} dev {name} dst {p.underlay} self permanent")
    return ip_lines, fdb_lines


def apply(devices: Mapping[str, Device], tag: str) -> bool:
    """Make the kernel hold `devices` and no other vxlan device of the node; True when
    anything was written."""
    found = current_devices(tag)
    if not found and not devices:
        return False
    routes = neighbours = fdb = []
    if found:
        routes = _json(["ip", "-j", "route", "show", "table", "main"])
        neighbours = _json(["ip", "-j", "neigh", "show"])
        # Listed per device, which `-j` then leaves out of each entry.
        fdb = [
            {**entry, "ifname": name}
            for name in found
            if name in devices
            for entry in _json(["bridge", "-j", "fdb", "show", "dev", name])
        ]
    ip_lines, fdb_lines = commands(devices, found, routes, neighbours, fdb)
    # Devices first (a new device's FDB entries need it), then its forwarding entries.
    if ip_lines:
        _run(["ip", "-batch", "-"], "\n".join(ip_lines) + "\n")
    if fdb_lines:
        _run(["bridge", "-batch", "-"], "\n".join(fdb_lines) + "\n")
    return bool(ip_lines or fdb_lines)


# Following etcd ----------------------------------------------------------------------------


def slice_key(key: str) -> tuple[str, str] | None:
    """(network id, node id) of a `networks/slices/<network id>/<node>` key."""
    if not key.startswith(SLICES_PREFIX):
        return None
    network_id, _, node = key[len(SLICES_PREFIX) :].partition("/")
    return (network_id, node) if network_id and node and "/" not in node else None


def host_of(address: str) -> str | None:
    """The host part of an agent's advertised `host:port`, or None."""
    try:
        return split_host_port(address)[0] or None
    except ValueError:
        return None


class Overlay:
    """The node's vxlan devices, kept from etcd while the node has any network."""

    def __init__(self, store: Store | None, node_id: str, tag: str) -> None:
        self.store = store
        self.node_id = node_id
        self.tag = tag
        self.local: dict[str, Attachment] = {}  # network id -> one of its attachments
        self.slices: dict[str, dict[str, str]] = {}
        self.addresses: dict[str, str] = {}
        self.underlay: Underlay | None = None
        self._applied: dict[str, Device] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def container_mtu(self) -> int | None:
        """The MTU containers on a network get here: the tunnel's, when this node tunnels."""
        underlay = await self._underlay()
        return underlay.container_mtu if underlay is not None and underlay.tunnels else None

    async def _underlay(self) -> Underlay | None:
        if self.underlay is None and self.store is not None:
            address = self.addresses.get(self.node_id)
            if address is None:
                record = await NODES.get(self.store, self.node_id)
                address = host_of(record.address) if record is not None else None
            if address is not None:
                self.addresses[self.node_id] = address
                try:
                    self.underlay = await asyncio.to_thread(underlay_of, address)
                except OSError as exc:  # a name that does not resolve: no tunnel from here
                    log.warning("no underlay address for %s: %s", address, exc)
        return self.underlay

    async def update(self, attachments: Iterable[Attachment]) -> None:
        """The node's attachments changed: follow etcd while there are any, and make the
        devices match (the last network's device goes with it)."""
        local = {a.network_id: a for a in attachments}
        if local.keys() == self.local.keys() and self._applied is not None:
            return
        self.local = local
        if local and self._follower is None and self.store is not None:
            # Read now, so a network's first container has its peers' routes when it starts.
            revisions = await self._snapshot()
            self._follower = asyncio.create_task(self._follow(revisions))
        elif not local:
            await self.close()
        await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            if self.local:
                with contextlib.suppress(Exception):
                    await self._underlay()  # etcd away: the devices wait for the next change
            wanted = plan(
                self.node_id, self.local.values(), self.slices, self.addresses, self.underlay
            )
            if wanted == self._applied:
                return
            await asyncio.to_thread(apply, wanted, self.tag)
            if wanted.keys() != (self._applied or {}).keys():
                log.info("overlay devices: %s", ", ".join(sorted(wanted)) or "none")
            self._applied = wanted

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None

    async def _snapshot(self) -> tuple[int, int] | None:
        """Every slice and node address now, and the revisions to watch on from."""
        assert self.store is not None
        try:
            entries, slices_revision = await self.store.snapshot(SLICES_PREFIX)
            nodes, nodes_revision = await NODES.snapshot(self.store)
        except Exception as exc:
            log.warning("cannot read the network slices: %s", exc)
            return None
        self.slices = {}
        for entry in entries:
            self._slice_event(entry.key, entry.value)
        for found in nodes:
            self._node_event(found.id, found.record.address)
        return slices_revision, nodes_revision

    def _slice_event(self, key: str, value: bytes | None) -> None:
        ids = slice_key(key)
        if ids is None:
            return
        network_id, node = ids
        if value is None:
            self.slices.get(network_id, {}).pop(node, None)
            return
        try:
            self.slices.setdefault(network_id, {})[node] = Slice.decode(node, value).subnet
        except ValueError as exc:
            log.warning("ignoring unreadable slice %s: %s", key, exc)

    def _node_event(self, node: str, address: str) -> None:
        # A node whose record expired keeps its last address: its containers may come back.
        host = host_of(address)
        if host is not None:
            self.addresses[node] = host
            if node == self.node_id:
                self.underlay = None  # looked up again with the new address

    async def _follow(self, revisions: tuple[int, int] | None) -> None:
        """Watch the slices and the node records; start over from a snapshot when a watch
        breaks (etcd away, revision compacted) or a change cannot be applied."""
        while True:
            if revisions is not None:
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._watch_slices(revisions[0] + 1))
                        group.create_task(self._watch_nodes(revisions[1] + 1))
                except* Exception as failed:
                    log.warning("overlay watch failed, reading again: %s", failed.exceptions[0])
            await asyncio.sleep(RETRY_SECONDS)
            revisions = await self._snapshot()
            if revisions is not None:
                with contextlib.suppress(Exception):
                    await self.reconcile()

    async def _watch_slices(self, start: int) -> None:
        assert self.store is not None
        async for event in self.store.watch_prefix(SLICES_PREFIX, start):
            self._slice_event(event.key, event.value if event.kind == "put" else None)
            await self.reconcile()

    async def _watch_nodes(self, start: int) -> None:
        assert self.store is not None
        async for change in NODES.watch(self.store, start):
            if change.record is not None:
                self._node_event(change.id, change.record.address)
                await self.reconcile()
