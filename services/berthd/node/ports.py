"""Published ports on one node: `run -p` (the container's node) and the routing mesh (every
node, for each service port). No gRPC.

- Each `-p` port is held by the agent: a socket bound to the host address and port (a listening
  one for TCP, as docker-proxy and kube-proxy hold theirs), so a port another process listens on
  fails the start (`Bind for 0.0.0.0:8080 failed: port is already allocated`) and no process
  can take it while the container runs. The traffic itself never reaches that socket: DNAT in
  berth's table sends it to the container first.
- The rules live in the node's table (berthd.node.network.nft_ruleset), built here: DNAT in a
  `prerouting` nat chain for traffic arriving at the node's addresses and in an `output` nat
  chain for the node's own connections, `127.0.0.1:PORT` included. That one needs
  `route_localnet` (a packet from 127.0.0.1 may then leave through a bridge) and a masquerade of
  127.0.0.0/8 sources leaving anywhere but lo, as kube-proxy does: no userland proxy copies the
  bytes. Loopback destinations are never matched in prerouting, so route_localnet opens no way
  in from outside.
- The mesh: each published port of a service DNATs to its running replicas' addresses, one
  chosen at random per connection (`numgen random mod N map`), and the flow is masqueraded
  (ct mark MESH_MARK) so the replies come back through the node that took the connection, as
  Swarm's ingress does. `Mesh` learns the replicas from etcd with one watch over the
  containers' statuses: a replica's status carries its service's ports (`ingress`, from the
  label INGRESS_LABEL the cluster puts on replicas) and its address.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from berth.errors import InvalidArgumentError
from berth.ports import PortBinding, PublishedPort, parse_service_publish
from berthd.common.errors import FailedPrecondition
from berthd.common.relisting import relisting
from berthd.common.state.containers import INGRESS_LABEL, STATUSES, ContainerStatus
from berthd.common.store import Store

__all__ = ["INGRESS_LABEL", "Mesh", "MeshPort", "PortHolder", "bindings_of", "port_rules"]

log = logging.getLogger("berthd.node.ports")

# ct mark of mesh flows, masqueraded in postrouting ("bp").
MESH_MARK = "0x6270"
LOCALNET = Path("/proc/sys/net/ipv4/conf/all/route_localnet")
RETRY_SECONDS = 1.0


def port_allocated(binding: PortBinding) -> FailedPrecondition:
    """Docker's words for a port that is taken."""
    where = f"{binding.shown_ip}:{binding.host_port}"
    return FailedPrecondition(
        f"Bind for {where} failed: port is already allocated",
        reason="PORT_ALLOCATED",
        metadata={"port": f"{where}/{binding.protocol}"},
    )


# Held ports ---------------------------------------------------------------------------------


class PortHolder:
    """The sockets that hold each running container's published ports."""

    def __init__(self) -> None:
        self._held: dict[str, list[socket.socket]] = {}

    def hold(self, container_id: str, bindings: Iterable[PortBinding]) -> list[PortBinding]:
        """Bind every port (a port of 0 gets one the kernel chooses); the bindings as held.
        PORT_ALLOCATED, holding none, when one is taken."""
        self.release(container_id)
        sockets: list[socket.socket] = []
        held: list[PortBinding] = []
        try:
            for b in bindings:
                kind = socket.SOCK_STREAM if b.protocol == "tcp" else socket.SOCK_DGRAM
                sock = socket.socket(socket.AF_INET, kind)
                sockets.append(sock)
                # A listener's TIME_WAIT leftovers must not block the port; a live listener
                # still does (SO_REUSEADDR never shares a listening TCP port).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((b.host_ip or "0.0.0.0", b.host_port))
                    if kind == socket.SOCK_STREAM:
                        sock.listen(0)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise port_allocated(b) from None
                    raise FailedPrecondition(
                        f"cannot publish {b.shown_ip}:{b.host_port}/{b.protocol}: {exc.strerror}",
                        reason="PORT_UNAVAILABLE",
                    ) from None
                held.append(
                    PortBinding(b.container_port, sock.getsockname()[1], b.host_ip, b.protocol)
                )
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._held[container_id] = sockets
        return held

    def release(self, container_id: str) -> None:
        for sock in self._held.pop(container_id, []):
            sock.close()

    def close(self) -> None:
        for container_id in list(self._held):
            self.release(container_id)


def bindings_of(network: dict[str, Any]) -> list[PortBinding]:
    """The bindings an attachment (a record's `network`) holds."""
    return [PortBinding(**p) for p in network.get("ports") or []]


def to_json(bindings: Iterable[PortBinding]) -> list[dict[str, Any]]:
    return [asdict(b) for b in bindings]


# Rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshPort:
    """A service port every node publishes, and the addresses of its running replicas."""

    published: int
    target: int
    protocol: str
    backends: tuple[str, ...]


@dataclass
class PortRules:
    """berth's table's rules for published ports, by chain."""

    prerouting: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    postrouting: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prerouting or self.output)


def _dnat(match: str, protocol: str, port: int, target: str) -> tuple[str, str]:
    """The prerouting and output rules sending `match` traffic to `port` on to `target`."""
    head = f"meta nfproto ipv4 {match}".rstrip()
    # Never a loopback destination from outside: route_localnet must open no way in.
    return (
        f"{head} ip daddr != 127.0.0.0/8 {protocol} dport {port} {target}",
        f"{head} {protocol} dport {port} {target}",
    )


