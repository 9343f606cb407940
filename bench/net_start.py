"""Container start latency on a berth network against `--network none` (issue 16's goal: under
30 ms added).

One `berthd up --nodes 3` cluster (busybox pushed and pulled onto every node). Every start is
timed at node-1's agent: CreateContainer + StartContainer, the node's half of a RunContainer,
until the agent answers that the container runs (runc started its process; on a network, its
namespace, CNI ADD, /etc/hosts and the nftables check are done by then). Placement and the
cluster's watch are left out: they are the same for both and only add noise. Three kinds of
start, in alternating order per round (A B C, then C B A), medians over --rounds:

- `none`: `--network none`, a namespace with loopback only (the peer);
- `network`: `--network berth`, a network node-1 already has a container on (a container of
  the bench keeps it there), so its slice, bridge and rules exist: the common case;
- `first`: the first container on node-1 of a network made for the round: the slice lease in
  etcd, the bridge and a rewrite of the node's nftables table come on top.

Each container runs `sleep` and is removed after its start, untimed (a removal on a network
runs CNI DEL; the last one on a network also drops its bridge and slice).

    .venv/bin/python -m bench.net_start [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable

from bench.cluster import IMAGE, Cluster, local_cluster, ms, pct, reported
from berth.client import ContainerConfig, NodeClient
from berth.client.networks import NetworkClient

NODE = "node-1"
DEFAULT_NETWORK = "berth"
SLEEP = ["sleep", "600"]
GOAL_MS = 30.0
KINDS = ("none", "network", "first")


def timed_start(node: NodeClient, network: str) -> tuple[float, str]:
    """Create and start one container on `network` (a mode or a name): (seconds, id)."""
    config = ContainerConfig(IMAGE, command=SLEEP, network_mode=network)
    began = time.perf_counter()
    started = node.run(config)
    elapsed = time.perf_counter() - began
    if started.state != "running":
        raise RuntimeError(f"a container on {network} is {started.state}, not running")
    return elapsed, started.id


def bench_rounds(cluster: Cluster, rounds: int) -> dict[str, list[float]]:
    address = cluster.info["nodes"][NODE]["address"]
    figures: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with (
        NodeClient(address, timeout=120) as node,
        NetworkClient(cluster.info["services"]["cluster"]["address"]) as networks,
    ):
        # Keeps node-1's slice, bridge and rules of the default network between the starts.
        _, anchor = timed_start(node, DEFAULT_NETWORK)

        def start_none() -> float:
            return start_and_remove(node, "none")

        def start_network() -> float:
            return start_and_remove(node, DEFAULT_NETWORK)

        def start_first() -> float:
            name = f"bench-{uuid.uuid4().hex[:8]}"
            networks.create(name)
            try:
                return start_and_remove(node, name)
            finally:
                networks.remove(name)

        starts: dict[str, Callable[[], float]] = {
            "none": start_none,
            "network": start_network,
            "first": start_first,
        }
        try:
            for kind in KINDS:  # warm-up: the agent's code paths and the CNI binaries' pages
                starts[kind]()
            for number in range(rounds):
                order = KINDS if number % 2 == 0 else tuple(reversed(KINDS))
                row = {kind: starts[kind]() for kind in order}
                for kind, seconds in row.items():
                    figures[kind].append(seconds)
                print(
                    f"round {number + 1:2}: "
                    + ", ".join(f"{kind} {ms(row[kind]):>6} ms" for kind in KINDS),
                    flush=True,
                )
        finally:
            node.remove(anchor, force=True)
    return figures


def start_and_remove(node: NodeClient, network: str) -> float:
    seconds, container = timed_start(node, network)
    node.remove(container, force=True)
    return seconds


def report(figures: dict[str, list[float]]) -> None:
    none, network, first = (statistics.median(figures[kind]) for kind in KINDS)
    rounds = len(figures["none"])
    print(
        f"\ncontainer start at the node agent (CreateContainer + StartContainer until running),"
        f" busybox sleep, {rounds} alternating rounds; medians"
    )
    header = f"{'start':44}{'median ms':>11}{'p95 ms':>9}{'vs none':>9}"
    print(header)
    print("-" * len(header))
    for kind, label in (
        ("none", "--network none (peer)"),
        ("network", f"--network {DEFAULT_NETWORK} (bridge exists)"),
        ("first", "first on a new network (slice, bridge, nft)"),
    ):
        median = statistics.median(figures[kind])
        print(f"{label:44}{ms(median):>11}{ms(pct(figures[kind], 0.95)):>9}{median / none:>8.2f}x")
    added = (network - none) * 1000
    verdict = "met" if added < GOAL_MS else "NOT met"
    print(
        f"\na network adds {added:.1f} ms to a start ({network / none:.2f}x --network none;"
        f" goal under {GOAL_MS:.0f} ms: {verdict}); the first start of a network on a node adds"
        f" {(first - none) * 1000:.1f} ms ({first / none:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds (20)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be positive")

    def bench() -> None:
        with local_cluster("net-start", 3) as cluster:
            report(bench_rounds(cluster, args.rounds))

    return reported("bench.net_start", bench)


if __name__ == "__main__":
    sys.exit(main())
