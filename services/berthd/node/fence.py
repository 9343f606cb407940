"""Fencing: a node agent cut off from the cluster stops its service replicas itself.

While an agent cannot see its own registration (`nodes/<id>`), the cluster may already have
declared the node down and started its replicas elsewhere; a partitioned host that kept serving
them would run duplicates for as long as the partition lasts. After `stop_after` seconds of
failed checks in a row the fence stops the node's service replicas, and after
`standalone_after` (0: never, the default) its standalone cluster containers, as Nomad's
`stop_after_client_disconnect` does; containers made on the node directly are never touched.
While fenced the converger starts nothing. Once the registration is seen again the converger
takes a fresh snapshot of the desired state before it acts: replicas moved elsewhere meanwhile
are removed, those still assigned here start again.

A failed check is one of two things, and only one of them is a partition:
- etcd answers and the registration is absent: proof that the lease expired (the cluster moves
  the replicas). The clock runs.
- etcd cannot be reached: this host may be cut off, or etcd may be down for everyone, and then
  nothing was moved (the cluster cannot write) and stopping replicas would turn a control-plane
  outage into a data-plane one. So the fence asks a few other node agents (`Peers`: their
  addresses followed from `nodes/` with a watch while etcd answered, kept in
  `<data>/peers.json`) for their health entry `etcd`, over the node's own TLS. A peer that
  reaches etcd (SERVING) proves the fault is this host's: the clock runs. When none does and a
  majority of the asked peers answer (they cannot reach etcd either), it is an etcd outage: the
  clock does not run ("etcd unreachable but N/M peers answer: not fencing"), and starts from
  zero at the first failed check that is not explained so. No peer known (a one-node cluster):
  no fencing on an unreachable etcd at all, only on a confirmed-absent registration. (Peers
  notice a dead etcd within about 4 s, server.EtcdWatchdog: the clock may run for those first
  seconds.)
What stays ambiguous: a split with no majority side, say two nodes that lose each other while
etcd is down too. Each asks the other, hears nothing, and both fence after `stop_after` though
nothing was moved; the rule errs towards stopping (no duplicates) when it cannot tell.

Time counts from the first failed check, not from the last success: an agent frozen (SIGSTOP)
for longer than `stop_after` has failed no check, and gets its lease back within a third of its
TTL before it would fence.

The fence lives in the agent, so a dead agent (SIGKILL, a crash loop) fences nothing while its
containers run on under their conmons. Its watchdog (berthd.node.watchdog), a process of its
own that outlives the agent, then does the same with the same rule (`victims`, `Disconnection`,
`observe`, `Peers` here), reading which containers are replicas from their records on disk.

Not covered: a whole host frozen (nothing on it runs, nothing stops), and a dead agent whose
watchdog is dead too (killed with it, or OOM): its replicas run until an agent returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.files import atomic_write
from berthd.common.errors import BerthError
from berthd.common.rpc.channels import Channels, shared
from berthd.common.server import ETCD_HEALTH
from berthd.common.state.containers import MANAGED_LABEL, SERVICE_LABEL, DesiredContainer
from berthd.common.state.nodes import NODES
from berthd.common.store import Store, encode
from berthd.node.containers import ContainerManager
from berthd.node.converge import Converger
from berthd.node.records import RESTARTING, RUNNING, ContainerRecord

log = logging.getLogger("berthd.node.fence")

# How often the agent looks for its registration, and how long one look may take.
CHECK_INTERVAL = 1.0
CHECK_TIMEOUT = 2.0
# Grace given to a fenced container to stop (SIGTERM, then SIGKILL).
STOP_GRACE = 10.0
# Where the agent keeps the peers it last read, for its watchdog.
PEERS_FILE = "peers.json"
# How many other agents are asked when etcd cannot be reached, how long each may take to
# answer, and how often the list of nodes is read again while etcd answers.
PEERS_ASKED = 5
PEER_TIMEOUT = 1.5
PEERS_REFRESH = 10.0
# The agent follows nodes/ with a watch instead (a node that joined a moment ago is known when
# the cut comes); after a lost watch it reads again this often.
PEERS_RETRY = 2.0


def is_replica(record: ContainerRecord, desired: DesiredContainer | None = None) -> bool:
    """A service replica: by its label (set when its node created it), or by the cluster's
    desired record when there is one (replicas created before the label existed)."""
    return bool(record.config.labels.get(SERVICE_LABEL)) or bool(desired and desired.service)


def victims(
    records: Iterable[ContainerRecord],
    lost_for: float,
    stop_after: float,
    standalone_after: float,
    replica: Callable[[ContainerRecord], bool] = is_replica,
    spared: Collection[str] = (),
) -> list[ContainerRecord]:
    """The running cluster containers whose time is up after `lost_for` seconds without the
    node's registration: replicas after `stop_after`, standalone ones after `standalone_after`
    (a limit of 0: never). Containers made on the node directly, and those in `spared`
    (stopped already), are never victims. With `lost_for` infinite: every container that
    would be stopped some day, what the watchdog guards."""
    found = []
    for record in records:
        if not record.config.labels.get(MANAGED_LABEL) or record.id in spared:
            continue
        if record.state not in (RUNNING, RESTARTING):
            continue
        limit = stop_after if replica(record) else standalone_after
        if limit > 0 and lost_for >= limit:
            found.append(record)
    return found


class Sight(enum.Enum):
    """What one look for the node's registration found."""

    SEEN = "seen"
    ABSENT = "absent"  # etcd answered without it: the lease expired
    UNREACHABLE = "unreachable"  # no answer from etcd: a partition, or etcd down for all