def port_rules(published: Iterable[tuple[str, PortBinding]], mesh: Iterable[MeshPort]) -> PortRules:
    """The rules for the containers' published ports (each with its container's address) and
    the mesh's ports."""
    rules = PortRules()
    for address, b in sorted(published, key=lambda p: (p[1].host_port, p[1].protocol)):
        match = f"ip daddr {b.host_ip}" if b.host_ip else "fib daddr type local"
        pre, out = _dnat(match, b.protocol, b.host_port, f"dnat ip to {address}:{b.container_port}")
        if not b.host_ip.startswith("127."):  # a loopback address never arrives from outside
            rules.prerouting.append(pre)
        rules.output.append(out)
    for m in sorted(mesh, key=lambda m: (m.published, m.protocol)):
        if not m.backends:
            continue
        pick = ", ".join(f"{i} : {a}" for i, a in enumerate(m.backends))
        target = (
            f"ct mark set {MESH_MARK} dnat ip to numgen random mod {len(m.backends)} "
            f"map {{ {pick} }} : {m.target}"
        )
        pre, out = _dnat("fib daddr type local", m.protocol, m.published, target)
        rules.prerouting.append(pre)
        rules.output.append(out)
    if rules:
        # DNATed flows pass the isolation rules (a published port is reached from anywhere).
        rules.forward.append("ct status dnat accept")
        rules.postrouting += [
            # The node's own connections to 127.0.0.1:PORT leave through a bridge.
            'ip saddr 127.0.0.0/8 oifname != "lo" masquerade',
            # Mesh replies come back through the node that took the connection.
            f"ct mark {MESH_MARK} masquerade",
        ]
    return rules


def enable_localnet() -> None:
    """route_localnet in the node's namespace: 127.0.0.1:PORT is DNATed out of lo."""
    if LOCALNET.read_text().strip() != "1":
        LOCALNET.write_text("1\n")


# The routing mesh's view --------------------------------------------------------------------


def parse_ingress(text: str) -> list[PublishedPort]:
    """The ports of an ingress label; the invalid ones (a hand-made label) are skipped."""
    ports = []
    for item in filter(None, text.split(",")):
        try:
            ports.append(parse_service_publish(item))
        except InvalidArgumentError:
            log.warning("ignoring invalid ingress port %r", item)
    return ports


@dataclass(frozen=True)
class Replica:
    address: str
    ports: tuple[tuple[int, int, str], ...]
    # Its network (id, name, range): a node with no container there still reaches it through
    # the network's overlay (berthd.node.ingress).
    network: tuple[str, ...] = ("", "", "")


def replica_of(status: ContainerStatus) -> Replica | None:
    """The mesh's part of a status: a running replica with published ports and an address,
    healthy if it has a health check (one still starting or unhealthy gets no traffic), and
    not withdrawn (the cluster drains it before stopping it)."""
    if status.state != "running" or not status.ingress or status.withdrawn:
        return None
    if status.health_status in ("starting", "unhealthy"):
        return None
    network = status.network or {}
    address = str(network.get("ip_address", ""))
    if not address:
        return None
    ports = tuple(
        (p.published_port, p.target_port, p.protocol) for p in parse_ingress(status.ingress)
    )
    where = tuple(str(network.get(k, "")) for k in ("network_id", "network", "subnet"))
    return Replica(address, ports, where) if ports else None


def mesh_ports(replicas: Iterable[Replica]) -> list[MeshPort]:
    """Every published port with its backends, in a stable order (the ruleset only changes
    when a backend does)."""
    found: dict[tuple[int, int, str], set[str]] = {}
    for r in replicas:
        for port in r.ports:
            found.setdefault(port, set()).add(r.address)
    return [
        MeshPort(published, target, protocol, tuple(sorted(addresses)))
        for (published, target, protocol), addresses in sorted(found.items())
    ]


class Mesh:
    """The routing mesh's backends, kept by one watch of the containers' statuses. A status
    that names no ingress port, of a container that was none of the mesh's, is passed over
    without being decoded (a byte search), so an unrelated change costs next to nothing.
    `changed` is called with the new ports whenever the set of backends changes."""

    def __init__(self, store: Store, changed: Callable[[list[MeshPort]], Any]) -> None:
        self.store = store
        self.changed = changed
        self.replicas: dict[str, Replica] = {}
        self.ports: list[MeshPort] = []
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        # Any failure: etcd away, read again when it is back.
        await relisting(self._follow, "mesh view", log, RETRY_SECONDS, (Exception,))

    async def _follow(self) -> None:
        entries, revision = await STATUSES.snapshot(self.store)
        self.replicas = {}
        for v in entries:
            replica = replica_of(v.record)
            if replica is not None:
                self.replicas[v.id] = replica
        await self._publish()
        self.loaded.set()
        async for event in self.store.watch_prefix(STATUSES.prefix, revision + 1):
            container_id = STATUSES.id_of(event.key)
            if container_id is None:
                continue
            value = event.value or b""
            relevant = b'"ingress":"' in value and b'"ingress":""' not in value
            if not relevant and container_id not in self.replicas:
                continue
            change = STATUSES.change(event)
            replica = replica_of(change.record) if change and change.record else None
            if replica is None:
                if self.replicas.pop(container_id, None) is None:
                    continue
            elif self.replicas.get(container_id) == replica:
                continue
            else:
                self.replicas[container_id] = replica
            await self._publish()

    def networks(self) -> dict[str, tuple[str, str]]:
        """The networks of the running replicas: id -> (name, range)."""
        return {r.network[0]: r.network[1:] for r in self.replicas.values() if r.network[0]}

    async def _publish(self) -> None:
        ports = mesh_ports(self.replicas.values())
        # The first read is reported even when empty: the node then knows its mesh.
        if ports != self.ports or not self.loaded.is_set():
            self.ports = ports
            result = self.changed(ports)
            if asyncio.iscoroutine(result):
                await result
