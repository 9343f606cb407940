"""The node agent's idle cost: its CPU with 0, 50, 200 running `sleep` containers (issue 14).

One `berthd up --nodes 1` cluster; at each step the containers are run through the cluster
until the step's count runs on the one agent, then, after --settle seconds, the agent's user +
system CPU is read from /proc/<pid>/stat over --window seconds of quiet. Also shown: how often
the agent's exit monitor woke and read exit files over the window (its /metrics counters
`berth_node_monitor_wakeups_total` and `berth_node_exit_checks_total`; "-" on a build that has
none).

    .venv/bin/python -m bench.node_idle [--containers 0,50,200] [--window 20] [--settle 5]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request

from bench.cluster import Cluster, local_cluster, reported
from bench.scale import cpu_meter, percent, run_containers, sizes, wait_running

COUNTERS = ("berth_node_monitor_wakeups_total", "berth_node_exit_checks_total")


def counter(url: str, metric: str) -> float | None:
    """An unlabelled counter of the agent's /metrics, None when the agent has no such one."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(metric)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def measure(cluster: Cluster, args: argparse.Namespace) -> list[tuple[int, float, list[str]]]:
    node = cluster.info["nodes"]["node-1"]
    pid, metrics = int(node["pid"]), node["metrics"]
    rows = []
    placed = 0
    for count in args.containers:
        if count > placed:
            print(f"  running {count - placed} sleep containers", flush=True)
            names = [f"idle-{n:04d}" for n in range(placed, count)]
            run_containers(cluster, names, 6)
            wait_running(cluster, "idle-", count, 600)
            placed = count
        time.sleep(args.settle)
        before = [counter(metrics, name) for name in COUNTERS]
        with cpu_meter({"node": pid}) as cpu:
            time.sleep(args.window)
        after = [counter(metrics, name) for name in COUNTERS]
        rates = [
            "-" if a is None or b is None else f"{(a - b) / cpu['wall']:.2f}/s"
            for a, b in zip(after, before, strict=True)
        ]
        rows.append((count, percent(cpu, "node"), rates))
        print(f"  {count} containers: agent {rows[-1][1]:.2f} % of a core,"
              f" monitor wake-ups {rates[0]}, exit-file reads {rates[1]}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", default="0,50,200", help="running containers per step")
    parser.add_argument("--window", type=float, default=20, help="seconds of quiet measured")
    parser.add_argument("--settle", type=float, default=5, help="seconds before that window")
    args = parser.parse_args(argv)
    try:
        args.containers = sizes(args.containers, "--containers")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))

    def bench() -> None:
        with local_cluster("nodeidle", 1) as cluster:
            rows = measure(cluster, args)
        print(
            "\n| running containers | agent CPU, % of a core | monitor wake-ups | exit-file reads |"
        )
        print("|---|---|---|---|")
        for count, cpu, rates in rows:
            print(f"| {count} | {cpu:.2f} | {rates[0]} | {rates[1]} |")

    return reported("bench.node_idle", bench)


if __name__ == "__main__":
    sys.exit(main())
