"""`berth stats --no-stream` for many containers: wall time through the CLI and CPU per call.

One `berthd up --nodes 3` cluster runs --containers busybox `sleep` containers (bench.scale's:
16 MiB limit, spread over the agents); then `berth stats --no-stream --format json` runs
--rounds times. Printed per call: the wall time (median and min), the CLI's CPU (its rusage),
and the cluster service's and the node agents' CPU from /proc/<pid>/stat, less their idle CPU
over as long a quiet window right after (so the agents' container monitoring is not counted).
CPU figures stay steady on a loaded machine; wall times do not (the load average is printed):
with --baseline DIR (an older checkout's clients/python, byte-compiled) that CLI runs too, call
for call alternating with this one, so both see the same load.

    .venv/bin/python -m bench.stats                  # 100 containers, 5 rounds
    .venv/bin/python -m bench.stats --containers 20 --rounds 3
    .venv/bin/python -m bench.stats --rounds 20 --baseline /tmp/old/clients/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cluster import Cluster, local_cluster, reported
from bench.registry import BERTH, BenchError
from bench.scale import CLK_TCK, NODES, RUN_THREADS, run_containers, wait_running


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def call(argv: list[str], env: dict[str, str], containers: int) -> tuple[float, float]:
    """Wall and CPU seconds of one `berth stats` run (rusage of the child), its output checked."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise BenchError(f"berth stats failed: {err.read().decode().strip()}")
        shown = len(json.loads(out.read()))
    if shown != containers:
        raise BenchError(f"berth stats showed {shown} of {containers}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(cluster: Cluster, containers: int, rounds: int, baseline: Path | None) -> str:
    """Each CLI (this checkout's, and the baseline's when given) once per round, alternating."""
    info = cluster.info
    pids = {"cluster": int(info["services"]["cluster"]["pid"])}
    pids |= {name: int(node["pid"]) for name, node in info["nodes"].items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["BERTH_STATE_DIR"] = str(cluster.state)
    env.pop("PYTHONPATH", None)
    clis = {"this checkout": env}
    if baseline:
        clis["baseline"] = {**env, "PYTHONPATH": str(baseline.resolve())}
    argv = [BERTH, "stats", "--no-stream", "--format", "json"]
    for cli_env in clis.values():
        call(argv, cli_env, containers)  # warm the caches
    walls: dict[str, list[float]] = {name: [] for name in clis}
    cli_cpu = {name: 0.0 for name in clis}
    served = {name: dict.fromkeys(pids, 0.0) for name in clis}
    spent = 0.0
    for round_ in range(rounds):
        order = list(clis) if round_ % 2 == 0 else list(clis)[::-1]
        for name in order:
            before = {key: cpu_seconds(pid) for key, pid in pids.items()}
            wall, cpu = call(argv, clis[name], containers)
            walls[name].append(wall)
            cli_cpu[name] += cpu
            spent += wall
            for key, pid in pids.items():
                served[name][key] += cpu_seconds(pid) - before[key]
    # The services' idle CPU over as long a quiet window, subtracted from what the calls cost.
    before = {key: cpu_seconds(pid) for key, pid in pids.items()}
    time.sleep(spent)
    idle_rate = {key: (cpu_seconds(pid) - before[key]) / spent for key, pid in pids.items()}
    lines = [f"{containers} containers, {rounds} calls each, load {os.getloadavg()[0]:.1f}:"]
    for name in clis:
        total = sum(walls[name])
        per_call = {key: (served[name][key] - idle_rate[key] * total) / rounds for key in pids}
        agents = sum(value for key, value in per_call.items() if key != "cluster")
        lines.append(
            f"  {name}: wall median {statistics.median(walls[name]) * 1000:.0f} ms (min "
            f"{min(walls[name]) * 1000:.0f}); CPU per call: CLI {cli_cpu[name] / rounds * 1000:.0f}"
            f" ms, cluster {per_call['cluster'] * 1000:.0f} ms, node agents {agents * 1000:.0f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=100, help="containers to sample")
    parser.add_argument("--rounds", type=int, default=5, help="berth stats calls to time")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="an older checkout's clients/python: its CLI runs too, alternating with this one",
    )
    parser.add_argument(
        "--state",
        type=Path,
        help="the state directory of a running `berthd up` cluster to measure (left running; "
        "it must run exactly --containers containers named stats-c*)",
    )
    args = parser.parse_args(argv)
    if args.containers < 1 or args.rounds < 1:
        parser.error("--containers and --rounds must be positive")
    if args.state:
        cluster = Cluster(args.state)
        try:
            return reported(
                "bench.stats",
                lambda: print(measure(cluster, args.containers, args.rounds, args.baseline)),
            )
        finally:
            cluster.close()

    def bench() -> None:
        with local_cluster("stats", NODES) as cluster:
            names = [f"stats-c{i:04d}" for i in range(args.containers)]
            run_containers(cluster, names, RUN_THREADS)
            wait_running(cluster, "stats-c", args.containers, 60 + args.containers)
            print(measure(cluster, args.containers, args.rounds, args.baseline))

    return reported("bench.stats", bench)


if __name__ == "__main__":
    sys.exit(main())
