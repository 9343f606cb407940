"""RunContainer bursts through the real RPC, with where the time goes (issue 14's p95 goal).

One `berthd up --nodes 3` cluster (mutual TLS, busybox pushed and pulled onto every node),
then --rounds bursts of --concurrent RunContainer calls at once from as many threads of this
process, each with a `request_id` as berth's clients send, for busybox `sleep` containers on
the 3 real hosts (as bench.scale's placement figure). Per burst: each call's round trip, and
the CPU seconds over the burst (from the first call's start to the last reply) of the cluster
service, etcd, the three node agents and this process (the client side), from /proc; after
each burst the containers are waited on until running and removed, untimed. A first burst is
a warm-up and is not counted.

    .venv/bin/python -m bench.run_burst [--rounds 10] [--concurrent 30]
    .venv/bin/python -m bench.run_burst --profile out.json   # py-spy on the cluster service

--profile records the cluster service with py-spy (`pip install py-spy` into the .venv; not a
dependency of berth) over the timed bursts, as speedscope JSON (--idle: waiting shown too).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.cluster import Cluster, local_cluster, pct, reported
from bench.scale import cpu_seconds, run_request, wait_running

CLIENT = "client (this process)"


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def burst(cluster: Cluster, prefix: str, count: int, pids: dict[str, int]) -> dict[str, object]:
    """`count` RunContainer calls at once; round trips and each process's CPU seconds."""
    names = [f"{prefix}{i}" for i in range(count)]
    pool = ThreadPoolExecutor(count)
    # The threads exist before the clock starts: their creation is not the call's cost.
    list(pool.map(lambda _: None, range(count)))

    def place(name: str) -> tuple[float, str]:
        began = time.perf_counter()
        reply = cluster.stub.RunContainer(run_request(name), timeout=120)
        return time.perf_counter() - began, reply.container.id

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = own_cpu()
    began = time.perf_counter()
    try:
        placed = list(pool.map(place, names))
    finally:
        pool.shutdown()
    wall = time.perf_counter() - began
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu[CLIENT] = own_cpu() - client_before
    wait_running(cluster, prefix, count, 120)
    cluster.remove_all([cid for _, cid in placed])
    return {"rtts": [rtt for rtt, _ in placed], "wall": wall, "cpu": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed bursts (10)")
    parser.add_argument("--concurrent", type=int, default=30, help="calls at once (30)")
    parser.add_argument("--profile", type=Path, help="py-spy speedscope output (cluster service)")
    parser.add_argument("--idle", action="store_true", help="with --profile: waiting too")
    args = parser.parse_args(argv)

    def bench() -> None:
        with local_cluster("burst", 3) as cluster:
            pids = {
                "cluster": int(cluster.info["services"]["cluster"]["pid"]),
                "etcd": int(cluster.info["etcd"]["pid"]),
            }
            for node, info in sorted(cluster.info["nodes"].items()):
                pids[node] = int(info["pid"])
            burst(cluster, "warm-", args.concurrent, pids)
            spy = None
            if args.profile:
                command = [
                    shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                    *("record", "-p", str(pids["cluster"]), "--format", "speedscope"),
                    *("-o", str(args.profile), "--rate", "250"),
                    *(["--idle"] if args.idle else []),
                ]
                spy = subprocess.Popen(command, stdout=subprocess.DEVNULL)
                time.sleep(1)
            rounds = []
            try:
                for number in range(args.rounds):
                    load = os.getloadavg()[0]
                    found = burst(cluster, f"burst-{number}-", args.concurrent, pids)
                    rtts = sorted(found["rtts"])
                    print(
                        f"burst {number + 1}: median {statistics.median(rtts) * 1000:6.1f} ms,"
                        f" p95 {pct(rtts, 0.95) * 1000:6.1f} ms, wall {found['wall'] * 1000:6.1f}"
                        f" ms, load {load:4.1f}; CPU ms per call: "
                        + ", ".join(
                            f"{name} {seconds * 1000 / args.concurrent:.1f}"
                            for name, seconds in found["cpu"].items()
                        ),
                        flush=True,
                    )
                    rounds.append(found)
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
            every = [rtt for found in rounds for rtt in found["rtts"]]
            calls = len(every)
            print(
                f"all {len(rounds)} bursts: median {statistics.median(every) * 1000:.1f} ms,"
                f" p95 {pct(every, 0.95) * 1000:.1f} ms, median burst wall"
                f" {statistics.median(f['wall'] for f in rounds) * 1000:.1f} ms"
            )
            for name in rounds[0]["cpu"]:
                total = sum(found["cpu"][name] for found in rounds)
                print(f"  CPU per call, {name}: {total * 1000 / calls:.2f} ms")

    return reported("run_burst", bench)


if __name__ == "__main__":
    sys.exit(main())
