"""The CLI through the cluster, without a server: parsing, where commands go, tables, errors.

A fake cluster stands in for ClusterClient where a command needs answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from berth.cli import cluster_cmds, container_cmds
from berth.cli.cluster_cmds import event_line, event_request, parse_event_filter, parse_scale
from berth.cli.container_cmds import parse_constraint, placement_options, ps_rows
from berth.cli.main import build_parser, main
from berth.client.cluster import (
    ClusterContainer,
    Event,
    NodeInfo,
    Placement,
    Resources,
    ServiceInfo,
    cluster_container,
    event_info,
    merge_env,
)
from berth.client.node import LogLine
from berth.cluster.v1 import cluster_pb2 as pb
from berth.config import Target, resolve_cluster_address, resolve_target
from berth.containers import ContainerConfig
from berth.errors import BerthClientError, from_rpc_error
from berth.types.v1 import container_pb2

from .cli_output import error_line, table

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once
NOW = datetime.now(UTC)
ID = "4f0c2d1b9a8e" + "7" * 52
SERVICE_ID = "5e7a" + "1" * 60


@pytest.fixture(autouse=True)
def no_ambient_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the developer's own settings out of every test."""
    for name in ("BERTH_NODE", "BERTH_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def write_cluster_file(state: Path, services: dict[str, str]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    entries = {name: {"address": address} for name, address in services.items()}
    (state / "cluster.json").write_text(json.dumps({"services": entries}))


def placed(**changes: Any) -> ClusterContainer:
    now = datetime.now(UTC)  # STATUS and CREATED are relative to the time of rendering
    base = ClusterContainer(
        id=ID,
        name="web",
        image="demo/busybox:1.35",
        image_digest="sha256:" + "d" * 64,
        state="running",
        pid=4242,
        exit_code=0,
        oom_killed=False,
        restart_count=0,
        error="",
        failure_reason="",
        created_at=now - timedelta(minutes=3),
        started_at=now - timedelta(seconds=5),
        finished_at=None,
        command=["sh", "-c", "sleep 1000"],
        labels={},
        node_id="n1",
        desired_state="running",
        service_id="",
        slot=0,
        placement=Placement(),
        scheduled_at=now - timedelta(minutes=3),
    )
    return replace(base, **changes)


def node_info(node_id: str, **changes: Any) -> NodeInfo:
    base = NodeInfo(
        id=node_id,
        address=f"10.0.0.{node_id[-1]}:23802",
        labels={"zone": "a", "disk": "ssd"},
        state="ready",
        availability="active",
        capacity=Resources(4000, 8 * 1024**3),
        allocated=Resources(500, 64 * 1024**2),
        container_count=2,
        version="0.1.0",
        runtime_version="runc 1.1.7",
    )
    return replace(base, **changes)


def service_info(**changes: Any) -> ServiceInfo:
    base = ServiceInfo(
        id=SERVICE_ID,
        name="web",
        image="demo/busybox:1.35",
        replicas=3,
        running_replicas=2,
        version=4,
        update_state="",
        update_message="",
        template=ContainerConfig("demo/busybox:1.35"),
        placement=Placement(),
        labels={},
        created_at=NOW,
        updated_at=NOW,
    )
    return replace(base, **changes)


class FakeCluster:
    """Answers like the cluster service and records what was asked."""

    SERVICE = "cluster"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.containers: list[ClusterContainer] = [placed()]
        self.pending_inspections = 0  # how many inspects still report "pending" after run
        self.pending_error = ""  # what the node says of a container it cannot create
        self.exit_code = 0
        self.log_lines: list[LogLine] = []
        self.events_to_send: list[Event] = []

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def run(self, config: ContainerConfig, placement: Placement | None) -> ClusterContainer:
        self.calls.append(("run", config.image, config, placement))
        return placed(state="pending", image=config.image, started_at=None)

    def inspect(self, target: str) -> ClusterContainer:
        self.calls.append(("inspect", target))
        if self.pending_inspections > 0:
            self.pending_inspections -= 1
            if self.pending_error:  # the node reported it cannot create it
                return placed(
                    state="create_failed",
                    started_at=None,
                    error=self.pending_error,
                    failure_reason="INVALID_SPEC",
                )
            return placed(state="pending", started_at=None)
        return placed()

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[Any]:
        self.calls.append(("list", all, labels))
        return self.containers

    def logs(self, target: str, follow: bool = False, tail: int = 0) -> Iterator[LogLine]:
        self.calls.append(("logs", target, follow, tail))
        yield from self.log_lines

    def wait(self, target: str) -> int:
        self.calls.append(("wait", target))
        return self.exit_code

    def remove(self, target: str, force: bool = False) -> None:
        self.calls.append(("remove", target, force))

    def stop(self, target: str, timeout: float | None = None) -> ClusterContainer:
        self.calls.append(("stop", target, timeout))
        return placed(state="exited")

    def nodes(self) -> list[NodeInfo]:
        return [node_info("n1"), node_info("n2", state="down", availability="drained", labels={})]

    def node(self, node_id: str) -> NodeInfo:
        self.calls.append(("node", node_id))
        return node_info(node_id)

    def drain(self, node_id: str) -> NodeInfo:
        self.calls.append(("drain", node_id))
        if node_id == "nope":
            raise BerthClientError("no such node: nope", "NOT_FOUND")
        return node_info(node_id, availability="drained")

    def create_service(
        self, *args: Any, ports: Any = (), follow: str = "", **rollouts: Any
    ) -> ServiceInfo:
        given = {k: v for k, v in rollouts.items() if v is not None}
        self.calls.append(
            (
                "create_service",
                *args,
                *([list(ports)] if ports else []),
                *([f"follow={follow}"] if follow else []),
                *([given] if given else []),
            )
        )
        return service_info()

    def rollback_service(self, service: str) -> ServiceInfo:
        self.calls.append(("rollback_service", service))
        return service_info()

    def services(self) -> list[ServiceInfo]:
        return [service_info(), service_info(id="9" * 64, name="db", update_state="paused")]

    def service_ps(self, service: str, all: bool = False) -> list[ClusterContainer]:
        self.calls.append(("service_ps", service, all))
        return [
            placed(name="web.1", service_id=SERVICE_ID, slot=1),
            placed(name="web.2", node_id="n2", service_id=SERVICE_ID, slot=2, state="pending"),
        ]

    def scale(self, service: str, replicas: int) -> ServiceInfo:
        self.calls.append(("scale", service, replicas))
        return service_info(replicas=replicas)

    def update_service(self, service: str, **changes: Any) -> ServiceInfo:
        # Port and health changes are asserted only where a test makes them.
        changes = {
            k: v
            for k, v in changes.items()
            if not k.startswith(("publish_", "health_", "update_", "rollback_", "follow"))
            or (v is not None and v != [])
        }
        self.calls.append(("update_service", service, changes))
        return service_info()

    def events(self, **request: Any) -> Iterator[Event]:
        self.calls.append(("events", request))
        yield from self.events_to_send


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    fake = FakeCluster()
    monkeypatch.setattr(container_cmds, "ClusterClient", lambda address: fake)
    monkeypatch.setattr(cluster_cmds, "ClusterClient", lambda address: fake)
    monkeypatch.setenv("BERTH_HOST", "fake:1")
    return fake


# --- argument parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "constraint"),
    [
        ("zone==a", "zone==a"),
        ("disk != hdd", "disk!=hdd"),
        ("node.id==n1", "node.id==n1"),
        ("node.labels.zone==eu-west", "node.labels.zone==eu-west"),
    ],
)
def test_parse_constraint(text: str, constraint: str) -> None:
    assert parse_constraint(text) == constraint


