"""The cluster service on a `berthd up --nodes 3` cluster: failover, placement rate, latency.

Part `failover`: a 3-replica service, one replica per node; a node is killed (`berthd
  kill-node`: SIGKILL of its agent, conmons and container processes) and the time until all
  3 replicas run again, none on the dead node, is measured; the node is then brought back
  (`berthd start-node`) for the next round. The median over --rounds.
Part `placement`: --containers containers run through the cluster at once (concurrent
  RunContainer calls), timed until every one reports running on its node; containers/s, the
  median over --rounds.
Part `latency`: RunContainer round trips (and the scheduler's own histogram) with 3, 10 and 30
  schedulable nodes. The extra nodes are fake: `nodes/<id>` keys bound to an etcd lease, as
  an agent registers itself; the 3 real agents are cordoned meanwhile so no container starts.

    .venv/bin/python -m bench.cluster [--rounds 3] [--containers 30] [--samples 100]
    .venv/bin/python -m bench.cluster --only latency          # one part
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.registry import BERTH, BERTHD, BenchError, free_port, port_is_free, run
from berth.client import NodeClient
from berth.cluster.v1 import cluster_pb2 as cpb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.errors import BerthClientError
from berth.tls import secure_channel
from berth.types.v1 import container_pb2
from berthd import localcluster
from berthd.common.store import Store
from scripts.oci_images import make_busybox_image

NODES = 3
IMAGE = "bench/busybox:1"
# A replica that stops at once on SIGTERM, so removals between rounds are quick.
LOOP = ["sh", "-c", 'trap "exit 0" TERM; while true; do sleep 1; done']
SERVICE = "bench-web"
POLL = 0.05
RUNNING = container_pb2.CONTAINER_STATE_RUNNING
LATENCY_SIZES = (3, 10, 30)
FAKE_LEASE_TTL = 300  # outlives the latency part; revoked at its end


# --- helpers -------------------------------------------------------------------------------------


def cluster_base_port(nodes: int) -> int:
    """A base port under which etcd, every service and `nodes` agents find free ports."""
    for _ in range(200):
        base = free_port()
        wanted = localcluster.Ports(base).all(nodes)
        if max(wanted) <= 65535 and all(port_is_free(port) for port in wanted):
            return base
    raise BenchError("found no free range of ports for `berthd up`")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until check() holds; returns the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if check():
            return time.perf_counter() - started
        time.sleep(POLL)
    raise BenchError(f"{what}: not within {timeout:.0f}s")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def spec(command: list[str], name: str = "") -> container_pb2.ContainerSpec:
    return container_pb2.ContainerSpec(image=IMAGE, name=name, command=command)


def scrape(url: str, metric: str) -> float:
    """One unlabelled sample of the cluster's /metrics (0 when absent)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(metric)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


