"""Container networks on one node: a network namespace per container, the CNI bridge plugin,
the node's slice of each network's range, and berth's own nftables table. No gRPC.

A container on a network gets, when it starts (and loses, when it exits or is removed):

- a network namespace made by the agent, bind-mounted on `<run dir>/netns/<container id>`,
  which runc joins (the runtime spec's network namespace path);
- an `eth0` in it from the CNI `bridge` plugin (`lo` is set up by berthd.node.netns), run
  directly as CNI's runtimes do: the plugin binary with CNI_COMMAND/CNI_NETNS/... and the
  JSON config on stdin.
  One bridge per network per node, `bn-<6 hex of the network id><4 hex of the node id>`
  (the agents of `berthd up` share one namespace), whose address is the gateway: the first
  address of the node's slice (berthd.common.state.networks), leased in
  etcd on first use and released when the node's last container on the network goes, with
  the bridge (unless the routing mesh keeps it: berthd.node.ingress). Addresses come from
  the CNI `host-local` plugin over that slice, its leases under `<data dir>/network/ipam/`.
- berth's nftables table `inet berth_<4 hex of the node id>`, written whole from the node's
  attachments after every change (and deleted when none remain): masquerade of each local
  slice going anywhere but its own network, forwarding between two networks' devices
  refused, and an internal network's bridge forwarding to nothing but its own devices. The
  plugin's own iptables masquerade is off (ipMasq false), so one table holds every rule
  berth makes and can be rebuilt or deleted.

Between nodes: berthd.node.overlay (a vxlan device per network, kept from the slices in
etcd). Names: berthd.node.dns (its resolvers are accepted on each bridge's gateway here).
Published ports and the routing mesh: berthd.node.ports, whose rules nft_ruleset adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from berthd.common.errors import Aborted, FailedPrecondition, NotFound, ResourceExhausted
from berthd.common.state.networks import (
    NETWORKS,
    NetworkRecord,
    Slice,
    first_free_slice,
    network_by_name,
    slices,
)
from berthd.common.store import Store
from berthd.node.netns import new_netns
from berthd.node.ports import MeshPort, bindings_of, enable_localnet, port_rules

log = logging.getLogger("berthd.node.network")

CNI_PATH = "/usr/lib/cni"
CNI_VERSION = "1.0.0"
TABLE_PREFIX = "berth_"
BRIDGE_PREFIX = "bn-"
IFNAME = "eth0"
REJECT = "reject with icmpx type admin-prohibited"
ATTEMPTS = 10
DNS_PORT = 53


def node_tag(node_id: str) -> str:
    """4 hex digits of the node id: the agents of `berthd up` share one network namespace,
    and each needs bridges and a table of its own there."""
    return hashlib.sha256(node_id.encode()).hexdigest()[:4]


def bridge_name(network_id: str, node_id: str) -> str:
    """`bn-`, 6 hex digits of the network id, the node's tag (at most 15 characters)."""
    return f"{BRIDGE_PREFIX}{network_id[:6]}{node_tag(node_id)}"


def table_name(node_id: str) -> str:
    """The node's nftables table (family inet): `berth_<node tag>`."""
    return f"{TABLE_PREFIX}{node_tag(node_id)}"


@dataclass
class Attachment:
    """A container's place on a network on this node, kept in its record while it runs."""

    network: str  # name
    network_id: str
    subnet: str  # the whole network's range
    slice: str  # this node's part of it
    bridge: str
    internal: bool
    netns: str  # the bind-mounted namespace file
    ip_address: str = ""
    prefix_length: int = 0
    gateway: str = ""
    mac_address: str = ""
    # Its published ports as held (berthd.node.ports: host_port filled in).
    ports: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        return cls(**data)


# Pure parts: the CNI config and the nftables ruleset --------------------------------------


def cni_config(
    network: NetworkRecord, slice_: Slice, ipam_dir: Path, bridge: str, mtu: int | None = None
) -> dict[str, Any]:
    """The bridge plugin's config for `network` on a node holding `slice_`, its bridge
    named `bridge`; `mtu` (the overlay's, berthd.node.overlay) for the bridge and veths."""
    config: dict[str, Any] = {
        "cniVersion": CNI_VERSION,
        "name": f"berth-{network.id[:12]}",
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        # berth's nftables table masquerades, not the plugin's iptables rules.
        "ipMasq": False,
        # A container reaches its own published ports through the bridge (the routing mesh).
        "hairpinMode": True,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": slice_.subnet, "gateway": slice_.gateway}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(ipam_dir),
        },
    }
    if mtu is not None:
        config["mtu"] = mtu
    return config