class PeerAnswer(enum.Enum):
    """What one other node agent said when asked about etcd."""

    REACHES_ETCD = "reaches etcd"  # SERVING: etcd is up, the fault is this host's
    ALIVE = "alive"  # answered, and cannot reach etcd either
    SILENT = "silent"  # no answer: gone, or cut off from this host


@dataclass(frozen=True)
class Observation:
    """One check: the registration's sight and, when etcd was unreachable, the peers'
    answers."""

    sight: Sight
    answers: tuple[PeerAnswer, ...] = ()

    @property
    def seen(self) -> bool:
        return self.sight is Sight.SEEN

    @property
    def answered(self) -> int:
        return sum(answer is not PeerAnswer.SILENT for answer in self.answers)

    @property
    def outage(self) -> bool:
        """etcd is down for everyone, not this host cut off: no peer reaches etcd, and a
        majority of those asked answer (or none is known). The clock does not run."""
        if self.sight is not Sight.UNREACHABLE or PeerAnswer.REACHES_ETCD in self.answers:
            return False
        return 2 * self.answered > len(self.answers) or not self.answers


class Disconnection:
    """How long the node's registration has been unseen for a reason that may mean a
    partition: from the first such failed check of a run, not from the last success (see the
    module's docstring). A check explained by an etcd outage stops and resets the count."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.holding = False

    def observe(self, observation: Observation, now: float) -> float:
        """Record one check; the seconds the clock has run (0 when seen or held)."""
        if observation.seen:
            if self.since is not None:
                log.info("registration seen again after %.1fs", now - self.since)
            self.since = None
            self.holding = False
            return 0.0
        if observation.outage:
            if not self.holding:
                asked = len(observation.answers)
                if asked:
                    answered = observation.answered
                    log.warning(
                        "etcd unreachable but %d/%d peers answer: not fencing", answered, asked
                    )
                else:
                    log.warning("etcd unreachable and no other node known: not fencing")
            self.holding = True
            self.since = None
            return 0.0
        self.holding = False
        if self.since is None:
            self.since = now
            log.warning("cannot see this node's registration: %s", _why(observation))
        return now - self.since


def _why(observation: Observation) -> str:
    if observation.sight is Sight.ABSENT:
        return "etcd answers without it (its lease expired, or it is not registered yet)"
    if PeerAnswer.REACHES_ETCD in observation.answers:
        return "etcd unreachable from here, but other nodes reach it"
    return (
        f"etcd unreachable and only {observation.answered}/{len(observation.answers)} peers answer"
    )


async def registration(store: Store, node_id: str) -> Sight:
    """Whether etcd answers and holds the node's registration (its agent's lease is alive)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            found = await store.get(NODES.key(node_id)) is not None
    except (TimeoutError, BerthError) as exc:
        log.debug("registration check failed: %s", exc)
        return Sight.UNREACHABLE
    return Sight.SEEN if found else Sight.ABSENT


