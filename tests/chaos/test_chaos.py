"""The chaos test: a workload of pushes, pulls, tags, builds, runs and a 3-replica service on
three hosts, while a seeded schedule SIGKILLs components (etcd, registry, image, builder, cluster
instances, node agents) or cuts a host's link, some of them overlapping, and starts or restores
each again. Once the schedule is over and the cluster has settled, the invariants of
tests/chaos/invariants.py must hold, and an acknowledged build's context, built again after GC,
must give the very same image from the cache.

CHAOS_MINUTES (default 1: the bounded run of `make test`) is how long faults keep coming;
CHAOS_SEED picks the schedule (default: a random one). The seed is printed first and is in every
failure message: `CHAOS_SEED=<n> make chaos` replays the same schedule. Nothing is timed: the
cluster is waited on until it settles, with a generous guard against a hang.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from berthd.common.state.build_cache import CACHE_REPOSITORY

from .cluster import ChaosCluster
from .invariants import (
    Acknowledged,
    check_build_containers,
    check_containers,
    check_errors,
    check_failed_builds,
    check_image_records,
    check_pushes,
    check_reads,
    check_rebuilds,
    check_registry_files,
    check_scratch,
    check_service,
)
from .schedule import HOSTS, Fault, generate
from .workload import BUILD_DEADLINE, REPLICAS, SERVICE

MINUTES = float(os.environ.get("CHAOS_MINUTES") or 1)
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
SETTLE_GUARD = 300  # seconds the cluster gets to settle before its state counts as final

pytestmark = [pytest.mark.integration, pytest.mark.timeout(int(MINUTES * 60) + 1200)]


def replay() -> str:
    return f"chaos seed {SEED} (replay: CHAOS_SEED={SEED} CHAOS_MINUTES={MINUTES:g} make chaos)"


def play(cluster: ChaosCluster, faults: list[Fault], crashes: list[str]) -> None:
    """Each fault's begin and end at its time (later if a restart before took longer); when
    faults overlap, the second begins while the first lasts."""
    began = time.monotonic()
    # Ends before begins at the same time; a group's faults in order.
    events = sorted(
        [(f.at, 1, n, f) for n, f in enumerate(faults)]
        + [(f.end, 0, n, f) for n, f in enumerate(faults)]
    )
    active = 0
    for at, begins, _, fault in events:
        time.sleep(max(0.0, began + at - time.monotonic()))
        if begins:
            if not active:  # a crash is restarted on an otherwise whole cluster
                revive(cluster, crashes)
            print(f"  {fault}" + ("  (overlapping)" if active else ""), flush=True)
            cluster.begin(fault)
            active += 1
        else:
            cluster.end(fault)
            active -= 1
    revive(cluster, crashes)


def revive(cluster: ChaosCluster, crashes: list[str]) -> None:
    """A component that died on its own is a finding; it is started again so the run goes on."""
    for crash in cluster.crashed():
        crashes.append(f"{crash} without being killed")
        cluster.restart(crash.split()[0])


def settle(cluster: ChaosCluster, journal: Path, acked: Acknowledged) -> tuple[dict, list[str]]:
    """Snapshots until the service and the acknowledged containers hold their invariants in
    two snapshots in a row (a passing glimpse is not a settled cluster), or the guard runs out;
    returns the last snapshot and what it still violates."""
    deadline = time.monotonic() + SETTLE_GUARD
    held = 0
    while True:
        try:
            snapshot = cluster.client("observe", "snapshot", f"--journal={journal}")
        except RuntimeError:  # the cluster may not answer yet
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
            continue
        assert isinstance(snapshot, dict)
        found = [f"node {h} is not registered" for h in HOSTS if h not in snapshot["nodes"]]
        found += check_service(snapshot, SERVICE, REPLICAS)
        found += check_containers(snapshot, acked.runs, acked.removed)
        found += check_build_containers(snapshot)
        held = 0 if found else held + 1
        if held == 2 or (found and time.monotonic() > deadline):
            return snapshot, found
        time.sleep(2)


def rebuild(cluster: ChaosCluster, acked: Acknowledged) -> list[str]:
    """The first acknowledged build's context, built again after the run and GC: its cache
    must have survived whole, so the very same image comes back."""
    first = next((b for b in acked.builds if "rebuild_of" not in b), None)
    if first is None:
        return ["no build was acknowledged during the run"]
    got = cluster.client(
        "observe", "rebuild", f"--context={first['context']}", "--tag=chaos/rebuilt:1"
    )
    assert isinstance(got, dict)
    if got.get("digest") != first["digest"]:
        return [f"{first['ref']} ({first['digest']}) rebuilt after the run gives {got}"]
    return []


def test_chaos(tmp_path_factory: pytest.TempPathFactory) -> None:
    print(f"\n{replay()}", flush=True)
    faults = generate(SEED, MINUTES * 60)
    run_dir = tmp_path_factory.mktemp("chaos")
    print(f"logs and journal in {run_dir}", flush=True)
    cluster = ChaosCluster(run_dir)
    journal, stop = run_dir / "journal.jsonl", run_dir / "stop"
    violations: list[str] = []
    try:
        cluster.start()
        assert cluster.client("workload", "setup", timeout=300) is True
        workload = cluster.background(
            "workload",
            "run",
            f"--journal={journal}",
            f"--stop={stop}",
            f"--seed={SEED}",
            log=run_dir / "workload.log",
        )
        try:
            play(cluster, faults, violations)
        finally:
            stop.touch()
            try:
                workload.wait(timeout=180)
            except subprocess.TimeoutExpired:
                workload.kill()
                workload.wait()
        if workload.returncode != 0:
            tail = (run_dir / "workload.log").read_text()[-3000:]
            violations.append(f"the workload exited with {workload.returncode}:\n{tail}")
        records = [json.loads(line) for line in journal.read_text().splitlines()]
        acked = Acknowledged.from_journal(records)
        snapshot, found = settle(cluster, journal, acked)
        violations += found + check_reads(acked.bad_reads) + check_errors(acked.errors)
        violations += check_rebuilds(acked.builds) + check_scratch(cluster.builder_scratch)
        read = cluster.client("observe", "snapshot", f"--journal={journal}", "--pushes")
        assert isinstance(read, dict)
        violations += check_pushes(acked.pushes, read["pushes"])
        violations += check_failed_builds(
            acked.failed_builds, read["failed_builds"], BUILD_DEADLINE
        )
        violations += check_registry_files(cluster.registry_data, after_gc=False)
        records = cluster.client("observe", "records")
        assert isinstance(records, dict)
        violations += check_image_records(records, CACHE_REPOSITORY)
        gc = cluster.client("observe", "gc")
        assert isinstance(gc, dict)
        if "error" in gc:
            violations.append(f"registry GC failed after the run: {gc['error']}")
        violations += check_registry_files(cluster.registry_data, after_gc=True)
        after = cluster.client("observe", "snapshot", f"--journal={journal}", "--pushes")
        assert isinstance(after, dict)
        violations += [f"after GC: {v}" for v in check_pushes(acked.pushes, after["pushes"])]
        records = cluster.client("observe", "records")
        assert isinstance(records, dict)
        violations += [f"after GC: {v}" for v in check_image_records(records, CACHE_REPOSITORY)]
        violations += rebuild(cluster, acked)
        violations += [f"{c} after the run" for c in cluster.crashed()]
        print(
            json.dumps(
                {
                    "seed": SEED,
                    "faults": len(faults),
                    "overlapping": sum(
                        later.at < earlier.end for earlier, later in itertools.pairwise(faults)
                    ),
                    "pushes": len(acked.pushes) - len(acked.builds),
                    "builds": len(acked.builds),
                    "rebuilds": sum("rebuild_of" in b for b in acked.builds),
                    "runs": len(acked.runs),
                    "removed": len(acked.removed),
                    "failed_calls": acked.error_codes(),
                    "failure_samples": acked.error_samples(),
                    "container_states": sorted(
                        c["state"] for cid, c in snapshot["containers"].items() if cid in acked.runs
                    ),
                    "gc": gc,
                }
            ),
            flush=True,
        )
    except Exception as err:
        raise AssertionError(f"{replay()}: {type(err).__name__}: {err}") from err
    finally:
        with contextlib.suppress(Exception):
            cluster.close()
    assert not violations, f"{replay()}: broken invariants:\n" + "\n".join(violations)
