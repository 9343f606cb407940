"""The builder's RUN steps against fake cluster and node APIs: output lines, exit codes,
layers, and the container removed whatever happens (a cancelled build included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from berth.client.containers import LogLine
from berth.containers import ContainerConfig
from berth.error_details import Violation
from berthd.builder.reaper import orphans
from berthd.builder.runner import BUILD_LABEL, BUILDER_LABEL, RunFailed, Runner, RunSpec
from berthd.common.errors import FailedPrecondition, NotFound, Unavailable

SPEC = RunSpec(
    step=5,
    line=3,
    instruction="RUN make",
    image="berth/build-cache@sha256:" + "a" * 64,
    argv=["/bin/sh", "-c", "make"],
    env=["A=1"],
    working_dir="/src",
    user="nobody",
    build_id="b1",
    name="build-b1-2",
)


class FakeCluster:
    def __init__(
        self,
        chunks: list[bytes | tuple[str, bytes]],
        exit_code: int = 0,
        states: tuple[str, ...] = ("running",),
    ) -> None:
        self.chunks = chunks  # bytes on stdout, or (stream, bytes)
        self.exit_code = exit_code
        self.states = list(states)
        self.ran: list[ContainerConfig] = []
        self.removed: list[tuple[str, bool]] = []
        self.following = asyncio.Event()
        self.block_logs = False
        self.remove_error: Exception | None = None

    async def run(self, config: ContainerConfig) -> Any:
        self.ran.append(config)
        return SimpleNamespace(id="c1")

    async def inspect(self, container: str) -> Any:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return SimpleNamespace(state=state, error="", failure_reason="", node_id="n1")

    async def logs(self, container: str, follow: bool = False) -> AsyncIterator[LogLine]:
        assert follow
        self.following.set()
        for chunk in self.chunks:
            stream, data = chunk if isinstance(chunk, tuple) else ("stdout", chunk)
            yield LogLine(datetime.now(UTC), stream, data)
        if self.block_logs:
            await asyncio.Event().wait()

    async def wait(self, container: str) -> int:
        return self.exit_code

    async def node(self, node_id: str) -> Any:
        return SimpleNamespace(address=f"{node_id}:1")

    async def remove(self, container: str, force: bool = False) -> None:
        await asyncio.sleep(0)
        if self.remove_error is not None:
            raise self.remove_error
        self.removed.append((container, force))


class FakeNode:
    def __init__(self, address: str, changes: bool) -> None:
        self.address = address
        self.changes = changes
        self.exported: list[tuple[str, str]] = []

    async def has_changes(self, container: str) -> bool:
        return self.changes

    async def export_layer(self, container: str, repository: str) -> tuple[str, str, int]:
        self.exported.append((container, repository))
        return "sha256:" + "b" * 64, "sha256:" + "c" * 64, 42


def runner(cluster: FakeCluster, changes: bool = True) -> tuple[Runner, list[FakeNode]]:
    nodes: list[FakeNode] = []

    def node_api(address: str) -> Any:
        nodes.append(FakeNode(address, changes))
        return nodes[-1]

    return Runner(cluster, "berth/build-cache", node_api=node_api), nodes  # type: ignore[arg-type]


def ignore(stream: str, data: bytes) -> None:
    pass


async def test_a_step_streams_its_lines_and_exports_its_layer() -> None:
    chunks: list[bytes | tuple[str, bytes]] = [
        b"one\ntw",
        ("stderr", b"err "),
        b"o\n",
        ("stderr", b"line\n\n"),
        b"last",
    ]
    cluster = FakeCluster(chunks, states=("pending", "created", "exited"))
    run, nodes = runner(cluster)
    lines: list[tuple[str, bytes]] = []
    result = await run.run(SPEC, lambda stream, data: lines.append((stream, data)))
    # Whole lines with their newline, each stream on its own; the unfinished last one as is.
    assert lines == [
        ("stdout", b"one\n"),
        ("stdout", b"two\n"),
        ("stderr", b"err line\n"),
        ("stderr", b"\n"),
        ("stdout", b"last"),
    ]
    assert result.layer is not None and result.layer.size == 42
    assert result.diff_id == "sha256:" + "c" * 64
    config = cluster.ran[0]
    assert config.image == SPEC.image and config.entrypoint == SPEC.argv
    assert config.labels == {BUILD_LABEL: "b1"} and config.network_mode == "none"
    assert [n.address for n in nodes] == ["n1:1"]
    assert nodes[0].exported == [("c1", "berth/build-cache")]
    assert cluster.removed == [("c1", True)]


async def test_a_step_that_changed_nothing_adds_no_layer() -> None:
    cluster = FakeCluster([])
    run, nodes = runner(cluster, changes=False)
    result = await run.run(SPEC, ignore)
    assert result.layer is None and nodes[0].exported == []
    assert cluster.removed == [("c1", True)]


async def test_a_failing_step_raises_its_exit_code_and_removes_its_container() -> None:
    cluster = FakeCluster([b"oops\n"], exit_code=2)
    run, _ = runner(cluster)
    with pytest.raises(RunFailed) as failed:
        await run.run(SPEC, ignore)
    assert failed.value.exit_code == 2
    assert str(failed.value).startswith("Dockerfile:3: RUN make: process")
    assert failed.value.reason == "RUN_FAILED"
    assert failed.value.details.metadata == {"step": "5", "line": "3", "exit_code": "2"}
    assert cluster.removed == [("c1", True)]


async def test_a_container_that_cannot_start_fails_the_step() -> None:
    cluster = FakeCluster([])

    async def inspect(container: str) -> Any:
        return SimpleNamespace(
            state="pending", error="no such user", failure_reason="CREATE_FAILED", node_id="n1"
        )

    cluster.inspect = inspect  # type: ignore[method-assign]
    run, _ = runner(cluster)
    with pytest.raises(FailedPrecondition, match="node n1 cannot run the step: no such user") as e:
        await run.run(SPEC, ignore)
    assert e.value.reason == "RUN_NOT_STARTED"
    assert e.value.details.metadata == {"step": "5", "line": "3", "node_id": "n1"}
    assert cluster.removed == [("c1", True)]


PULL_FAILED = "cannot pull berth/build-cache: cannot reach the registry at r:1 (Connection refused)"


async def test_a_node_that_cannot_pull_for_a_moment_delays_the_step_and_does_not_fail_it() -> None:
    cluster = FakeCluster([b"done\n"])
    reports = [("pending", PULL_FAILED, "IMAGE_PULL_FAILED")] * 3 + [("running", "", "")]

    async def inspect(container: str) -> Any:
        state, error, reason = reports.pop(0) if len(reports) > 1 else reports[0]
        return SimpleNamespace(state=state, error=error, failure_reason=reason, node_id="n1")

    cluster.inspect = inspect  # type: ignore[method-assign]
    run, _ = runner(cluster)
    lines: list[tuple[str, bytes]] = []
    await run.run(SPEC, lambda stream, data: lines.append((stream, data)))
    assert lines == [("stdout", b"done\n")] and reports == [("running", "", "")]


async def test_a_pull_that_keeps_failing_ends_the_step_unavailable_with_the_nodes_reason() -> None:
    cluster = FakeCluster([])

    async def inspect(container: str) -> Any:
        return SimpleNamespace(
            state="pending", error=PULL_FAILED, failure_reason="IMAGE_PULL_FAILED", node_id="n1"
        )

    cluster.inspect = inspect  # type: ignore[method-assign]
    run, _ = runner(cluster)
    run.start_timeout = 0.05
    with pytest.raises(
        Unavailable, match=r"did not start within 0\.05s on node n1: cannot pull"
    ) as e:
        await run.run(SPEC, ignore)
    assert e.value.reason == "RUN_START_TIMEOUT"
    assert cluster.removed == [("c1", True)]


async def test_no_node_for_the_step_is_no_node_with_the_schedulers_reasons() -> None:
    cluster = FakeCluster([])
    violation = Violation("NODE_UNSUITABLE", "node/n1", "insufficient memory")

    async def refuse(config: ContainerConfig) -> Any:
        raise FailedPrecondition("0/1 nodes are available", violations=[violation])

    cluster.run = refuse  # type: ignore[method-assign]
    run, _ = runner(cluster)
    with pytest.raises(FailedPrecondition, match="0/1 nodes are available") as e:
        await run.run(SPEC, ignore)
    assert e.value.reason == "NO_NODE"
    assert e.value.details.metadata == {
        "step": "5",
        "line": "3",
        "cause": "FAILED_PRECONDITION",
    }
    assert e.value.details.violations == (violation,)
    assert cluster.removed == []


async def test_a_cancelled_step_still_removes_its_container() -> None:
    cluster = FakeCluster([b"working\n"])
    cluster.block_logs = True
    run, _ = runner(cluster)
    task = asyncio.create_task(run.run(SPEC, ignore))
    await cluster.following.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):
        await asyncio.sleep(0)
    assert cluster.removed == [("c1", True)]


async def test_a_failed_removal_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    cluster = FakeCluster([])
    cluster.remove_error = NotFound("no such container")
    run, _ = runner(cluster, changes=False)
    assert (await run.run(SPEC, ignore)).layer is None
    assert "cannot remove build container c1" in caplog.text


async def test_step_containers_carry_their_build_and_builder_instance() -> None:
    cluster = FakeCluster([b"ok\n"])
    run = Runner(
        cluster,  # type: ignore[arg-type]
        "berth/build-cache",
        instance="vm-1",
        node_api=lambda address: FakeNode(address, True),  # type: ignore[arg-type]
    )
    await run.run(SPEC, ignore)
    assert cluster.ran[0].labels == {BUILD_LABEL: "b1", BUILDER_LABEL: "vm-1"}


def step(name: str, labels: dict[str, str]) -> Any:
    return SimpleNamespace(id=name, name=name, labels=labels)


def test_orphans_are_step_containers_no_running_build_owns() -> None:
    listed = [
        step("build-b1-2", {BUILD_LABEL: "b1", BUILDER_LABEL: "me"}),  # running here
        step("build-b2-2", {BUILD_LABEL: "b2", BUILDER_LABEL: "me"}),  # ended here
        step("build-b3-2", {BUILD_LABEL: "b3", BUILDER_LABEL: "other"}),  # a live builder's
        step("build-b4-2", {BUILD_LABEL: "b4", BUILDER_LABEL: "dead"}),  # a dead builder's
        step("build-b5-2", {BUILD_LABEL: "b5"}),  # made before builders labelled theirs
        step("build-me", {}),  # somebody's container named like a step's
    ]
    found = orphans(listed, "me", running={"b1"}, live={"me", "other"})
    assert [c.name for c in found] == ["build-b2-2", "build-b4-2", "build-b5-2"]
