"""Names on berth networks: the node's embedded DNS server and the endpoint records it answers
from. No gRPC.

- Each container attached on this node has an endpoint record in etcd,
  `network-endpoints/<network id>/<container id>` (berthd.common.state.networks.EndpointRecord:
  name, aliases, service, address, node), written by this agent under the node's own lease (the
  one that keeps `nodes/<id>`): when the node dies, etcd deletes its records with its
  registration, so a moved replica's old address stops answering as the cluster moves it.
  When the lease is granted again (after it expired) the agent writes its records again and
  deletes any of its own that no container holds any more.
- One etcd watch on that prefix keeps an in-memory table of every network's names.
- A DNS server (UDP and TCP, port 53) on the gateway address of each local bridge: the
  address a query arrived on names the network. A name of that network answers from the
  table (A records, shuffled, a TTL of TTL seconds); a service's name and `tasks.<service>`
  answer every replica's address (DNS round-robin, as Swarm's `--endpoint-mode dnsrr`).
  Other names go to the node's upstream resolvers, as Docker's embedded DNS does, except from
  an internal network: REFUSED there, nothing leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from berthd.common.state.containers import SERVICE_LABEL, service_of_name
from berthd.common.state.networks import ENDPOINTS, EndpointRecord, endpoint_id
from berthd.common.store import Store
from berthd.node.records import ContainerRecord

log = logging.getLogger("berthd.node.dns")

PORT = 53
# Seconds a resolver may keep an answer: short, so a name follows a replica that moved and a
# service's answer follows its replicas as they come and go.
TTL = 2
TASKS_PREFIX = "tasks."
UPSTREAM_TIMEOUT = 2.0
# An idle TCP client is dropped after this long.
TCP_IDLE_SECONDS = 10.0
# Queries answered at once per node; more wait (a container in a query loop cannot make the
# agent hold unbounded tasks).
MAX_INFLIGHT = 128
RETRY_FIRST, RETRY_MAX = 0.2, 5.0
HOST_RESOLV_CONF = Path("/etc/resolv.conf")

Upstream = tuple[str, int]


# Configuration ---------------------------------------------------------------------------


def parse_upstreams(text: str) -> list[Upstream]:
    """`--dns-upstream`: comma-separated IPv4 addresses, each with an optional :port."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, _, port = item.partition(":")
        try:
            ipaddress.IPv4Address(host)
            number = int(port) if port else PORT
        except ValueError:
            raise ValueError(f"invalid DNS upstream {item!r}: expected IPv4[:port]") from None
        if not 0 < number < 65536:
            raise ValueError(f"invalid DNS upstream {item!r}: port out of range")
        found.append((host, number))
    return found


def host_upstreams(text: str) -> list[Upstream]:
    """The `nameserver` lines of the host's resolv.conf (the agent queries them from the
    host's namespace, so loopback ones work too)."""
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                servers.append((str(ipaddress.ip_address(words[1])), PORT))
    return servers


def default_upstreams() -> list[Upstream]:
    """The host's resolvers, from its resolv.conf (none when it has none)."""
    try:
        return host_upstreams(HOST_RESOLV_CONF.read_text())
    except OSError:
        return []


def resolv_conf(nameserver: str, host_resolv_conf: str) -> str:
    """A network container's /etc/resolv.conf, as Docker writes it on a user-defined network:
    the embedded server, the host's search domains, `ndots:0` (a dotless name is asked as it
    is first, so `web` is never tried as `web.<search domain>` upstream before its own)."""
    search = [line for line in host_resolv_conf.splitlines() if line.startswith("search ")]
    return "\n".join([f"nameserver {nameserver}", *search[-1:], "options ndots:0"]) + "\n"


# The table and the answers (pure) ---------------------------------------------------------


def names_of(container_id: str, record: EndpointRecord) -> set[str]:
    """What a container answers to: its name, its short id, its aliases, and for a replica its
    service's name and `tasks.<service>`; lower case (DNS names are case-insensitive)."""
    names = {record.name, container_id[:12], *record.aliases}
    if record.service:
        names |= {record.service, TASKS_PREFIX + record.service}
    return {n.lower() for n in names if n}


class NameTable:
    """Every network's endpoints, indexed by (network id, name)."""

    def __init__(self) -> None:
        self.records: dict[str, EndpointRecord] = {}
        self._index: dict[tuple[str, str], set[str]] = {}

    def replace(self, records: Mapping[str, EndpointRecord]) -> None:
        self.records.clear()
        self._index.clear()
        for id, record in records.items():
            self.put(id, record)

    def put(self, id: str, record: EndpointRecord) -> None:
        self.delete(id)
        network_id, _, container_id = id.partition("/")
        self.records[id] = record
        for name in names_of(container_id, record):
            self._index.setdefault((network_id, name), set()).add(id)

    def delete(self, id: str) -> None:
        record = self.records.pop(id, None)
        if record is None:
            return
        network_id, _, container_id = id.partition("/")
        for name in names_of(container_id, record):
            ids = self._index.get((network_id, name))
            if ids is not None:
                ids.discard(id)
                if not ids:
                    del self._index[(network_id, name)]

    def addresses(self, network_id: str, name: str) -> list[str]:
        """The addresses `name` has on the network, sorted (empty: not a name of it)."""
        ids = self._index.get((network_id, name.lower().rstrip(".")), ())
        return sorted({self.records[id].address for id in ids})

    def names_at(self, network_id: str, address: str) -> list[str]:
        """The container names with `address` on the network (reverse lookups)."""
        prefix = f"{network_id}/"
        found = self.records.items()
        return sorted(r.name for id, r in found if id.startswith(prefix) and r.address == address)


