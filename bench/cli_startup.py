"""The `berth` CLI's start-up: wall and CPU time of commands that do little, beside docker's.

Commands run one after the other, in a rotated order each round, so a change in the machine's
load touches every one alike: `berth --help`, `berth --version`, `berth ps` and `berth images`
against a `berthd up --nodes 1` cluster holding busybox only, and the peer `docker --help`,
`docker --version` (client only: no daemon needed). With --baseline DIR (an older checkout's
`clients/python`, byte-compiled) each berth command also runs with PYTHONPATH=DIR, in the same
rounds. Printed per command: median and min wall time, median CPU (user + system, from the
child's rusage). CPU figures stay steady on a loaded machine; wall times do not.

    .venv/bin/python -m bench.cli_startup                      # 20 rounds
    .venv/bin/python -m bench.cli_startup --baseline /tmp/old/clients/python --rounds 30
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cluster import local_cluster, reported
from bench.registry import BERTH, BenchError

DOCKER = shutil.which("docker")
BERTH_COMMANDS = (["--help"], ["--version"], ["ps"], ["images"])
DOCKER_COMMANDS = (["--help"], ["--version"])


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run (output to /dev/null); raises with its stderr when it
    fails."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if child.returncode != 0:
            err.seek(0)
            raise BenchError(f"{' '.join(argv)}: exit {child.returncode}: {err.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(cases: dict[str, tuple[list[str], dict[str, str]]], rounds: int) -> None:
    names = list(cases)
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm the page cache
        timed(*cases[name])
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed(*cases[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
    width = max(len(name) for name in names)
    print(f"{rounds} rounds, load {os.getloadavg()[0]:.1f}")
    print(f"{'command':{width}}  {'wall median':>12}  {'wall min':>9}  {'CPU median':>11}")
    for name in names:
        print(
            f"{name:{width}}  {statistics.median(walls[name]) * 1000:>9.1f} ms"
            f"  {min(walls[name]) * 1000:>6.1f} ms  {statistics.median(cpus[name]) * 1000:>8.1f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="runs of each command")
    parser.add_argument(
        "--baseline", type=Path, help="an older checkout's clients/python, run beside this one"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be positive")

    def bench() -> None:
        with local_cluster("cli", 1) as cluster:
            env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
            env["BERTH_STATE_DIR"] = str(cluster.state)
            env.pop("PYTHONPATH", None)
            cases: dict[str, tuple[list[str], dict[str, str]]] = {}
            for words in BERTH_COMMANDS:
                cases[" ".join(["berth", *words])] = ([BERTH, *words], env)
                if args.baseline:
                    old = {**env, "PYTHONPATH": str(args.baseline.resolve())}
                    cases[" ".join(["berth", *words, "(baseline)"])] = ([BERTH, *words], old)
            if DOCKER:
                for words in DOCKER_COMMANDS:
                    cases[" ".join(["docker", *words])] = ([DOCKER, *words], env)
            measure(cases, args.rounds)

    return reported("bench.cli_startup", bench)


if __name__ == "__main__":
    sys.exit(main())
