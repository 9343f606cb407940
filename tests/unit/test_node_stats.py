"""`berth stats`: the CPU percentage from two cgroup readings, and the cluster's fan-out."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from berth.types.v1 import container_pb2
from berthd.cluster.core import ContainerView
from berthd.cluster.stats import sample_stats
from berthd.common.containers import ContainerConfig
from berthd.common.errors import NotFound, Unavailable
from berthd.common.state.containers import ContainerStatus, DesiredContainer
from berthd.node import cgroups
from berthd.node.cgroups import CpuReading, cpu_percent, read_cpu, read_stats

MS = 1_000_000  # nanoseconds


def test_one_busy_cpu_is_100_percent() -> None:
    assert cpu_percent(CpuReading(0, 5 * MS), CpuReading(100 * MS, 105 * MS)) == 100.0


def test_percent_of_one_cpu_exceeds_100_with_two_busy() -> None:
    assert cpu_percent(CpuReading(0, 0), CpuReading(100 * MS, 200 * MS)) == 200.0


def test_a_quarter_and_rounding() -> None:
    assert cpu_percent(CpuReading(10, 0), CpuReading(10 + 1000 * MS, 250 * MS)) == 25.0
    assert cpu_percent(CpuReading(0, 0), CpuReading(3 * MS, 1 * MS)) == 33.33


def test_idle_is_zero() -> None:
    assert cpu_percent(CpuReading(0, 7 * MS), CpuReading(100 * MS, 7 * MS)) == 0.0


def test_no_time_between_readings_is_zero_not_a_division_error() -> None:
    assert cpu_percent(CpuReading(5, 0), CpuReading(5, 9 * MS)) == 0.0


def test_a_counter_that_went_back_reads_as_idle() -> None:
    # A restarted container has a new cgroup whose counter starts again from 0.
    assert cpu_percent(CpuReading(0, 900 * MS), CpuReading(100 * MS, 3 * MS)) == 0.0


# The cluster's fan-out (berthd.cluster.stats) over a fake core and fake node clients.


class FakeCore:
    def __init__(self, views: list[ContainerView], down: set[str]) -> None:
        self.views = {v.name: v for v in views}
        self.down = down

    async def inspect(self, ref: str) -> ContainerView:
        if ref not in self.views:
            raise NotFound(f"no such container: {ref}")
        return self.views[ref]

    async def list(self) -> list[ContainerView]:
        return list(self.views.values())

    async def node_address(self, view: ContainerView) -> str:
        node = view.desired.node
        if node in self.down:
            raise Unavailable(f"node {node} of container {view.name} is not ready")
        return f"{node}:1"


class FakeNode:
    def __init__(self, calls: list[tuple[str, list[str]]], address: str) -> None:
        self.calls, self.address = calls, address

    async def stats_many(self, ids: list[str]) -> list[container_pb2.ContainerStats]:
        self.calls.append((self.address, ids))
        return [container_pb2.ContainerStats(pids=int(i.removeprefix("id-"))) for i in ids]


def view(number: int, node: str, reported: bool = True) -> ContainerView:
    config = ContainerConfig(image="busybox")
    desired = DesiredContainer(id=f"id-{number}", name=f"c{number}", node=node, config=config)
    return ContainerView(desired, ContainerStatus(node=node, state="running") if reported else None)


async def test_one_call_per_node_and_an_error_for_a_node_out_of_reach() -> None:
    views = [view(1, "n1"), view(2, "n2"), view(3, "n1"), view(4, "n3"), view(5, "n1", False)]
    calls: list[tuple[str, list[str]]] = []
    core = FakeCore(views, down={"n3"})
    entries = await sample_stats(core, [], lambda address, node: FakeNode(calls, address))  # type: ignore[arg-type]
    assert sorted(calls) == [("n1:1", ["id-1", "id-3"]), ("n2:1", ["id-2"])]
    assert [(e.view.name, e.sample.pids) for e in entries] == [
        ("c1", 1), ("c2", 2), ("c3", 3), ("c4", 0), ("c5", 0)
    ]  # fmt: skip
    assert [e.view.name for e in entries if e.error] == ["c4"]
    assert entries[3].error == "node n3 of container c4 is not ready"


async def test_named_containers_in_the_order_asked_and_a_missing_one_is_not_found() -> None:
    calls: list[tuple[str, list[str]]] = []
    core = FakeCore([view(1, "n1"), view(2, "n1")], down=set())
    entries = await sample_stats(core, ["c2", "c1", "c2"], lambda a, n: FakeNode(calls, a))  # type: ignore[arg-type]
    assert [e.view.name for e in entries] == ["c2", "c1", "c2"]
    assert calls == [("n1:1", ["id-2", "id-1"])]  # a container named twice is read once
    with pytest.raises(NotFound):
        await sample_stats(core, ["c1", "nosuch"], lambda a, n: FakeNode(calls, a))  # type: ignore[arg-type]


# The first of two readings reads the CPU counter alone (berthd.node.cgroups.read_cpu).


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a cgroup: needs root")
def test_the_cpu_counter_alone_is_what_a_full_reading_shows() -> None:
    """A real cgroup with a busy process in it: read_cpu reads the counter read_stats reads,
    and None once the cgroup is gone."""
    path = f"/berth-test-read-cpu-{os.getpid()}"
    hierarchies = cgroups._hierarchies()
    # The controllers read_stats reads (cpuset, say, would want its cpus set before a task).
    used = ("memory", "cpuacct", "pids")
    mounts = {hierarchies.v1[name] for name in used if name in hierarchies.v1}
    mounts = mounts or ({hierarchies.v2} if hierarchies.v2 else set())
    if not mounts:
        pytest.skip("no cgroup filesystem mounted")
    for mount in mounts:
        cgroups._dir(mount, path).mkdir(exist_ok=True)
    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        procs = {cgroups._dir(mount, path) / "cgroup.procs" for mount in mounts}
        for file in procs:
            file.write_text(str(busy.pid))
        deadline = time.monotonic() + 60  # a guard only: the counter moves within a tick
        while not read_cpu(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        busy.kill()
        busy.wait()
        stats = read_stats(path)
        assert stats is not None and stats.cpu_nanos > 0
        assert read_cpu(path) == stats.cpu_nanos
    finally:
        if busy.poll() is None:
            busy.kill()
            busy.wait()
        cgroups.remove_cgroup(path)
    assert read_cpu(path) is None