def answer(
    query: dns.message.Message,
    network_id: str,
    internal: bool,
    table: NameTable,
    shuffle: Callable[[list[str]], None] = random.shuffle,
) -> dns.message.Message | None:
    """The reply to a container's `query` on network `network_id`; None when the name is not
    one of the network's and the query should go upstream."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    question = query.question[0]
    if question.rdclass == dns.rdataclass.IN:
        if question.rdtype == dns.rdatatype.PTR:
            names = _reverse(question.name, network_id, table)
            if names:
                response.flags |= dns.flags.AA
                response.answer.append(
                    dns.rrset.from_text_list(
                        question.name, TTL, "IN", "PTR", [f"{n}." for n in names]
                    )
                )
                return response
        else:
            name = question.name.to_text(omit_final_dot=True)
            addresses = table.addresses(network_id, name)
            if addresses:
                # Known here: A answers; any other type is "no data" (no IPv6 addresses).
                response.flags |= dns.flags.AA
                if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
                    shuffle(addresses)  # round-robin: clients take the first
                    response.answer.append(
                        dns.rrset.from_text_list(question.name, TTL, "IN", "A", addresses)
                    )
                return response
    if internal:
        # Nothing leaves an internal network, name lookups included.
        response.set_rcode(dns.rcode.REFUSED)
        return response
    return None


def _reverse(name: dns.name.Name, network_id: str, table: NameTable) -> list[str]:
    try:
        address = dns.reversename.to_address(name)
    except (dns.exception.SyntaxError, ValueError):
        return []
    return table.names_at(network_id, address)


def render(reply: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
    """`reply` on the wire; over UDP within the client's size (512 bytes, or its EDNS
    payload), else truncated (TC) so the client asks again over TCP."""
    limit = 65535 if tcp else (max(512, query.payload) if query.edns >= 0 else 512)
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        reply.answer.clear()
        reply.authority.clear()
        reply.additional.clear()
        reply.flags |= dns.flags.TC
        return reply.to_wire(max_size=limit)


# The servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bridge:
    """A local bridge's resolver: where it listens and for which network."""

    network_id: str
    gateway: str
    internal: bool


class Resolver:
    """Answers queries for the networks of the node's bridges: from the table, else
    upstream."""

    def __init__(self, table: NameTable, upstreams: list[Upstream]) -> None:
        self.table = table
        self.upstreams = upstreams
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)

    async def handle(self, data: bytes, bridge: Bridge, tcp: bool) -> bytes | None:
        """The reply to one message from a container; None for one that does not parse."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None  # a response, not a query: never answer one (no reflection loops)
        async with self._slots:
            reply = answer(query, bridge.network_id, bridge.internal, self.table)
            if reply is None:
                reply = await self.forward(query, tcp)
        return render(reply, query, tcp)

    async def forward(self, query: dns.message.Message, tcp: bool) -> dns.message.Message:
        """The first upstream's answer; SERVFAIL when none answers."""
        for host, port in self.upstreams:
            try:
                ask = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
                return await ask(query, host, timeout=UPSTREAM_TIMEOUT, port=port)
            except (dns.exception.DNSException, OSError, EOFError) as exc:
                log.debug("upstream %s:%d failed: %s", host, port, exc)
        failed = dns.message.make_response(query)
        failed.flags |= dns.flags.RA
        failed.set_rcode(dns.rcode.SERVFAIL)
        return failed


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, bridge: Bridge, tasks: set[asyncio.Task]) -> None:
        self.resolver = resolver
        self.bridge = bridge
        self.tasks = tasks
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = await self.resolver.handle(data, self.bridge, tcp=False)
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class Listener:
    """UDP and TCP port 53 on one bridge's gateway address."""

    def __init__(self, resolver: Resolver, bridge: Bridge) -> None:
        self.resolver = resolver
        self.bridge = bridge
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def open(self, port: int = PORT) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self.resolver, self.bridge, self._tasks),
                local_addr=(self.bridge.gateway, port),
            )
            self._tcp = await asyncio.start_server(
                self._stream, self.bridge.gateway, port, reuse_address=True
            )
        except BaseException:
            await self.close()
            raise

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_SECONDS):
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(size)
                wire = await self.resolver.handle(data, self.bridge, tcp=True)
                if wire is None:
                    break
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for task in list(self._tasks):
            task.cancel()


# The node's part --------------------------------------------------------------------------