class Cluster:
    """The `berthd up --nodes 3` cluster under test, with a stub for the cluster service."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.info = json.loads((state / "cluster.json").read_text())
        # The cluster's CA and admin certificate, for these channels and for etcd.
        localcluster.use_state_credentials(state)
        self.channel = secure_channel(self.info["services"]["cluster"]["address"])
        self.stub = cluster_pb2_grpc.ClusterServiceStub(self.channel)
        self.metrics = self.info["services"]["cluster"]["metrics"]

    def close(self) -> None:
        self.channel.close()

    def node_states(self) -> dict[str, int]:
        nodes = self.stub.ListNodes(cpb.ListNodesRequest(page_size=1000), timeout=10).nodes
        return {n.description.id: n.state for n in nodes}

    def replicas(self) -> list[cpb.Container]:
        request = cpb.ListServiceReplicasRequest(service=SERVICE, page_size=1000)
        return list(self.stub.ListServiceReplicas(request, timeout=10).containers)

    def running_replicas(self) -> list[cpb.Container]:
        return [c for c in self.replicas() if c.status.state == RUNNING]

    def kill(self, node: str) -> None:
        args = argparse.Namespace(state_dir=self.state, node=node)
        localcluster.kill_node(args)

    def revive(self, node: str) -> None:
        localcluster.start_node(argparse.Namespace(state_dir=self.state, node=node))
        self.info = json.loads((self.state / "cluster.json").read_text())

    def remove_all(self, containers: list[str]) -> None:
        def remove(container_id: str) -> None:
            request = cpb.RemoveContainerRequest(container=container_id, force=True)
            self.stub.RemoveContainer(request, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(remove, containers))


def prepare(cluster: Cluster, work: Path) -> None:
    """Push busybox and pull it onto every node, untimed: no figure includes an image pull."""
    layout = work / "busybox"
    make_busybox_image(layout, "latest")
    registry = cluster.info["services"]["registry"]["address"]
    run([BERTH, "--registry", registry, "oci", "push", f"{layout}:latest", IMAGE], "push")
    for node in cluster.info["nodes"].values():
        with NodeClient(node["address"], timeout=120) as client:
            client.pull(IMAGE)


# --- part 1: failover ----------------------------------------------------------------------------


def failover(cluster: Cluster, rounds: int) -> dict[str, list[float]]:
    create = cpb.CreateServiceRequest(
        spec=cpb.ServiceSpec(name=SERVICE, template=spec(LOOP), replicas=NODES)
    )
    cluster.stub.CreateService(create, timeout=30)
    wait_for(
        lambda: len({c.node_id for c in cluster.running_replicas()}) == NODES,
        60,
        f"{NODES} replicas of {SERVICE} running on {NODES} nodes",
    )
    figures: dict[str, list[float]] = {"detected": [], "recovered": []}
    last = ""
    for number in range(1, rounds + 1):
        by_node = Counter(c.node_id for c in cluster.running_replicas())
        # The node with most replicas, not the one killed last (it just came back empty).
        victim = max(sorted(by_node), key=lambda n: (n != last, by_node[n]))
        detected, recovered = failover_round(cluster, victim, by_node[victim], number)
        figures["detected"].append(detected)
        figures["recovered"].append(recovered)
        last = victim
    cluster.stub.RemoveService(cpb.RemoveServiceRequest(service=SERVICE), timeout=60)
    return figures


def failover_round(cluster: Cluster, victim: str, moved: int, number: int) -> tuple[float, float]:
    """Kill `victim`; (seconds until its lease lapsed, until all replicas ran elsewhere)."""
    started = time.perf_counter()
    cluster.kill(victim)
    detected = 0.0

    def recovered() -> bool:
        nonlocal detected
        if not detected and cluster.node_states().get(victim) != cpb.NODE_STATE_READY:
            detected = time.perf_counter() - started
        running = cluster.running_replicas()
        return len(running) == NODES and all(c.node_id != victim for c in running)

    wait_for(recovered, 120, f"round {number}: replicas of {victim} running elsewhere")
    elapsed = time.perf_counter() - started
    spread = dict(sorted(Counter(c.node_id for c in cluster.running_replicas()).items()))
    print(
        f"round {number}: killed {victim} ({moved} replica(s)): lease lapsed after"
        f" {detected:5.2f}s, all {NODES} running elsewhere after {elapsed:5.2f}s {spread}",
        flush=True,
    )
    # The host comes back: its agent must not run the moved replicas again.
    cluster.revive(victim)
    wait_for(lambda: cluster.node_states().get(victim) == cpb.NODE_STATE_READY, 30, "node back")
    time.sleep(1)  # let the returning agent converge before counting
    if len(cluster.running_replicas()) != NODES:
        raise BenchError(f"round {number}: {len(cluster.running_replicas())} replicas run")
    return detected or elapsed, elapsed


# --- part 2: placement rate ----------------------------------------------------------------------


def placement(cluster: Cluster, rounds: int, count: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"seconds": [], "rtt": []}
    for number in range(1, rounds + 1):
        seconds, rtts = placement_round(cluster, count, f"bench-p{number}-")
        figures["seconds"].append(seconds)
        figures["rtt"] += rtts
    return figures


def placement_round(cluster: Cluster, count: int, prefix: str) -> tuple[float, list[float]]:
    """Run `count` containers at once; (seconds until all run, RunContainer round trips)."""

    def place(name: str) -> tuple[float, cpb.Container]:
        began = time.perf_counter()
        request = cpb.RunContainerRequest(spec=spec(LOOP, name))
        reply = cluster.stub.RunContainer(request, timeout=60)
        return time.perf_counter() - began, reply.container

    def all_running() -> bool:
        request = cpb.ListContainersRequest(name=prefix, state=RUNNING, page_size=1000)
        return len(cluster.stub.ListContainers(request, timeout=10).containers) >= count

    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        placed = list(pool.map(place, [f"{prefix}{i}" for i in range(count)]))
    wait_for(all_running, 120, f"{count} containers running")
    elapsed = time.perf_counter() - started
    spread = dict(sorted(Counter(c.node_id for _, c in placed).items()))
    print(
        f"{count} containers placed and running in {elapsed:5.2f}s ({count / elapsed:5.1f}/s)"
        f" {spread}",
        flush=True,
    )
    cluster.remove_all([c.id for _, c in placed])  # untimed
    return elapsed, [rtt for rtt, _ in placed]


# --- part 3: scheduling latency ------------------------------------------------------------------


async def register_fakes(etcd: str, prefix: str, template: dict, ids: list[str]) -> int:
    """Register nodes the way an agent does (nodes/<id> on a lease); returns the lease."""
    store = Store(etcd, prefix)
    await store.connect()
    try:
        lease = await store.grant_lease(FAKE_LEASE_TTL)
        for node in ids:
            info = {**template, "id": node, "address": "127.0.0.1:9", "labels": {"host": node}}
            await store.put_json(f"nodes/{node}", info, lease=lease)
        return lease
    finally:
        await store.close()


async def revoke(etcd: str, prefix: str, leases: list[int]) -> None:
    store = Store(etcd, prefix)
    await store.connect()
    try:
        for lease in leases:
            await store.revoke_lease(lease)
    finally:
        await store.close()


async def read_node(etcd: str, prefix: str, node: str) -> dict:
    store = Store(etcd, prefix)
    await store.connect()
    try:
        return dict(await store.get_json(f"nodes/{node}"))
    finally:
        await store.close()


def latency(cluster: Cluster, samples: int) -> dict[int, dict[str, float]]:
    etcd, prefix = cluster.info["etcd"]["endpoint"], cluster.info["prefix"]
    template = asyncio.run(read_node(etcd, prefix, "node-1"))
    real = sorted(cluster.info["nodes"])
    results: dict[int, dict[str, float]] = {}
    leases: list[int] = []
    fakes: list[str] = []
    for node in real:
        cluster.stub.CordonNode(cpb.CordonNodeRequest(node_id=node), timeout=10)
    try:
        for size in LATENCY_SIZES:
            more = [f"fake-{i}" for i in range(len(fakes) + 1, size + 1)]
            leases.append(asyncio.run(register_fakes(etcd, prefix, template, more)))
            fakes += more
            ready = {n for n, s in cluster.node_states().items() if s == cpb.NODE_STATE_READY}
            if not set(fakes) <= ready:
                raise BenchError(f"the cluster does not list the {size} fake nodes as ready")
            # One untimed placement warms the channel and the service's code paths.
            placed = [cluster.stub.RunContainer(cpb.RunContainerRequest(spec=spec(["true"])))]
            sum0 = scrape(cluster.metrics, "berth_cluster_scheduling_seconds_sum")
            count0 = scrape(cluster.metrics, "berth_cluster_scheduling_seconds_count")
            # Every other call carries a request_id, as berth's own clients send one: the
            # difference is what idempotency costs (an etcd lease, a claim, the stored reply).
            rtts: list[float] = []
            keyed: list[float] = []
            for i in range(samples):
                request = cpb.RunContainerRequest(spec=spec(["true"]))
                if i % 2:
                    request.request_id = uuid.uuid4().hex
                began = time.perf_counter()
                reply = cluster.stub.RunContainer(request, timeout=30)
                (keyed if i % 2 else rtts).append(time.perf_counter() - began)
                placed.append(reply)
                if reply.container.node_id in real:
                    raise BenchError(f"placed on cordoned {reply.container.node_id}")
            sum1 = scrape(cluster.metrics, "berth_cluster_scheduling_seconds_sum")
            count1 = scrape(cluster.metrics, "berth_cluster_scheduling_seconds_count")
            used = len({r.container.node_id for r in placed})
            results[size] = {
                "median": statistics.median(rtts),
                "keyed": statistics.median(keyed),
                "p95": pct(rtts, 0.95),
                "server": (sum1 - sum0) / (count1 - count0) if count1 > count0 else 0.0,
                "registered": float(size + len(real)),
            }
            print(
                f"{size:3} schedulable nodes: RunContainer median {ms(results[size]['median'])} ms"
                f" ({ms(results[size]['keyed'])} ms with a request_id)"
                f", p95 {ms(results[size]['p95'])} ms, scheduler {ms(results[size]['server'])}"
                f" ms/placement; {samples} placements over {used} nodes",
                flush=True,
            )
            cluster.remove_all([r.container.id for r in placed])
    finally:
        asyncio.run(revoke(etcd, prefix, leases))
        for node in real:
            cluster.stub.ActivateNode(cpb.ActivateNodeRequest(node_id=node), timeout=10)
    return results


def up(state: Path, nodes: int, *flags: str) -> None:
    """`berthd up --nodes N`, retried on other ports when one was taken meanwhile."""
    for attempt in range(3):
        argv = [BERTHD, "up", "--state-dir", str(state), "--nodes", str(nodes), *flags]
        try:
            run([*argv, "--base-port", str(cluster_base_port(nodes))], "berthd up")
            return
        except BenchError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
            stop_cluster(state)
            shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(name: str, nodes: int, *flags: str) -> Iterator[Cluster]:
    """A `berthd up` cluster with busybox pushed (`prepare`), in a work directory of its own;
    on the way out `berthd down`, then by pid and mount whatever it left, and the directory."""
    work = Path(tempfile.mkdtemp(prefix=f"berth-bench-{name}-"))
    state = work / "state"
    try:
        up(state, nodes, *flags)
        cluster = Cluster(state)
        try:
            prepare(cluster, work)
            yield cluster
        finally:
            cluster.close()
    finally:
        try:
            stop_cluster(state)
        finally:
            localcluster.unmount_under(state)
            shutil.rmtree(work, ignore_errors=True)


def reported(name: str, bench: Callable[[], None]) -> int:
    """Run a bench: 0, or 1 with one line on stderr when it failed."""
    try:
        bench()
    except (BenchError, BerthClientError, grpc.RpcError, RuntimeError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"{name} FAILED: {detail}", file=sys.stderr)
        return 1
    return 0


def stop_cluster(state: Path) -> None:
    """`berthd down`, then by pid whatever it left (it should be nothing)."""
    cluster = localcluster.load(state)
    if cluster is None:
        return
    try:
        run([BERTHD, "down", "--state-dir", str(state)], "berthd down")
    finally:
        entries = [info for _, info in localcluster.processes(cluster)] + [cluster["etcd"]]
        for entry in entries:
            localcluster.stop_process(int(entry["pid"]), str(entry["marker"]))


# --- report --------------------------------------------------------------------------------------


def report(args: argparse.Namespace, figures: dict) -> None:
    print()
    print(f"{NODES} node agents on loopback (berthd up --nodes {NODES}), node lease TTL"
          f" {args.lease_ttl}s; medians")  # fmt: skip
    if "failover" in figures:
        f = figures["failover"]
        header = f"{'host death -> replicas running elsewhere':44}{'seconds':>10}"
        print(header)
        print("-" * len(header))
        print(f"{'lease lapsed (node NOT_READY)':44}{statistics.median(f['detected']):>10.2f}")
        print(f"{'all replicas running again':44}{statistics.median(f['recovered']):>10.2f}")
        print(f"({len(f['recovered'])} round(s); min {min(f['recovered']):.2f}s,"
              f" max {max(f['recovered']):.2f}s)\n")  # fmt: skip
    if "placement" in figures:
        p = figures["placement"]
        seconds = statistics.median(p["seconds"])
        header = f"{'placement on 3 hosts':44}{'value':>10}"
        print(header)
        print("-" * len(header))
        print(f"{'containers placed and running per second':44}{args.containers / seconds:>10.1f}")
        print(f"{f'seconds for {args.containers} containers':44}{seconds:>10.2f}")
        print(f"{'RunContainer under that load, median ms':44}"
              f"{ms(statistics.median(p['rtt'])):>10}")  # fmt: skip
        print(f"{'RunContainer under that load, p95 ms':44}{ms(pct(p['rtt'], 0.95)):>10}\n")
    if "latency" in figures:
        header = (
            f"{'schedulable nodes':>18}{'registered':>12}{'RunContainer ms':>17}{'p95 ms':>9}"
            f"{'scheduler ms':>14}{'with request_id ms':>20}"
        )
        print(header)
        print("-" * len(header))
        for size, row in figures["latency"].items():
            print(
                f"{size:>18}{int(row['registered']):>12}{ms(row['median']):>17}"
                f"{ms(row['p95']):>9}{ms(row['server']):>14}{ms(row['keyed']):>20}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="failover and placement rounds")
    parser.add_argument("--containers", type=int, default=30, help="containers per placement round")
    parser.add_argument("--samples", type=int, default=100, help="placements per latency size")
    parser.add_argument("--lease-ttl", type=int, default=3, help="node agents' lease TTL (s)")
    parser.add_argument("--only", choices=("failover", "placement", "latency"), action="append")
    args = parser.parse_args(argv)
    if min(args.rounds, args.containers, args.samples, args.lease_ttl) < 1:
        parser.error("--rounds, --containers, --samples and --lease-ttl must be positive")
    parts = args.only or ["failover", "placement", "latency"]

    def bench() -> None:
        figures: dict = {}
        with local_cluster("cluster", NODES, "--node-lease-ttl", str(args.lease_ttl)) as cluster:
            if "failover" in parts:
                print(f"\n== failover: a {NODES}-replica service, one node killed per round")
                figures["failover"] = failover(cluster, args.rounds)
            if "placement" in parts:
                print(f"\n== placement: {args.containers} concurrent RunContainer per round")
                figures["placement"] = placement(cluster, args.rounds, args.containers)
            if "latency" in parts:
                print(f"\n== scheduling latency: {args.samples} sequential RunContainer per size")
                figures["latency"] = latency(cluster, args.samples)
        report(args, figures)

    return reported("bench.cluster", bench)


if __name__ == "__main__":
    sys.exit(main())