def nft_ruleset(
    table: str, attachments: Iterable[Attachment], mesh: Iterable[MeshPort] = ()
) -> str:
    """berth's whole table for these attachments (one rule set per network on the node) and
    the routing mesh's ports, for `nft -f`: the table is declared, flushed and filled in one
    transaction."""
    from berthd.node.overlay import forward_rules  # the overlay builds on this module

    attachments = list(attachments)
    networks = {a.network_id: a for a in attachments}
    # Published ports (berthd.node.ports); an internal network's are not, as Docker's.
    published = [
        (a.ip_address, b) for a in attachments if not a.internal for b in bindings_of(a.to_json())
    ]
    ports = port_rules(published, mesh)
    # DNATed flows first: the isolation rules below must not reject a published port.
    forward, postrouting, input_ = list(ports.forward), [], []
    for a in sorted(networks.values(), key=lambda a: a.bridge):
        # The network's resolver on its gateway (berthd.node.dns), internal networks included.
        input_.append(
            f'iifname "{a.bridge}" ip daddr {Slice(a.slice).gateway} meta l4proto {{ udp, tcp }} '
            f"th dport {DNS_PORT} accept"
        )
        # Between the network's own bridges and vxlan device only; an internal network's
        # bridge forwards nothing else in or out.
        forward += forward_rules(a.bridge, a.internal)
        if a.internal:
            # ... and reaches nothing else of the node.
            input_.append(f'iifname "{a.bridge}" {REJECT}')
            continue
        # Out to anything but the network itself (other hosts' slices, over VXLAN, keep
        # their addresses) goes out with the node's address.
        postrouting.append(
            f'ip saddr {a.slice} ip daddr != {a.subnet} oifname != "{a.bridge}" masquerade'
        )
    lines = [
        f"table inet {table} {{}}",
        f"flush table inet {table}",
        f"table inet {table} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *(f"    {rule}" for rule in forward),
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        *(f"    {rule}" for rule in input_),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *(f"    {rule}" for rule in postrouting + ports.postrouting),
        "  }",
    ]
    if ports:
        lines += [
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            *(f"    {rule}" for rule in ports.prerouting),
            "  }",
            "  chain output {",
            # dstnat is no name in the output hook: its value.
            "    type nat hook output priority -100; policy accept;",
            *(f"    {rule}" for rule in ports.output),
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


# Processes --------------------------------------------------------------------------------


def _run(argv: list[str], stdin: str = "", env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=env, check=False, timeout=60
    )
    if done.returncode != 0:
        detail = (done.stdout.strip() or done.stderr.strip())[-500:]
        raise FailedPrecondition(f"{' '.join(argv[:3])} failed: {detail}", reason="NETWORK_SETUP")
    return done.stdout


def cni(command: str, config: dict[str, Any], container_id: str, netns: str, ifname: str) -> dict:
    """Run the config's plugin binary as a CNI runtime does; the parsed result (ADD)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": CNI_PATH,
    }
    out = _run([f"{CNI_PATH}/{config['type']}"], json.dumps(config), env)
    return json.loads(out) if command == "ADD" and out.strip() else {}


def mounted(path: Path) -> bool:
    """Whether `path` is a mount point in this mount namespace. Not Path.is_mount: a bind
    mount of a directory onto itself keeps its device, which is what is_mount compares."""
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            point = line.split(" ", 5)[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            if "\\" in point:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point)
            if point == target:
                return True
    return False


def _link_exists(name: str) -> bool:
    # Not /sys/class/net: an agent that entered a network namespace with `nsenter --net` (as
    # the multi-host tests run it) still sees the sysfs of the namespace it came from.
    shown = subprocess.run(["ip", "link", "show", name], capture_output=True, check=False)
    return shown.returncode == 0


class NetworkManager:
    """Attach and detach containers; keep the node's slices, bridges and nftables table."""

    def __init__(self, store: Store | None, node_id: str, data_dir: Path, run_dir: Path) -> None:
        self.store = store
        self.node_id = node_id
        self.ipam_root = data_dir / "network" / "ipam"
        self.netns_dir = run_dir / "netns"
        self.table = table_name(node_id)
        # The ruleset last written: it changes only with a network's first or last container
        # on the node, so most starts skip `nft` (about 14 ms of a start).
        self._written: str | None = None
        self._lock = asyncio.Lock()
        # Whether this agent made the namespace directory a shared mount (once, not per start).
        self._netns_dir_shared = False
        # The routing mesh's ports (berthd.node.ports.Mesh): on every node, with or without
        # containers of its own.
        self.mesh: list[MeshPort] = []
        # The networks of the mesh's backends (id -> (name, range)); None until the mesh has
        # read them once.
        self.mesh_networks: dict[str, tuple[str, str]] | None = None
        from berthd.node.ingress import Ingress  # both build on this module
        from berthd.node.overlay import Overlay

        self.overlay = Overlay(store, node_id, node_tag(node_id))
        # Slices held for the mesh's networks with no container here (their overlay only).
        self.ingress = Ingress(store, node_id, self.claim_slice, self.release_slice)

    async def close(self) -> None:
        """Stop following etcd (the agent stops; its devices stay for the next one)."""
        await self.overlay.close()

    def netns_path(self, container_id: str) -> Path:
        return self.netns_dir / container_id

    # Slices -----------------------------------------------------------------------------

    async def claim_slice(self, network: NetworkRecord) -> Slice:
        """This node's slice of `network`: the one it holds, else the first free one, claimed
        in a transaction that fails when another node claimed one since the read."""
        assert self.store is not None
        family = slices(network.id)
        for _ in range(ATTEMPTS):
            held, revision = await family.snapshot(self.store)
            mine = [v.record for v in held if v.id == self.node_id]
            if mine:
                return mine[0]
            subnet = first_free_slice(network.subnet, [v.record.subnet for v in held])
            if subnet is None:
                raise ResourceExhausted(
                    f"network {network.name} ({network.subnet}) has no free slice for node "
                    f"{self.node_id}: every node's /24 is taken",
                    reason="NETWORK_FULL",
                    metadata={"network": network.name},
                )
            found = await NETWORKS.read(self.store, network.id)
            if found is None:
                raise network_gone(network.name)
            ok, _ = await self.store.txn(
                [
                    self.store.unchanged_since(family.prefix, revision),
                    family.absent(self.store, self.node_id),
                    NETWORKS.unchanged(self.store, network.id, found.mod_revision),
                ],
                [family.op_put(self.store, self.node_id, Slice(subnet))],
            )
            if ok:
                log.info("network slice claimed", extra={"network": network.name, "slice": subnet})
                return Slice(subnet)
        raise Aborted(f"slices of network {network.name} are changing concurrently; try again")

    async def release_slice(self, network_id: str, subnet: str) -> None:
        if self.store is None:
            return
        family = slices(network_id)
        with contextlib.suppress(Exception):
            await self.store.txn(
                [family.value_is(self.store, self.node_id, Slice(subnet))],
                [family.op_delete(self.store, self.node_id)],
            )

    # Attach and detach ------------------------------------------------------------------

    async def attach(
        self, container_id: str, network_name: str, others: list[Attachment]
    ) -> Attachment:
        """A namespace for the container, on `network_name` (looked up in etcd). `others`:
        the node's other attachments, to know whether a failed attach leaves the network's
        bridge and slice to anyone."""
        if self.store is None:
            raise FailedPrecondition("this node has no etcd: it cannot join networks")
        async with self._lock:
            network, slice_ = await self._network_and_slice(network_name, others)
            attachment = Attachment(
                network=network.name,
                network_id=network.id,
                subnet=network.subnet,
                slice=slice_.subnet,
                bridge=bridge_name(network.id, self.node_id),
                internal=network.internal,
                netns=str(self.netns_path(container_id)),
            )
            mtu = await self.overlay.container_mtu()
            try:
                await asyncio.to_thread(self._add, attachment, network, slice_, container_id, mtu)
            except BaseException:
                # As a CNI runtime after a failed ADD: DEL, which also frees the address. The
                # cleanup's own failures are logged; the caller gets the ADD's.
                try:
                    await asyncio.to_thread(self._del, container_id, attachment)
                    if not any(o.network_id == network.id for o in others):
                        await asyncio.to_thread(self._drop_network, attachment)
                        if not self.ingress.holds(network.id):
                            await self.release_slice(network.id, slice_.subnet)
                except Exception as exc:
                    log.warning("cleanup after a failed attach: %s", exc)
                raise
        return attachment

    async def _network_and_slice(
        self, network_name: str, others: list[Attachment]
    ) -> tuple[NetworkRecord, Slice]:
        """The network and this node's slice of it. A container of the node already on it
        holds both (the network cannot go while a container names it, nor the slice while
        the node has a container on it): no etcd read then, the common start."""
        for other in others:
            if other.network == network_name:
                network = NetworkRecord(
                    id=other.network_id,
                    name=other.network,
                    subnet=other.subnet,
                    internal=other.internal,
                )
                return network, Slice(other.slice)
        assert self.store is not None
        network = await network_by_name(self.store, network_name)
        if network is None:
            raise network_gone(network_name)
        return network, await self.claim_slice(network)

    def _add(
        self,
        attachment: Attachment,
        network: NetworkRecord,
        slice_: Slice,
        container_id: str,
        mtu: int | None,
    ) -> None:
        self._make_netns(container_id)
        # The node forwards for its containers (only its own namespace's setting changes).
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        netns = attachment.netns
        config = cni_config(network, slice_, self.ipam_root, attachment.bridge, mtu)
        result = cni("ADD", config, container_id, netns, IFNAME)
        ip = result["ips"][0]
        interface = ipaddress.IPv4Interface(ip["address"])
        attachment.ip_address = str(interface.ip)
        attachment.prefix_length = interface.network.prefixlen
        attachment.gateway = ip.get("gateway", slice_.gateway)
        sandbox = [i for i in result.get("interfaces", []) if i.get("sandbox")]
        attachment.mac_address = sandbox[0].get("mac", "") if sandbox else ""

    async def detach(
        self, container_id: str, attachment: Attachment, others: list[Attachment]
    ) -> None:
        """Undo attach; the network's bridge, IPAM state and slice go with its last container
        on this node (`others`: the attachments that stay), the slice only when the routing
        mesh does not keep it (berthd.node.ingress)."""
        async with self._lock:
            try:
                await asyncio.to_thread(self._del, container_id, attachment)
            except Exception as exc:
                # The bridge and the slice must still go: a bridge left with the slice's
                # gateway address would take the route of the next network given that slice.
                log.warning("detaching failed: %s", exc, extra={"container": container_id})
            if not any(o.network_id == attachment.network_id for o in others):
                await asyncio.to_thread(self._drop_network, attachment)
                if not self.ingress.holds(attachment.network_id):
                    await self.release_slice(attachment.network_id, attachment.slice)

    def _del(self, container_id: str, attachment: Attachment) -> None:
        network = NetworkRecord(
            id=attachment.network_id,
            name=attachment.network,
            subnet=attachment.subnet,
            internal=attachment.internal,
        )
        config = cni_config(network, Slice(attachment.slice), self.ipam_root, attachment.bridge)
        netns = attachment.netns if Path(attachment.netns).exists() else ""
        try:
            cni("DEL", config, container_id, netns, IFNAME)
        except FailedPrecondition as exc:
            log.warning("CNI DEL failed: %s", exc, extra={"container": container_id})
        self._remove_netns(container_id)

    def _drop_network(self, attachment: Attachment) -> None:
        if _link_exists(attachment.bridge):
            _run(["ip", "link", "del", attachment.bridge])
        shutil.rmtree(self.ipam_root / f"berth-{attachment.network_id[:12]}", ignore_errors=True)
        log.info("network bridge removed", extra={"network": attachment.network})

    # Namespaces -------------------------------------------------------------------------

    def _make_netns(self, container_id: str) -> None:
        path = self.netns_path(container_id)
        self._share_netns_dir()
        if mounted(path):
            return
        # Bound to the file, it lives without any process in it; its loopback is up.
        try:
            new_netns(path)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot make a network namespace: {exc.strerror}", reason="NETWORK_SETUP"
            ) from exc

    def _share_netns_dir(self) -> None:
        """Make the namespace directory a shared mount of its own, as `ip netns` does with
        /run/netns: mount namespaces made meanwhile (runc's, which are slaves of the host's)
        hold copies of the namespace files' bind mounts, and only a shared mount carries
        their unmount to those copies. Without it a file stays busy (EBUSY) after its umount."""
        if self._netns_dir_shared:
            return
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        if not mounted(self.netns_dir):
            _run(["mount", "--bind", str(self.netns_dir), str(self.netns_dir)])
        _run(["mount", "--make-shared", str(self.netns_dir)])
        self._netns_dir_shared = True

    def _unshare_netns_dir(self) -> None:
        """The directory's own mount goes with the node's last namespace."""
        if self.netns_dir.is_dir() and not any(self.netns_dir.iterdir()):
            if mounted(self.netns_dir):
                subprocess.run(["umount", str(self.netns_dir)], capture_output=True, check=False)
            self._netns_dir_shared = False
            with contextlib.suppress(OSError):
                self.netns_dir.rmdir()
                self.netns_dir.parent.rmdir()  # the agent's run dir, unless secrets use it

    def _remove_netns(self, container_id: str) -> None:
        path = self.netns_path(container_id)
        for _ in range(3):
            if not mounted(path):
                break
            subprocess.run(["umount", str(path)], capture_output=True, check=False)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # Still mounted in another mount namespace: detach it there too, lazily.
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            log.warning("namespace file %s: %s", path, exc.strerror)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> None:
        """Namespace files of containers with no attachment (an agent killed mid-way)."""
        if not self.netns_dir.is_dir():
            return
        for path in self.netns_dir.iterdir():
            if path.name not in keep:
                self._remove_netns(path.name)

    # The nftables table -----------------------------------------------------------------

    async def sync_rules(self, attachments: list[Attachment]) -> None:
        """berth's table for the node's attachments now (deleted when there are none), and
        the overlay's devices for their networks and for the mesh's (berthd.node.ingress)."""
        async with self._lock:
            await asyncio.to_thread(self._sync_rules, attachments)
            stand_ins, dropped = await self._sync_ingress(attachments)
            await self.overlay.update([*attachments, *stand_ins])
            # After their devices went: a slice released earlier could be another node's.
            await self.ingress.release_all(dropped)

    async def _sync_ingress(
        self, attachments: list[Attachment]
    ) -> tuple[list[Attachment], list[Attachment]]:
        held = {n: (a.network, a.subnet) for n, a in self.ingress.held.items()}
        # Not known yet (the agent starts): nothing changes.
        wanted = held if self.mesh_networks is None else self.mesh_networks
        try:
            # Only where the overlay tunnels: in `berthd up` routes already lead everywhere.
            if wanted and await self.overlay.container_mtu() is None:
                wanted = {}
            if self.mesh_networks is not None:
                await self.ingress.sweep(attachments)
        except Exception as exc:  # etcd away: the next change tries again
            log.warning("the mesh's networks: %s", exc)
        return await self.ingress.sync(attachments, wanted)

    def _sync_rules(self, attachments: list[Attachment]) -> None:
        if attachments or any(m.backends for m in self.mesh):
            ruleset = nft_ruleset(self.table, attachments, self.mesh)
            if ruleset != self._written:
                if "dnat" in ruleset:
                    enable_localnet()
                _run(["nft", "-f", "-"], ruleset)
                self._written = ruleset
            return
        self._written = None
        self._unshare_netns_dir()
        if shutil.which("nft"):
            listed = subprocess.run(
                ["nft", "list", "tables"], capture_output=True, text=True, check=False
            )
            if f"table inet {self.table}" in listed.stdout.splitlines():
                _run(["nft", "delete", "table", "inet", self.table])


