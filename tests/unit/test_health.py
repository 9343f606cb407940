"""Health checks without servers: Docker's probe state machine (berthd.node.health), the model
and its merge with the image's (berth.health), the CLI's flags and STATUS, the cluster's event."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from berth.cli.cluster_cmds import event_line
from berth.cli.container_cmds import container_status, docker_inspect
from berth.cli.health_opts import add_health_options, health_check
from berth.client.cluster import event_info
from berth.client.containers import ContainerInfo, health_of
from berth.containers import ContainerConfig, InvalidContainerConfig, from_spec, to_spec
from berth.errors import BerthClientError
from berth.health import (
    HEALTHY,
    SECOND,
    STARTING,
    UNHEALTHY,
    HealthConfig,
    effective,
    from_image,
    merge,
    parse_duration,
)
from berthd.cluster.events import CONTAINER_HEALTH_STATUS, EventTracker
from berthd.cluster.service import event_message
from berthd.common.container_messages import container_status as status_message
from berthd.common.store import WatchEvent
from berthd.node.health import PROBE_FAILED, Health, HealthMonitor, ProbeResult

CHECK = HealthConfig(
    test=["CMD-SHELL", "true"], interval=SECOND, timeout=SECOND, start_period=0, retries=3
)


def probe(at: float, code: int, output: str = "") -> ProbeResult:
    return ProbeResult(at, at + 0.01, code, output)


# --- the state machine -----------------------------------------------------------------------


def test_starting_until_a_probe_passes_then_unhealthy_after_retries() -> None:
    health = Health()
    assert health.status == STARTING
    assert health.record(probe(1, 0), CHECK, started_at=0) is True
    assert (health.status, health.failing_streak) == (HEALTHY, 0)
    # Two failures are not enough with retries=3; the status does not change.
    assert health.record(probe(2, 1), CHECK, 0) is False
    assert health.record(probe(3, 1), CHECK, 0) is False
    assert (health.status, health.failing_streak) == (HEALTHY, 2)
    assert health.record(probe(4, 1), CHECK, 0) is True
    assert (health.status, health.failing_streak) == (UNHEALTHY, 3)
    # One pass makes it healthy again and resets the streak.
    assert health.record(probe(5, 0), CHECK, 0) is True
    assert (health.status, health.failing_streak) == (HEALTHY, 0)


def test_failures_in_the_start_period_do_not_count_while_starting() -> None:
    check = HealthConfig(**{**CHECK.__dict__, "start_period": 10 * SECOND, "retries": 1})
    health = Health()
    for at in (1, 5, 9):
        assert health.record(probe(100 + at, 1), check, started_at=100) is False
    assert (health.status, health.failing_streak) == (STARTING, 0)
    # After the start period a failure counts: retries=1 makes it unhealthy at once.
    assert health.record(probe(111, 1), check, started_at=100) is True
    assert health.status == UNHEALTHY
    # Inside the start period, once healthy, a failure counts (Docker's rule is for starting).
    health = Health()
    health.record(probe(101, 0), check, started_at=100)
    assert health.record(probe(102, 1), check, started_at=100) is True
    assert health.status == UNHEALTHY


def test_a_starting_container_turns_unhealthy_without_ever_passing() -> None:
    health = Health()
    for at in (1, 2):
        health.record(probe(at, 1), CHECK, 0)
    assert health.status == STARTING
    health.record(probe(3, 1), CHECK, 0)
    assert health.status == UNHEALTHY


def test_the_log_keeps_the_last_five_probes_and_round_trips() -> None:
    health = Health()
    for at in range(8):
        health.record(probe(at, at % 2, f"run {at}"), CHECK, 0)
    assert [e.output for e in health.log] == [f"run {at}" for at in range(3, 8)]
    assert Health.from_json(json.loads(json.dumps(health.to_json()))) == health
    assert Health.from_json({}) is None
    assert Health.from_json({"status": "sick"}) is None


def test_the_monitor_counts_a_timeout_and_an_exec_error_as_failures() -> None:
    async def main() -> list[ProbeResult]:
        answers: list[object] = [
            TimeoutError(),
            RuntimeError("no such container"),
            (0, b"x" * 9000),
        ]

        async def run(argv: list[str], timeout: float) -> tuple[int, bytes]:
            assert argv == ["/bin/sh", "-c", "true"] and timeout == 1.0
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[return-value]

        async def changed() -> None:
            pass

        check = HealthConfig(**{**CHECK.__dict__, "retries": 2})
        monitor = HealthMonitor(check, Health(), 0.0, run, changed)
        assert await monitor.probe_once() is False
        assert await monitor.probe_once() is True  # second failure in a row: unhealthy
        assert monitor.health.status == UNHEALTHY
        assert await monitor.probe_once() is True
        return monitor.health.log

    log = asyncio.run(main())
    assert [e.exit_code for e in log] == [PROBE_FAILED, PROBE_FAILED, 0]
    assert log[0].output == "Health check exceeded timeout (1s)"
    assert log[1].output == "no such container"
    assert len(log[2].output) == 4096  # Docker keeps the first 4 KiB


def test_the_monitor_timer_probes_every_interval_and_reports_changes_only() -> None:
    async def main() -> tuple[int, int]:
        probes, changes = 0, 0

        async def run(argv: list[str], timeout: float) -> tuple[int, bytes]:
            nonlocal probes
            probes += 1
            return 0, b""

        async def changed() -> None:
            nonlocal changes
            changes += 1

        check = HealthConfig(**{**CHECK.__dict__, "interval": SECOND // 100})
        monitor = HealthMonitor(check, Health(), 0.0, run, changed)
        monitor.start()
        while probes < 5:
            await asyncio.sleep(0.01)
        await monitor.stop()
        return probes, changes

    probes, changes = asyncio.run(main())
    assert probes >= 5 and changes == 1  # starting -> healthy, once


# --- the model ---------------------------------------------------------------------------------


def test_the_containers_check_overrides_the_images_field_by_field() -> None:
    image = from_image({"Test": ["CMD", "/check"], "Interval": 5 * SECOND, "Retries": 2})
    assert image == HealthConfig(["CMD", "/check"], 5 * SECOND, 0, 0, 2)
    merged = effective(HealthConfig(timeout=2 * SECOND), image)
    assert merged == HealthConfig(["CMD", "/check"], 5 * SECOND, 2 * SECOND, 0, 2)
    assert merged.argv() == ["/check"]
    # Docker's defaults: 30s, 30s, 3 retries.
    assert effective(HealthConfig(["CMD-SHELL", "curl -f x"]), None) == HealthConfig(
        ["CMD-SHELL", "curl -f x"], 30 * SECOND, 30 * SECOND, 0, 3
    )
    assert effective(HealthConfig(["NONE"]), image) is None  # --no-healthcheck
    assert effective(None, from_image({"Test": ["NONE"]})) is None  # HEALTHCHECK NONE
    assert effective(None, None) is None
    assert from_image({"Test": "nope"}) is None


def test_the_spec_round_trips_and_bad_checks_are_refused() -> None:
    config = ContainerConfig("busybox", health_check=HealthConfig(["CMD-SHELL", "true"], SECOND))
    assert from_spec(to_spec(config)).health_check == config.health_check
    assert ContainerConfig.from_json(config.to_json()) == config
    assert from_spec(to_spec(ContainerConfig("busybox"))).health_check is None
    for bad, field, words in (
        (HealthConfig(["SOMETIMES", "x"]), "health_check.test", "expected CMD, CMD-SHELL or NONE"),
        (HealthConfig(["CMD"]), "health_check.test", "command is empty"),
        (HealthConfig(["CMD", "x"], interval=1000), "health_check.interval", "less than 1ms"),
        (HealthConfig(["CMD", "x"], retries=-1), "health_check.retries", "cannot be negative"),
    ):
        with pytest.raises(InvalidContainerConfig, match=words) as caught:
            ContainerConfig("busybox", health_check=bad).validate()
        assert caught.value.field == field


def test_update_merges_flags_over_the_current_check() -> None:
    current = HealthConfig(["CMD-SHELL", "a"], 5 * SECOND, 0, 0, 2)
    assert merge(current, HealthConfig(retries=4)) == HealthConfig(
        ["CMD-SHELL", "a"], 5 * SECOND, 0, 0, 4
    )
    assert merge(current, HealthConfig(["NONE"])) == HealthConfig(["NONE"])


def test_durations_are_go_durations() -> None:
    assert parse_duration("1m30s") == 90 * SECOND
    assert parse_duration("500ms") == SECOND // 2
    assert parse_duration("0") == 0
    with pytest.raises(ValueError, match='invalid duration "5x"'):
        parse_duration("5x")


# --- the CLI ---------------------------------------------------------------------------------


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_health_options(parser)
    return parser.parse_args(argv)


def test_health_flags() -> None:
    assert health_check(flags()) is None
    assert health_check(flags("--health-cmd", "test -f /ok", "--health-interval", "2s")) == (
        HealthConfig(["CMD-SHELL", "test -f /ok"], 2 * SECOND)
    )
    assert health_check(flags("--no-healthcheck")) == HealthConfig(["NONE"])
    with pytest.raises(BerthClientError, match="--no-healthcheck conflicts with --health-"):
        health_check(flags("--no-healthcheck", "--health-retries", "2"))


def info(health: dict) -> ContainerInfo:
    started = datetime.now(UTC) - timedelta(seconds=5)
    return ContainerInfo(
        "c" * 64, "web", "busybox", "sha256:" + "a" * 64, "running", 7, 0, False, 0, "", "",
        started, started, None, ["sh"], {}, health=health,
    )  # fmt: skip


def test_ps_and_inspect_show_the_health() -> None:
    health = {"status": "healthy", "failing_streak": 0, "log": [
        {"start": 1.0, "end": 1.5, "exit_code": 0, "output": "ok\n"}
    ]}  # fmt: skip
    shown = health_of(status_message("running", health=health))
    assert shown == {
        "Status": "healthy",
        "FailingStreak": 0,
        "Log": [
            {
                "Start": "1970-01-01T00:00:01Z",
                "End": "1970-01-01T00:00:01.500000Z",
                "ExitCode": 0,
                "Output": "ok\n",
            }
        ],
    }
    assert container_status(info(shown)) == "Up 5 seconds (healthy)"
    assert container_status(info({"Status": "starting"})) == "Up 5 seconds (health: starting)"
    assert container_status(info({})) == "Up 5 seconds"
    assert docker_inspect(info(shown))["State"]["Health"] == shown
    assert "Health" not in docker_inspect(info({}))["State"]
    assert health_of(status_message("running")) == {}


def test_a_health_change_is_one_event() -> None:
    tracker = EventTracker()
    cid = "c" * 64

    def status(health: str) -> WatchEvent:
        value = {"node": "a", "name": "web", "state": "running", "started_at": 5.0}
        if health:
            value["health"] = {"status": health, "failing_streak": 0, "log": []}
        return WatchEvent("put", f"containers/{cid}/status", json.dumps(value).encode())

    assert [e.type for e in tracker.feed(status("starting"))] == ["container_started"]
    (event,) = tracker.feed(status("healthy"))
    assert (event.type, event.health_status) == (CONTAINER_HEALTH_STATUS, "healthy")
    assert tracker.feed(status("healthy")) == []  # the same status written again: no event
    (event,) = tracker.feed(status("unhealthy"))
    line = event_line(event_info(event_message(event)))
    assert f"container health_status: unhealthy {cid}" in line


# --- the cluster's controller ------------------------------------------------------------------


def test_an_unhealthy_replica_is_replaced_in_its_slot() -> None:
    from berthd.cluster.controller import REPLACE, realize, reconcile
    from berthd.cluster.core import ClusterNode, ContainerView
    from berthd.cluster.services import ServiceRecord
    from berthd.cluster.view import ClusterState
    from berthd.common.state.containers import ContainerStatus
    from berthd.common.state.nodes import NodeRecord

    record = ServiceRecord(
        id="s" * 64, name="web", template=ContainerConfig("busybox"), replicas=2, version=1
    )
    views = []
    for slot, health in ((1, "healthy"), (2, "unhealthy")):
        status = ContainerStatus(state="running", started_at=1.0, health={"status": health})
        views.append(ContainerView(record.replica(slot, "a"), status))
    node = NodeRecord("a", cpus=4, memory_bytes=1 << 30)
    found = {"a": ClusterNode(id="a", record=node, ready=True, availability="active")}
    plan = reconcile([record], views, found, 100.0)
    assert [(a.kind, a.slot, a.reason) for a in plan.actions] == [(REPLACE, 2, "unhealthy")]
    state = ClusterState(
        nodes=found,
        containers={v.id: v.desired for v in views},
        revisions={v.id: 1 for v in views},
        statuses={},
        services={record.id: record},
        allocations={},
    )
    changes = realize(plan, state, 100.0)
    assert [c.id for c in changes.removes] == [views[1].id]
    assert [(c.name, c.slot) for c in changes.adds] == [("web.2", 2)]
    # A healthy or starting replica stays; a standalone container is never replaced.
    views[1].status.health = {"status": "starting"}  # type: ignore[union-attr]
    assert reconcile([record], views, found, 100.0).actions == []
