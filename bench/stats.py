"""`berth stats --no-stream` for many containers: wall time through the CLI and CPU per call.

One `berthd up --nodes 3` cluster runs --containers busybox `sleep` containers (bench.scale's:
16 MiB limit, spread over the agents); then `berth stats --no-stream --format json` runs
--rounds times. Printed per call: the wall time (median and min), the CLI's CPU (its rusage),
and the cluster service's and the node agents' CPU from /proc/<pid>/stat, less their idle CPU
over as long a quiet window right after (so the agents' container monitoring is not counted).
CPU figures stay steady on a loaded machine; wall times do not (the load average is printed).

    .venv/bin/python -m bench.stats                  # 100 containers, 5 rounds
    .venv/bin/python -m bench.stats --containers 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cluster import Cluster, local_cluster, reported
from bench.registry import BERTH, BenchError
from bench.scale import CLK_TCK, NODES, RUN_THREADS, run_containers, wait_running


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(cluster: Cluster, containers: int, rounds: int) -> str:
    info = cluster.info
    pids = {"cluster": int(info["services"]["cluster"]["pid"])}
    pids |= {name: int(node["pid"]) for name, node in info["nodes"].items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["BERTH_STATE_DIR"] = str(cluster.state)
    argv = [BERTH, "stats", "--no-stream", "--format", "json"]
    subprocess.run(argv, capture_output=True, env=env, check=False)  # warm the caches
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children = os.times()
    walls: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise BenchError(f"berth stats failed: {done.stderr.strip()}")
        if len(json.loads(done.stdout)) != containers:
            raise BenchError(f"berth stats showed {len(json.loads(done.stdout))} of {containers}")
    after = os.times()
    busy = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    time.sleep(sum(walls))  # as long again, quiet: the idle CPU to subtract
    idle = {name: cpu_seconds(pid) - before[name] - busy[name] for name, pid in pids.items()}
    cli = after.children_user + after.children_system
    cli -= children.children_user + children.children_system
    per_call = {name: (busy[name] - idle[name]) / rounds for name in pids}
    agents = sum(value for name, value in per_call.items() if name != "cluster")
    return (
        f"{containers} containers, {rounds} calls, load {os.getloadavg()[0]:.1f}: wall median "
        f"{statistics.median(walls) * 1000:.0f} ms (min {min(walls) * 1000:.0f}); CPU per call: "
        f"CLI {cli / rounds * 1000:.0f} ms, cluster {per_call['cluster'] * 1000:.0f} ms, "
        f"node agents {agents * 1000:.0f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=100, help="containers to sample")
    parser.add_argument("--rounds", type=int, default=5, help="berth stats calls to time")
    args = parser.parse_args(argv)
    if args.containers < 1 or args.rounds < 1:
        parser.error("--containers and --rounds must be positive")

    def bench() -> None:
        with local_cluster("stats", NODES) as cluster:
            names = [f"stats-c{i:04d}" for i in range(args.containers)]
            run_containers(cluster, names, RUN_THREADS)
            wait_running(cluster, "stats-c", args.containers, 60 + args.containers)
            print(measure(cluster, args.containers, args.rounds))

    return reported("bench.stats", bench)


if __name__ == "__main__":
    sys.exit(main())