class Peers:
    """The other node agents, as last read from `nodes/` while etcd answered (kept in `path`
    too, for the watchdog of a dead agent), and how they answer about etcd. `channels`: the
    node's own (TLS with its certificate); by default the process's shared ones."""

    def __init__(self, node_id: str, path: Path | None = None, channels: Channels | None = None):
        self.node_id = node_id
        self.path = path
        self.channels = channels
        self.known: dict[str, str] = {}  # node id -> address
        self._refreshed = -math.inf
        self._following = False

    def load(self) -> None:
        """The peers the file remembers (none when it is missing or unreadable)."""
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_bytes())
            self.known = {str(k): str(v) for k, v in data.items() if k != self.node_id and v}
        except (OSError, ValueError, AttributeError) as exc:
            log.debug("no peers remembered in %s: %s", self.path, exc)

    async def follow(self, store: Store) -> None:
        """Keep the peers current from nodes/ (read once, then watched) until cancelled; read
        again after a lost watch or a compaction. While it follows, `refresh` reads nothing."""
        self._following = True
        try:
            while True:
                try:
                    found, revision = await NODES.snapshot(store)
                    nodes = {v.id: v.record.address for v in found}
                    await self.remember(nodes)
                    async for change in NODES.watch(store, revision + 1):
                        if change.record is not None:
                            nodes[change.id] = change.record.address
                        else:
                            nodes.pop(change.id, None)
                        await self.remember(dict(nodes))
                except BerthError as exc:
                    log.debug("the watch of the nodes ended: %s", exc)
                await asyncio.sleep(PEERS_RETRY)
        finally:
            self._following = False

    async def refresh(self, store: Store) -> None:
        """Read the nodes again, at most every PEERS_REFRESH (etcd answered just now), unless
        `follow` keeps them current."""
        now = time.monotonic()
        if self._following or now - self._refreshed < PEERS_REFRESH:
            return
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                records = await NODES.records(store)
        except (TimeoutError, BerthError) as exc:
            log.debug("cannot read the nodes: %s", exc)
            return
        self._refreshed = now
        await self.remember({id: r.address for id, r in records.items()})

    async def remember(self, nodes: dict[str, str]) -> None:
        known = {id: address for id, address in nodes.items() if id != self.node_id and address}
        if known == self.known:
            return
        self.known = known
        if self.path is None:
            return
        try:
            await asyncio.to_thread(atomic_write, self.path, encode(known))
        except OSError as exc:  # a full disk: known in memory all the same
            log.warning("cannot remember the peers in %s: %s", self.path, exc.strerror or exc)

    def chosen(self) -> list[str]:
        """The addresses of up to PEERS_ASKED peers: the same ones at every check, and a
        different set from each node (rendezvous hashing), so no peer is asked by all."""

        def rank(id: str) -> bytes:
            return hashlib.sha256(f"{self.node_id}/{id}".encode()).digest()

        return [self.known[id] for id in sorted(self.known, key=rank)[:PEERS_ASKED]]

    async def ask(self) -> tuple[PeerAnswer, ...]:
        """Each chosen peer's answer, asked at once."""
        channels = self.channels or shared()
        return tuple(await asyncio.gather(*(_ask(channels, a) for a in self.chosen())))


async def _ask(channels: Channels, address: str) -> PeerAnswer:
    """A peer's health entry `etcd` (allowed anonymously; this node's certificate anyway)."""
    stub = health_pb2_grpc.HealthStub(channels.get(address))
    request = health_pb2.HealthCheckRequest(service=ETCD_HEALTH)
    try:
        reply = await stub.Check(request, timeout=PEER_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return PeerAnswer.SILENT
        return PeerAnswer.ALIVE  # it answered, if not about etcd (an older agent)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return PeerAnswer.REACHES_ETCD
    return PeerAnswer.ALIVE


async def observe(store: Store, node_id: str, peers: Peers) -> Observation:
    """One check of the fence (and of the watchdog): the registration, the peers remembered
    while etcd answers, asked when it does not."""
    sight = await registration(store, node_id)
    if sight is not Sight.UNREACHABLE:
        await peers.refresh(store)
        return Observation(sight)
    return Observation(sight, await peers.ask())


class Fence:
    def __init__(
        self,
        store: Store,
        node_id: str,
        manager: ContainerManager,
        converger: Converger,
        stop_after: float,
        standalone_after: float = 0.0,
        peers: Peers | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.peers = peers or Peers(node_id)
        self.manager = manager
        self.converger = converger
        self.stop_after = stop_after
        self.standalone_after = standalone_after
        self.fenced = False
        self._stopped: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.stop_after > 0 or self.standalone_after > 0:
            self._follower = asyncio.create_task(self.peers.follow(self.store))
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        lost = Disconnection()
        while True:
            observation = await observe(self.store, self.node_id, self.peers)
            seen = observation.seen
            lost_for = lost.observe(observation, time.monotonic())
            if seen and self.fenced:
                await self.converger.resynchronize()
                self.fenced = self.converger.fenced = False
                self._stopped.clear()
            elif not seen and (found := self.victims(lost_for)):
                await self.fence(found, lost_for)
            await asyncio.sleep(CHECK_INTERVAL)

    def victims(self, lost_for: float) -> list[str]:
        """The containers whose time is up (`victims`); the converger's last copy of the
        desired state also says which are replicas."""
        desired = self.converger.desired
        found = victims(
            self.manager.records.values(),
            lost_for,
            self.stop_after,
            self.standalone_after,
            replica=lambda record: is_replica(record, desired.get(record.id)),
            spared=self._stopped,
        )
        return [record.id for record in found]

    async def fence(self, found: list[str], lost_for: float) -> None:
        self.fenced = True
        self.converger.fenced = True  # nothing starts again until the registration is back
        log.warning(
            "no registration for %.0fs: stopping %d container(s) (--stop-after-disconnect)",
            lost_for,
            len(found),
        )
        for container_id in found:
            self._stopped.add(container_id)
            try:
                await self.manager.stop(container_id, STOP_GRACE)
            except BerthError as exc:
                log.warning("cannot stop it: %s", exc, extra={"container": container_id})
            else:
                log.info("stopped: the node is cut off", extra={"container": container_id})