def network_gone(name: str) -> NotFound:
    return NotFound(
        f"no such network: {name}",
        reason="NETWORK_NOT_FOUND",
        metadata={"network": name},
        resource=("network", name),
    )


def sweep_offline(data_dir: Path, node_id: str) -> list[str]:
    """What an agent that is gone (killed, or its containers deleted by runc behind its back)
    left of its networks in this namespace: namespace files, its bridges (with their veths),
    its nftables table, its IPAM leases. For `berthd down`; its slices in etcd go with the
    networks. Returns what was removed."""
    from berthd.node.overlay import owned
    from berthd.node.secrets import run_dir

    removed = []
    manager = NetworkManager(None, node_id, data_dir, run_dir(data_dir))
    if manager.netns_dir.is_dir():
        for path in manager.netns_dir.iterdir():
            manager._remove_netns(path.name)
            removed.append(f"netns {path.name[:12]}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    tag = node_tag(node_id)
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(BRIDGE_PREFIX) and name.endswith(tag) and len(name) == 13:
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
            removed.append(f"bridge {name}")
        elif owned(name, tag):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
            removed.append(f"vxlan {name}")
    with contextlib.suppress(FailedPrecondition):
        manager._sync_rules([])  # deletes the table and the namespace directory's mount
    if manager.ipam_root.is_dir() and any(manager.ipam_root.iterdir()):
        shutil.rmtree(manager.ipam_root, ignore_errors=True)
        removed.append("ipam leases")
    return removed