@pytest.mark.parametrize("text", ["zone", "zone=a", "==a", "zone==", "zone<>a", "a b==c"])
def test_parse_constraint_rejects(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--constraint", text, "busybox"]) == 1
    assert f'invalid constraint "{text}"' in error_line(capsys)


def test_run_placement_flags() -> None:
    args = build_parser().parse_args(
        [
            "run",
            "--constraint",
            "zone==a",
            "--constraint",
            "disk!=hdd",
            "--reserve-memory",
            "64m",
            "--reserve-cpus",
            "0.5",
            "-m",
            "128m",
            "busybox",
            "sh",
            "--constraint",  # after IMAGE: the container's own argument
        ]
    )
    assert placement_options(args) == Placement(["zone==a", "disk!=hdd"], 500, 64 * 1024**2)
    assert args.command == ["sh", "--constraint"]
    plain = build_parser().parse_args(["run", "busybox"])
    assert placement_options(plain) is None


@pytest.mark.parametrize(
    ("text", "scale"), [("web=3", ("web", 3)), ("web=0", ("web", 0)), ("a=b=2", ("a=b", 2))]
)
def test_parse_scale(text: str, scale: tuple[str, int]) -> None:
    assert parse_scale(text) == scale


@pytest.mark.parametrize("text", ["web", "web=", "=3", "web=-1", "web=x", "web=1.5"])
def test_parse_scale_rejects(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service", "scale", text]) == 1
    assert "use SERVICE=REPLICAS" in error_line(capsys)


def test_service_create_takes_run_flags() -> None:
    args = build_parser().parse_args(
        [
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "-e",
            "A=1",
            "-m",
            "64m",
            "--constraint",
            "zone==a",
            "busybox",
            "httpd",
            "-f",
        ]
    )
    assert (args.name, args.replicas, args.image, args.command) == (
        "web",
        3,
        "busybox",
        ["httpd", "-f"],
    )
    assert placement_options(args) == Placement(["zone==a"], 0, 0)
    assert container_cmds.container_config(args).env == ["A=1"]


def test_service_create_needs_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service", "create", "busybox"]) == 1
    assert "--name" in error_line(capsys)


def test_event_filters() -> None:
    def request(*texts: str) -> dict[str, object]:
        return event_request([parse_event_filter(t) for t in texts])

    assert request() == {"types": [], "node_id": "", "container": "", "service": ""}
    assert request("type=node")["types"] == [
        "node_joined",
        "node_lost",
        "node_availability_changed",
        "node_drain_completed",
    ]
    assert request("event=start", "event=die")["types"] == [
        "container_started",
        "container_died",
    ]
    assert request("type=service", "node=n1")["node_id"] == "n1"
    with pytest.raises(BerthClientError, match="no event matches"):
        request("type=node", "event=start")
    with pytest.raises(BerthClientError, match="only one node= filter"):
        request("node=a", "node=b")


# --- where commands go ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "node", "env", "cluster_file", "target"),
    [
        ("h:1", None, {"BERTH_NODE": "e:2"}, {}, Target("cluster", "h:1")),
        (None, "n:1", {"BERTH_HOST": "e:1"}, {}, Target("node", "n:1")),
        (None, None, {"BERTH_HOST": "e:1", "BERTH_NODE": "e:2"}, {}, Target("cluster", "e:1")),
        (None, None, {"BERTH_NODE": "e:2"}, {"cluster": "f:1"}, Target("node", "e:2")),
        (None, None, {}, {"cluster": "f:1", "node": "f:2"}, Target("cluster", "f:1")),
    ],
)
def test_resolve_target(
    host: str | None,
    node: str | None,
    env: dict[str, str],
    cluster_file: dict[str, str],
    target: Target,
    no_ambient_cluster: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if cluster_file:
        write_cluster_file(no_ambient_cluster, cluster_file)
    assert resolve_target(host, node) == target


def test_resolve_target_refuses_both_flags() -> None:
    with pytest.raises(BerthClientError, match="--host and --node are exclusive"):
        resolve_target("h:1", "n:1")


def test_a_cluster_file_without_a_cluster_never_falls_back_to_its_node(
    no_ambient_cluster: Path,
) -> None:
    # The node is used only when named: a file's node is the image commands' default, not this.
    write_cluster_file(no_ambient_cluster, {"node": "f:2"})
    with pytest.raises(BerthClientError, match="runs no cluster service"):
        resolve_target(None, None)


def test_cluster_only_commands_ignore_berth_node(
    no_ambient_cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_NODE", "e:2")
    write_cluster_file(no_ambient_cluster, {"cluster": "f:1"})
    assert resolve_cluster_address(None) == "f:1"
    monkeypatch.setenv("BERTH_HOST", "e:1")
    assert resolve_cluster_address(None) == "e:1"
    assert resolve_cluster_address("h:1") == "h:1"


def test_nothing_configured_says_how_to_get_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "ls"]) == 1
    line = error_line(capsys)
    assert "--host" in line
    assert "BERTH_HOST" in line
    assert "berthd up" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["--host", UNREACHABLE, "ps"],
        ["ps", "-a", "--host", UNREACHABLE],
        ["--host", UNREACHABLE, "run", "busybox"],
        ["--host", UNREACHABLE, "logs", "web"],
        ["--host", UNREACHABLE, "exec", "web", "true"],
        ["--host", UNREACHABLE, "stop", "a", "b"],
        ["--host", UNREACHABLE, "inspect", "a"],
        ["--host", UNREACHABLE, "stats", "--no-stream", "a"],
        ["--host", UNREACHABLE, "kill", "a"],
        ["--host", UNREACHABLE, "node", "ls"],
        ["node", "drain", "--host", UNREACHABLE, "n1"],
        ["--host", UNREACHABLE, "service", "ls"],
        ["--host", UNREACHABLE, "service", "scale", "web=2"],
        ["--host", UNREACHABLE, "service", "update", "--image", "x", "web"],
        ["--host", UNREACHABLE, "events"],
    ],
)
def test_unreachable_cluster(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # `run` that could not create the container exits 125, as Docker's does.
    assert main(argv) == (125 if "run" in argv else 1)
    line = error_line(capsys)
    assert f"cannot reach the cluster at {UNREACHABLE}" in line
    assert "--host or BERTH_HOST" in line


def test_unreachable_cluster_from_the_environment_and_the_cluster_file(
    no_ambient_cluster: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cluster_file(no_ambient_cluster, {"cluster": UNREACHABLE, "node": "127.0.0.1:2"})
    assert main(["ps"]) == 1
    assert f"cannot reach the cluster at {UNREACHABLE}" in error_line(capsys)
    monkeypatch.setenv("BERTH_HOST", "127.0.0.1:3")
    assert main(["service", "ls"]) == 1
    assert "cannot reach the cluster at 127.0.0.1:3" in error_line(capsys)


def test_node_flag_still_talks_to_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--node", UNREACHABLE, "ps"]) == 1
    assert f"cannot reach the node at {UNREACHABLE}" in error_line(capsys)
    assert main(["--node", UNREACHABLE, "--host", "h:1", "ps"]) == 1
    assert "exclusive" in error_line(capsys)


def test_placement_flags_need_the_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--node", UNREACHABLE, "run", "--constraint", "zone==a", "busybox"]) == 1
    assert "--constraint and --reserve-* place containers" in error_line(capsys)


# --- containers through the cluster -----------------------------------------------------------


def test_ps_has_a_node_column(cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.containers = [
        placed(),
        placed(id="a" * 64, name="pend", node_id="n2", state="pending", started_at=None),
    ]
    assert main(["ps", "-a"]) == 0
    assert table(capsys.readouterr().out) == [
        ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NODE", "NAMES"],
        [
            ID[:12],
            "demo/busybox:1.35",
            '"sh -c sleep 1000"',
            "3 minutes ago",
            "Up 5 seconds",
            "n1",
            "web",
        ],
        [
            "a" * 12,
            "demo/busybox:1.35",
            '"sh -c sleep 1000"',
            "3 minutes ago",
            "Pending",
            "n2",
            "pend",
        ],
    ]
    assert cluster.calls == [("list", True, {})]
    assert main(["ps", "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)[0]
    assert (first["node_id"], first["status"]) == ("n1", "Up 5 seconds")


def test_ps_rows_without_the_node_column_are_dockers() -> None:
    assert len(ps_rows([placed()])[0]) == 7
    assert ps_rows([placed()], node_column=True)[0][6] == "n1"


def test_attached_run_waits_for_the_node_then_streams_and_exits_with_the_code(
    cluster: FakeCluster,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(container_cmds.time, "sleep", lambda seconds: None)
    cluster.pending_inspections = 2
    cluster.exit_code = 3
    cluster.log_lines = [LogLine(NOW, "stdout", b"hello\n"), LogLine(NOW, "stderr", b"oops\n")]
    argv = ["run", "--rm", "--constraint", "zone==a", "--reserve-cpus", "0.5", "busybox", "sh"]
    assert main(argv) == 3
    captured = capsysbinary.readouterr()
    assert (captured.out, captured.err) == (b"hello\n", b"oops\n")
    run = cluster.calls[0]
    assert run[:2] == ("run", "busybox")
    assert run[2].command == ["sh"]
    assert run[3] == Placement(["zone==a"], 500, 0)
    # No pull: the node pulls. Polled until created, then followed, waited, removed.
    assert [c[0] for c in cluster.calls] == [
        "run",
        "inspect",
        "inspect",
        "inspect",
        "logs",
        "wait",
        "remove",
    ]


def test_detached_run_prints_the_id_without_waiting(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "-d", "--name", "web", "busybox"]) == 0
    assert capsys.readouterr().out == f"{ID}\n"
    assert [c[0] for c in cluster.calls] == ["run"]
    assert cluster.calls[0][2].name == "web"


def test_attached_run_gives_up_on_a_node_that_never_creates_it(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(container_cmds.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(container_cmds.time, "sleep", lambda seconds: None)
    cluster.pending_inspections = 1000
    assert main(["run", "--rm", "busybox"]) == 125
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("Waiting for node n1 to pull busybox:latest")
    assert err[-1].startswith("Error: node n1 has not created container web")
    assert cluster.calls[-1] == ("remove", ID, True)


def test_attached_run_fails_at_once_when_the_node_says_it_cannot_create_it(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.pending_inspections = 1000
    cluster.pending_error = "unable to find user nobody-here: no matching entries in passwd file"
    assert main(["run", "--rm", "busybox"]) == 125  # Docker's: run itself failed
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "Error: node n1 cannot create container web: unable to find user nobody-here: no "
        "matching entries in passwd file"
    ]
    assert cluster.calls[-1] == ("remove", ID, True)
    assert sum(call[0] == "inspect" for call in cluster.calls) == 1


def test_inspect_shows_the_placement(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "web"]) == 0
    [data] = json.loads(capsys.readouterr().out)
    assert data["Node"] == {"ID": "n1", "Ready": True}
    assert data["State"]["Running"] is True


def test_kill_goes_to_the_containers_node(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    killed: list[tuple[str, str, str]] = []

    class Node:
        def __init__(self, address: str) -> None:
            self.address = address

        def __enter__(self) -> Node:
            return self

        def __exit__(self, *exc_info: object) -> None:
            pass

        def kill(self, container: str, signal: str) -> None:
            killed.append((self.address, container, signal))

    monkeypatch.setattr(container_cmds, "NodeClient", Node)
    assert main(["kill", "-s", "TERM", "web"]) == 0
    assert capsys.readouterr().out == "web\n"
    assert killed == [("10.0.0.1:23802", ID, "TERM")]


# --- nodes, services, events ------------------------------------------------------------------


def test_node_ls_table_and_json(cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "ls"]) == 0
    assert table(capsys.readouterr().out) == [
        [
            "ID",
            "ADDRESS",
            "STATUS",
            "AVAILABILITY",
            "CPUS",
            "MEMORY",
            "ALLOCATED",
            "CONTAINERS",
            "LABELS",
        ],
        [
            "n1",
            "10.0.0.1:23802",
            "Ready",
            "Active",
            "4",
            "8GiB",
            "0.5 CPU / 64MiB",
            "2",
            "disk=ssd,zone=a",
        ],
        ["n2", "10.0.0.2:23802", "Down", "Drained", "4", "8GiB", "0.5 CPU / 64MiB", "2", "-"],
    ]
    assert main(["node", "ls", "--format", "json"]) == 0
    nodes = json.loads(capsys.readouterr().out)
    assert nodes[1]["state"] == "down"
    assert nodes[0]["capacity"] == {"cpu_millis": 4000, "memory_bytes": 8 * 1024**3}


def test_node_inspect(cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "inspect", "n1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Status: +Ready$", out, re.MULTILINE)
    assert re.search(r"^Runtime: +runc 1.1.7$", out, re.MULTILINE)
    assert cluster.calls == [("node", "n1")]


def test_node_drain_echoes_and_reports_the_bad_one(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "drain", "n1", "nope", "n2"]) == 1
    assert error_line(capsys, out="n1\nn2\n") == "Error: no such node: nope"


def test_service_create_ls_ps(cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["service", "create", "--name", "web", "--replicas", "3", "busybox", "httpd"]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"{SERVICE_ID}\n"
    name, template, replicas, placement = cluster.calls[0][1:]
    assert (name, replicas, placement) == ("web", 3, None)
    # Replicas are named web.1, web.2, ...: the template has no name of its own.
    assert template == ContainerConfig("busybox", command=["httpd"])

    assert main(["service", "ls"]) == 0
    assert table(capsys.readouterr().out) == [
        ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS", "UPDATE"],
        [SERVICE_ID[:12], "web", "replicated", "2/3", "demo/busybox:1.35", "-"],
        ["9" * 12, "db", "replicated", "2/3", "demo/busybox:1.35", "paused"],
    ]

    assert main(["service", "ps", "-a", "web"]) == 0
    assert table(capsys.readouterr().out) == [
        ["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"],
        [ID[:12], "web.1", "demo/busybox:1.35", "n1", "Running", "Up 5 seconds"],
        [ID[:12], "web.2", "demo/busybox:1.35", "n2", "Running", "Pending"],
    ]
    assert cluster.calls[-1] == ("service_ps", "web", True)


def test_service_scale_and_update(cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service", "scale", "web=5", "db=0"]) == 0
    assert capsys.readouterr().out == "web scaled to 5\ndb scaled to 0\n"
    assert cluster.calls == [("scale", "web", 5), ("scale", "db", 0)]
    assert main(["service", "update", "--image", "b:2", "-e", "A=1", "--env-rm", "B", "web"]) == 0
    assert capsys.readouterr().out == "web\n"
    assert cluster.calls[-1] == (
        "update_service",
        "web",
        {
            "image": "b:2",
            "env": ["A=1"],
            "env_remove": ["B"],
            "replicas": None,
            "network": None,
            "network_aliases": None,
        },
    )
    argv = ["service", "update", "--network", "front", "--network-alias", "api", "web"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "web\n"
    changed = cluster.calls[-1][2]
    assert (changed["network"], changed["network_aliases"], changed["image"]) == (
        "front",
        ["api"],
        None,
    )
    assert main(["service", "update", "web"]) == 1
    assert "nothing to update" in error_line(capsys)


def test_service_follow_flags(cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    # --follow alone follows the image's tag; semver:RANGE a range of its repository.
    assert main(["service", "create", "--name", "web", "--follow", "app:prod"]) == 1
    assert 'invalid --follow value "app:prod"' in error_line(capsys)
    assert main(["service", "create", "--name", "web", "--follow", "--", "app:prod"]) == 0
    assert cluster.calls[-1][-1] == "follow=tag"
    argv = ["service", "create", "--name", "web", "--follow", "semver:~1.4", "app"]
    assert main(argv) == 0
    assert cluster.calls[-1][-1] == "follow=semver:~1.4"
    assert main(["service", "update", "--follow", "semver:^2", "web"]) == 0
    assert cluster.calls[-1][2]["follow"] == "semver:^2"
    assert main(["service", "update", "--no-follow", "web"]) == 0
    assert cluster.calls[-1][2]["follow"] == ""


def test_events_stream_lines_and_json(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    when = datetime(2026, 11, 28, 12, 0, 0, 250000, tzinfo=UTC)
    cluster.events_to_send = [
        Event(
            "container_started",
            when,
            "",
            node_id="n1",
            container_id=ID,
            container_name="web.1",
            service_id=SERVICE_ID,
        ),
        Event("node_lost", when, "node n2 lost: lease expired", node_id="n2"),
    ]
    assert main(["events", "-f", "type=container", "-f", "type=node"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"2026-11-28T12:00:00Z container start {ID} (name=web.1, node=n1, service={SERVICE_ID})",
        "2026-11-28T12:00:00Z node lost n2",
    ]
    assert cluster.calls[-1][1]["types"][0] == "node_joined"
    assert main(["events", "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (first["type"], first["occurred_at"]) == (
        "container_started",
        "2026-11-28T12:00:00.250000Z",
    )


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            Event(
                "container_died",
                None,
                "",
                node_id="n1",
                container_id="c1",
                container_name="web",
                exit_code=137,
            ),
            "- container die c1 (exitCode=137, name=web, node=n1)",
        ),
        (
            Event(
                "container_died", None, "", node_id="n1", container_id="c1", exit_code=0
            ),  # an exit code of 0 is an exit code
            "- container die c1 (exitCode=0, node=n1)",
        ),
        (
            Event(
                "container_rescheduled",
                None,
                "",
                node_id="n3",
                container_id="c1",
                container_name="web.2",
                service_id="s1",
                previous_node_id="n2",
            ),
            "- container reschedule c1 (name=web.2, node=n3, previousNode=n2, service=s1)",
        ),
        (
            Event("service_scaled", None, "", service_id="s1", service_name="web", replicas=5),
            "- service scale s1 (name=web, replicas=5)",
        ),
        (
            Event(
                "container_create_failed",
                None,
                "",
                node_id="n1",
                container_id="c1",
                container_name="ghost",
                failure_reason="IMAGE_NOT_FOUND",
            ),
            "- container create-failed c1 (name=ghost, node=n1, reason=IMAGE_NOT_FOUND)",
        ),
        (
            Event("service_update_completed", None, "", service_id="s1", replicas=3, version=2),
            "- service update-completed s1 (replicas=3, version=2)",
        ),
    ],
)
def test_event_line(event: Event, line: str) -> None:
    assert event_line(event) == line


# --- client conversions -----------------------------------------------------------------------


def test_a_container_its_node_has_not_created_is_pending() -> None:
    message = pb.Container(
        id=ID,
        name="web",
        spec=container_pb2.ContainerSpec(image="busybox", command=["true"]),
        node_id="n1",
        desired_state=pb.DESIRED_STATE_RUNNING,
        placement=pb.Placement(request=pb.ResourceAmounts(cpu_millis=250), constraints=["zone==a"]),
    )
    message.scheduled_at.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    c = cluster_container(message)
    assert (c.state, c.node_id, c.desired_state) == ("pending", "n1", "running")
    assert c.placement == Placement(["zone==a"], 250, 0)
    assert c.created_at == datetime(2026, 1, 1, tzinfo=UTC)  # scheduled_at until created
    message.status.state = container_pb2.CONTAINER_STATE_RUNNING
    assert cluster_container(message).state == "running"


def test_merge_env() -> None:
    env = ["A=1", "B=2", "A=3", "C=4"]
    assert merge_env(env, ["A=9", "D=5"], ["C"]) == ["A=9", "B=2", "D=5"]


def test_a_container_its_node_could_not_create_says_why() -> None:
    message = pb.Container(id=ID, name="ghost", node_id="n1")
    message.status.state = container_pb2.CONTAINER_STATE_CREATE_FAILED
    message.status.failure.reason = "IMAGE_NOT_FOUND"
    message.status.failure.message = "no image test/x:1"
    c = cluster_container(message)
    assert (c.state, c.failure_reason, c.error) == (
        "create_failed",
        "IMAGE_NOT_FOUND",
        "no image test/x:1",
    )
    assert container_cmds.container_status(c) == "Create failed (IMAGE_NOT_FOUND)"


def test_a_container_on_a_node_that_is_down_is_unknown() -> None:
    message = pb.Container(id=ID, name="web", node_id="n1", node_state=pb.NODE_STATE_NOT_READY)
    message.status.state = container_pb2.CONTAINER_STATE_RUNNING
    c = cluster_container(message)
    assert not c.node_ready and c.state == "running"  # the node's last word, kept
    assert container_cmds.container_status(c) == "Unknown (node down)"
    data = container_cmds.docker_inspect(c)
    assert data["State"]["Status"] == "unknown" and not data["State"]["Running"]
    assert data["Node"] == {"ID": "n1", "Ready": False}
    message.node_state = pb.NODE_STATE_READY
    assert container_cmds.container_status(cluster_container(message)).startswith("Up")


def test_events_are_read_from_their_payload() -> None:
    died = pb.EventsResponse(
        type=pb.EVENT_TYPE_CONTAINER_DIED,
        message="web died (0)",
        container=pb.ContainerEvent(
            container_id="c1", name="web", node_id="n1", exit=container_pb2.ProcessExit()
        ),
    )
    event = event_info(died)
    assert (event.type, event.container_name, event.node_id, event.exit_code) == (
        "container_died",
        "web",
        "n1",
        0,  # unset means unset: an exit code of 0 is explicit
    )
    started = pb.EventsResponse(
        type=pb.EVENT_TYPE_CONTAINER_STARTED, container=pb.ContainerEvent(container_id="c1")
    )
    assert event_info(started).exit_code is None
    updated = pb.EventsResponse(
        type=pb.EVENT_TYPE_SERVICE_UPDATE_COMPLETED,
        service=pb.ServiceEvent(service_id="s1", name="web", replicas=3, version=2),
    )
    assert (event_info(updated).service_name, event_info(updated).version) == ("web", 2)
    drained = pb.EventsResponse(
        type=pb.EVENT_TYPE_NODE_AVAILABILITY_CHANGED,
        node=pb.NodeEvent(node_id="n2", availability=pb.NODE_AVAILABILITY_DRAINED),
    )
    assert (event_info(drained).node_id, event_info(drained).availability) == ("n2", "drained")


class _RpcError(grpc.RpcError, grpc.Call):
    """A failed call as grpc raises it, with a chosen status and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> None:
        return None

    def trailing_metadata(self) -> None:
        return None

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def test_unavailable_from_the_server_is_not_an_unreachable_server() -> None:
    relayed = "node n1 did not report the start of container web within 30s"
    err = from_rpc_error(
        _RpcError(grpc.StatusCode.UNAVAILABLE, relayed), address="h:1", service="cluster"
    )
    assert (err.message, err.code) == (relayed, "UNAVAILABLE")
    refused = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:h:1: Connection refused"
    )
    err = from_rpc_error(
        _RpcError(grpc.StatusCode.UNAVAILABLE, refused),
        address="h:1",
        service="cluster",
        option="--host or BERTH_HOST",
    )
    assert err.message.startswith("cannot reach the cluster at h:1 (Connection refused)")
    assert err.message.endswith("point --host or BERTH_HOST at a running one")


def test_service_update_rollout_flags_and_rollback(
    cluster: FakeCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from berth.rollout import RolloutChanges

    argv = ["service", "update", "--update-parallelism", "2", "--update-delay", "5s"]
    argv += ["--update-failure-action", "rollback", "--update-max-failure-ratio", "0.25"]
    assert main([*argv, "--rollback-monitor", "1s", "web"]) == 0
    assert capsys.readouterr().out == "web\n"
    _, _, changes = cluster.calls[-1]
    assert changes["update_config"] == RolloutChanges(
        parallelism=2, delay_ns=5_000_000_000, failure_action="rollback", max_failure_ratio=0.25
    )
    assert changes["rollback_config"] == RolloutChanges(monitor_ns=1_000_000_000)
    # Only flags, no spec change: still an update. Docker's 0 (all at once) is refused.
    assert main(["service", "update", "--update-parallelism", "0", "web"]) == 1
    assert "--update-parallelism must be at least 1" in capsys.readouterr().err
    # A rollback cannot roll back (Docker's choices).
    assert main(["service", "update", "--rollback-failure-action", "rollback", "web"]) != 0
    assert "invalid choice: 'rollback'" in capsys.readouterr().err
    assert main(["service", "rollback", "web"]) == 0
    assert capsys.readouterr().out == "web\nrollback: manually requested rollback\n"
    assert cluster.calls[-1] == ("rollback_service", "web")