def service_name(record: ContainerRecord) -> str:
    """The service name a replica answers to: the cluster names replicas SERVICE.SLOT (or
    SERVICE.SLOT.ID beside an old one, start-first; its label holds the service's id); ""
    for any other container, and for a replica that serves no traffic: withdrawn (drained
    before a stop) or, with a health check, not healthy (its own name still answers)."""
    if not record.config.labels.get(SERVICE_LABEL) or record.withdrawn:
        return ""
    if record.health.get("status", "healthy") != "healthy":
        return ""
    return service_of_name(record.name)


def wanted(
    node_id: str, records: Iterable[ContainerRecord]
) -> tuple[dict[str, EndpointRecord], dict[str, Bridge]]:
    """The endpoint records and the bridges the node's attached containers call for."""
    endpoints: dict[str, EndpointRecord] = {}
    bridges: dict[str, Bridge] = {}
    for record in records:
        attached = record.network
        if not attached or not attached.get("ip_address"):
            continue
        network_id = attached["network_id"]
        endpoints[endpoint_id(network_id, record.id)] = EndpointRecord(
            name=record.name,
            address=attached["ip_address"],
            node=node_id,
            aliases=list(record.config.network_aliases),
            service=service_name(record),
        )
        bridges[network_id] = Bridge(network_id, attached["gateway"], attached["internal"])
    return endpoints, bridges


class NameService:
    """The node's names: its containers' endpoint records in etcd (under the node's lease),
    the table of every network's names (one watch), and a resolver on each local bridge."""

    def __init__(self, store: Store | None, node_id: str, upstreams: list[Upstream]) -> None:
        self.store = store
        self.node_id = node_id
        self.table = NameTable()
        self.resolver = Resolver(self.table, upstreams)
        self.listeners: dict[str, Listener] = {}
        self._desired: dict[str, EndpointRecord] = {}
        self._written: dict[str, EndpointRecord] = {}
        self._lease = 0
        self._written_lease = 0  # the lease _written holds under
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def set_lease(self, lease_id: int) -> None:
        """The node's lease, granted (again): every record is written under it anew."""
        self._lease = lease_id
        self._wake.set()

    async def sync(self, records: Iterable[ContainerRecord]) -> None:
        """The node's attached containers now: publish their endpoints, listen on their
        bridges' gateways (and stop where a bridge went). Never raises."""
        self._start()
        self._desired, bridges = wanted(self.node_id, records)
        self._wake.set()
        for network_id in [n for n, lis in self.listeners.items() if bridges.get(n) != lis.bridge]:
            await self.listeners.pop(network_id).close()
        for network_id, bridge in bridges.items():
            if network_id in self.listeners:
                continue
            listener = Listener(self.resolver, bridge)
            try:
                await listener.open()
            except OSError as exc:
                log.error("no DNS server on %s: %s", bridge.gateway, exc)
                continue
            self.listeners[network_id] = listener
            log.info("DNS server listening", extra={"address": f"{bridge.gateway}:{PORT}"})

    def _start(self) -> None:
        if self._tasks or self.store is None:
            return
        self._tasks = [
            asyncio.create_task(self._follow(), name="endpoint watch"),
            asyncio.create_task(self._publish(), name="endpoint records"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for listener in self.listeners.values():
            await listener.close()
        self.listeners.clear()

    async def _follow(self) -> None:
        """The table from a snapshot, then from the watch; again from a snapshot when the
        watch breaks (etcd away, the revision compacted)."""
        assert self.store is not None
        pause = RETRY_FIRST
        while True:
            try:
                found, revision = await ENDPOINTS.snapshot(self.store)
                self.table.replace({v.id: v.record for v in found})
                pause = RETRY_FIRST
                async for change in ENDPOINTS.watch(self.store, revision + 1):
                    if change.record is None:
                        self.table.delete(change.id)
                    else:
                        self.table.put(change.id, change.record)
            except Exception as exc:
                log.warning("the watch of network names broke (%s); reading them again", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)

    async def _publish(self) -> None:
        """Make etcd hold the desired records under the current lease; retried until it
        does."""
        assert self.store is not None
        family, store = ENDPOINTS, self.store
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._lease:
                continue
            lease = self._lease
            try:
                if self._written_lease != lease:
                    # A new lease: every record is written under it, and whatever of this
                    # node's is in etcd and no container holds (written before the agent
                    # restarted, or a delete that failed) goes.
                    self._written = {}
                    for stale in await family.list(store):
                        if stale.record.node == self.node_id and stale.id not in self._desired:
                            await family.delete(store, stale.id)
                    self._written_lease = lease
                for id, record in list(self._desired.items()):
                    if self._written.get(id) != record:
                        await family.put(store, id, record, lease)
                        self._written[id] = record
                for id in [i for i in self._written if i not in self._desired]:
                    await family.delete(store, id)
                    del self._written[id]
            except Exception as exc:
                log.warning("cannot write endpoint records (%s); retrying", exc)
                await asyncio.sleep(1.0)
                self._wake.set()
