"""The container and image commands without a node: parsing, Docker's wording, rendering, errors.

A fake node stands in for NodeClient where a command needs answers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from berth.cli import container_cmds, image_cmds
from berth.cli.container_cmds import (
    binary_size,
    container_command,
    container_status,
    docker_inspect,
    parse_cpus,
    parse_restart,
    parse_size,
    parse_volume,
    ps_rows,
    run_config,
)
from berth.cli.image_cmds import PullDisplay, image_rows
from berth.cli.main import build_parser, main
from berth.cli.progress import LayerProgress
from berth.client.node import (
    ContainerInfo,
    ExecOutput,
    ImageInfo,
    LogLine,
    PullProgress,
)
from berth.client.sessions import Exited, Output
from berth.containers import ContainerConfig, MountSpec
from berth.errors import BerthClientError

from .cli_output import error_line

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ID = "4f0c2d1b9a8e" + "7" * 52
LAYER = "sha256:" + "ab12cd34ef56" + "0" * 52


@pytest.fixture(autouse=True)
def no_ambient_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the developer's own node and cluster settings out of every test."""
    monkeypatch.delenv("BERTH_NODE", raising=False)
    monkeypatch.delenv("BERTH_HOST", raising=False)
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def columns(line: str) -> list[str]:
    """A table line's cells: columns are at least three spaces apart."""
    return re.split(r" {3,}", line)


def container(**changes: Any) -> ContainerInfo:
    base = ContainerInfo(
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
        created_at=NOW - timedelta(minutes=3),
        started_at=NOW - timedelta(seconds=5),
        finished_at=None,
        command=["sh", "-c", "echo hello; sleep 1000"],
        labels={"team": "infra"},
    )
    return replace(base, **changes)


# --- a node without a server -----------------------------------------------------------------


class FakeSession:
    """A ProcessSession: records stdin; after its end, the output and exit 7."""

    def __init__(self, received: list[bytes]) -> None:
        self.received = received
        self.ended = threading.Event()
        self.exited = False

    def send(self, data: bytes) -> None:
        self.received.append(data)

    def close_stdin(self) -> None:
        self.ended.set()

    def resize(self, rows: int, columns: int) -> None:
        pass

    def __enter__(self) -> FakeSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def __iter__(self) -> Iterator[Output | Exited]:
        assert self.ended.wait(10)
        yield Output("stdout", b"".join(self.received).upper())
        yield Output("stderr", b"warning\n")
        self.exited = True
        yield Exited(7)


class FakeNode:
    """Answers like a node agent and records what was asked."""

    SERVICE = "node"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.containers: list[ContainerInfo] = []
        self.images_on_node: list[ImageInfo] = []
        self.missing_image = False
        self.log_lines: list[LogLine] = []
        self.exit_code = 0
        self.failing: dict[str, BerthClientError] = {}
        self.exec_stdin: list[bytes] = []

    def __enter__(self) -> FakeNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def _check(self, target: str) -> None:
        if target in self.failing:
            raise self.failing[target]

    def create(self, config: ContainerConfig) -> ContainerInfo:
        self.calls.append(("create", config.image, config))
        if self.missing_image:
            raise BerthClientError(f"no such image: {config.image}", "NOT_FOUND")
        return container(id=ID, state="created", started_at=None)

    def pull(self, image: str, progress: Callable[[PullProgress], None]) -> ImageInfo:
        self.calls.append(("pull", image))
        for state, current in [("Waiting", 0), ("Downloading", 512), ("Extracting", 1024)]:
            progress(PullProgress(LAYER, state, current, 1024))
        progress(PullProgress(LAYER, "Pull complete", 1024, 1024))
        self.missing_image = False
        return ImageInfo("sha256:" + "9" * 64, [f"{image}:latest"], "sha256:" + "c" * 64, [], 1024)

    def start(self, target: str) -> ContainerInfo:
        self.calls.append(("start", target))
        self._check(target)
        return container(id=target)

    def stop(self, target: str, timeout: float | None = None) -> ContainerInfo:
        self.calls.append(("stop", target, timeout))
        self._check(target)
        return container(id=target, state="exited")

    def kill(self, target: str, signal: str = "KILL") -> None:
        self.calls.append(("kill", target, signal))
        self._check(target)

    def remove(self, target: str, force: bool = False) -> None:
        self.calls.append(("remove", target, force))
        self._check(target)

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[ContainerInfo]:
        self.calls.append(("list", all, labels))
        return self.containers

    def inspect(self, target: str) -> ContainerInfo:
        self._check(target)
        return container(name=target)

    def wait(self, target: str) -> int:
        self.calls.append(("wait", target))
        self._check(target)
        return self.exit_code

    def logs(self, target: str, follow: bool = False, tail: int = 0) -> Iterator[LogLine]:
        self.calls.append(("logs", target, follow, tail))
        yield from self.log_lines

    def exec(
        self, target: str, command: list[str], stdin: Iterable[bytes] = (), env: list[str] = ()
    ) -> ExecOutput:
        self.calls.append(("exec", target, command, list(env)))
        self.exec_stdin = list(stdin)
        return ExecOutput(b"".join(self.exec_stdin).upper(), b"warning\n", 7)

    def exec_session(
        self, target: str, command: list[str], *, env: Iterable[str] = (), **options: Any
    ) -> FakeSession:
        """Upper-cases its stdin once that ends, says "warning" on stderr, exits 7."""
        self.calls.append(("exec", target, command, list(env)))
        self.exec_stdin = []
        return FakeSession(self.exec_stdin)

    def stats_many(self, targets: Iterable[str] = ()) -> list[dict[str, Any]]:
        self.calls.append(("stats_many", list(targets)))
        ids = list(targets) or [c.id for c in self.containers]
        return [
            {
                "container_id": target,
                "name": "",
                "node_id": "",
                "error": "node n2: not reachable" if target in self.failing else "",
                "cpu_nanos": 10**9,
                "cpu_percent": 12.345,
                "memory_bytes": 1_613_824,
                "memory_limit_bytes": 64 * 1024**2,
                "pids": 3,
            }
            for target in ids
        ]

    def changes(self, target: str) -> list[tuple[str, str]]:
        return [("C", "/etc"), ("A", "/etc/new.conf"), ("D", "/tmp/gone")]

    def images(self) -> list[ImageInfo]:
        return self.images_on_node

    def remove_image(self, image: str) -> list[str]:
        self._check(image)
        return ["sha256:" + "1" * 64]


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    fake = FakeNode()
    # Image commands build their client in image_cmds, container commands in container_cmds.
    monkeypatch.setattr(image_cmds, "NodeClient", lambda address: fake)
    monkeypatch.setattr(container_cmds, "NodeClient", lambda address: fake)
    monkeypatch.setenv("BERTH_NODE", "fake:1")
    return fake


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


# --- run: argument parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("512b", 512),
        ("100k", 100 * 1024),
        ("64m", 64 * 1024**2),
        ("64M", 64 * 1024**2),
        ("64mb", 64 * 1024**2),
        ("64MiB", 64 * 1024**2),
        ("1.5g", 1536 * 1024**2),
        ("2G", 2 * 1024**3),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "m", "64x", "-1m", "1.2.3m", "64 mm"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "millis"), [("0.5", 500), ("2", 2000), ("1.25", 1250), ("0.001", 1), ("0", 0)]
)
def test_parse_cpus_in_millicpus(text: str, millis: int) -> None:
    assert parse_cpus(text) == millis


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "inf", "", "0.0001"])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_cpus(text)


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("no", ("no", 0)),
        ("always", ("always", 0)),
        ("on-failure", ("on-failure", 0)),
        ("on-failure:3", ("on-failure", 3)),
    ],
)
def test_parse_restart(text: str, policy: tuple[str, int]) -> None:
    assert parse_restart(text) == policy


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("unless-stopped", "invalid restart policy"),
        ("", "invalid restart policy"),
        ("always:3", "takes no retry count"),
        ("no:1", "takes no retry count"),
        ("on-failure:x", "invalid restart retry count"),
        ("on-failure:-1", "invalid restart retry count"),
        ("on-failure:", "invalid restart retry count"),
    ],
)
def test_parse_restart_rejects(text: str, mentions: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=mentions):
        parse_restart(text)


def test_parse_volume() -> None:
    assert parse_volume("/srv/data:/data") == ("/srv/data", "/data", False)
    assert parse_volume("/srv/data:/data:ro") == ("/srv/data", "/data", True)
    assert parse_volume("cache:/var/cache:rw") == ("cache", "/var/cache", False)
    assert parse_volume("./site:/www:ro") == (os.path.abspath("./site"), "/www", True)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("/data", "expected SRC:DST"),
        (":/data", "expected SRC:DST"),
        ("/a:/b:ro:x", "expected SRC:DST"),
        ("/a:/b:rx", 'invalid mode "rx"'),
        ("/a:b", "must be absolute"),
        ("a/b:/c", "absolute or start with ./"),
    ],
)
def test_parse_volume_rejects(text: str, mentions: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=mentions):
        parse_volume(text)


def test_run_config_from_every_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text('# settings\n\nMODE=file\n  QUOTED="kept as is"\nFROM_SHELL\nUNSET_HERE\n')
    monkeypatch.setenv("FROM_SHELL", "shell")
    monkeypatch.setenv("PASSED", "yes")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    monkeypatch.delenv("ALSO_UNSET", raising=False)
    args = run_args(
        *["-d", "--name", "web", "-e", "MODE=flag", "-e", "PASSED", "-e", "ALSO_UNSET"],
        *["--env-file", str(env_file), "-m", "64m", "--cpus", "0.5", "--cpu-shares", "512"],
        *["--pids-limit", "100", "--restart", "on-failure:5", "-v", "/srv:/srv:ro"],
        *["-v", "logs:/var/log", "-w", "/app", "-u", "1000:1000", "--hostname", "h1"],
        *["--read-only", "--network", "host", "-l", "team=infra", "--entrypoint", "/bin/sh"],
        *["demo/busybox:1.35", "-c", "echo hi"],
    )
    assert args.detach
    assert args.image == "demo/busybox:1.35"
    assert run_config(args) == ContainerConfig(
        image="demo/busybox:1.35",
        name="web",
        entrypoint=["/bin/sh"],
        command=["-c", "echo hi"],
        # the file first, so -e wins; KEY alone takes this shell's value or is dropped
        env=["MODE=file", 'QUOTED="kept as is"', "FROM_SHELL=shell", "MODE=flag", "PASSED=yes"],
        working_dir="/app",
        user="1000:1000",
        hostname="h1",
        labels={"team": "infra"},
        mounts=[MountSpec("/srv", "/srv", True), MountSpec("logs", "/var/log", False)],
        read_only_rootfs=True,
        memory_bytes=64 * 1024**2,
        cpu_millis=500,
        cpu_shares=512,
        pids_limit=100,
        restart_policy="on-failure",
        restart_max_retries=5,
        network_mode="host",
    )


def test_run_defaults_and_a_command_with_its_own_options() -> None:
    args = run_args("busybox", "ls", "-l", "--rm")
    assert (args.detach, args.rm, args.command) == (False, False, ["ls", "-l", "--rm"])
    assert run_config(args) == ContainerConfig("busybox", command=["ls", "-l", "--rm"])


def test_run_network_aliases_are_repeatable() -> None:
    args = run_args("--network", "front", "--network-alias", "db", "--network-alias", "store", "pg")
    assert run_config(args).network_aliases == ["db", "store"]


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["-m", "5x", "busybox"], "argument -m/--memory: invalid size"),
        (["--cpus", "half", "busybox"], "invalid number of CPUs"),
        (["--restart", "always:2", "busybox"], "takes no retry count"),
        (["--restart", "sometimes", "busybox"], "invalid restart policy"),
        (["-v", "/only", "busybox"], "expected SRC:DST"),
        (["--network", "bridge", "busybox"], 'unsupported network mode "bridge"'),
        (["--network", "a/b", "busybox"], 'unsupported network mode "a/b"'),
        (["--network-alias", "db", "busybox"], "aliases are supported only for containers on"),
        (["--network", "n", "--network-alias", "a b", "busybox"], 'invalid network alias "a b"'),
        (["-w", "relative", "busybox"], "must be absolute"),
        (["-e", "=x", "busybox"], "invalid environment variable"),
        (["--pids-limit", "-1", "busybox"], "expected a number of 0 or more"),
        (["--rm", "--restart", "always", "busybox"], "conflicting options: --restart and --rm"),
        (["--rm", "-d", "busybox"], "--rm needs an attached run"),
        (["--env-file", "/nonexistent/app.env", "busybox"], "/nonexistent/app.env"),
        # The container model's own checks, in the words the node and the cluster use.
        (["-m", "1m", "busybox"], "memory limit 1048576 bytes is too small: the minimum is 6 MiB"),
        (["--cpus", "0.005", "busybox"], "cpu_millis 5 is out of range"),
        (["--hostname", "under_score", "busybox"], 'invalid hostname "under_score"'),
        (["--name", "a", "busybox"], 'invalid container name "a"'),
        (["-u", "a:b:c", "busybox"], 'invalid user "a:b:c"'),
        (["-v", "/s:/x", "-v", "/t:/x/", "busybox"], 'duplicate mount point "/x"'),
        (["--cpu-shares", "1", "busybox"], "cpu_shares 1 is out of range"),
        ([], "required: IMAGE"),
    ],
)
def test_run_mistakes_print_one_error_line_and_exit_1(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No node is configured: every one of these must fail before looking for it.
    assert main(["run", *argv]) == 1
    assert mentions in error_line(capsys)


def test_env_file_with_a_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("GOOD=1\nBAD KEY=2\n")
    assert main(["run", "--env-file", str(env_file), "busybox"]) == 1
    line = error_line(capsys)
    assert str(env_file) in line
    assert "BAD KEY=2" in line


# --- Docker's STATUS, CREATED and COMMAND ----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, "Up 5 seconds"),
        ({"started_at": NOW - timedelta(milliseconds=300)}, "Up Less than a second"),
        ({"started_at": NOW - timedelta(hours=3)}, "Up 3 hours"),
        ({"started_at": NOW - timedelta(seconds=90)}, "Up About a minute"),
        (
            {"state": "exited", "exit_code": 3, "finished_at": NOW - timedelta(minutes=2)},
            "Exited (3) 2 minutes ago",
        ),
        (
            {"state": "exited", "exit_code": 0, "finished_at": NOW - timedelta(days=3)},
            "Exited (0) 3 days ago",
        ),
        ({"state": "created", "started_at": None}, "Created"),
        # an exited container that never ran: its start failed
        ({"state": "exited", "exit_code": 127, "started_at": None}, "Created"),
        (
            {"state": "restarting", "exit_code": 1, "finished_at": NOW - timedelta(seconds=3)},
            "Restarting (1) 3 seconds ago",
        ),
    ],
)
def test_container_status(changes: dict[str, Any], status: str) -> None:
    assert container_status(container(**changes), NOW) == status


def test_container_command_is_quoted_and_cut_like_docker() -> None:
    assert container_command(container()) == '"sh -c echo hello; s…"'
    assert container_command(container(), no_trunc=True) == '"sh -c echo hello; sleep 1000"'
    assert container_command(container(command=["nginx"])) == '"nginx"'


def test_ps_rows_have_docker_columns() -> None:
    rows = ps_rows([container()], now=NOW)
    assert rows == [
        [
            ID[:12],
            "demo/busybox:1.35",
            '"sh -c echo hello; s…"',
            "3 minutes ago",
            "Up 5 seconds",
            "",
            "web",
        ]
    ]
    assert ps_rows([container()], no_trunc=True, now=NOW)[0][0] == ID


# --- ps rendering ----------------------------------------------------------------------------


def live_containers() -> list[ContainerInfo]:
    now = datetime.now(UTC)
    return [
        container(created_at=now - timedelta(minutes=2, seconds=5), started_at=now),
        container(
            id="9" * 64,
            name="job",
            image="demo/tools:2",
            state="exited",
            exit_code=3,
            created_at=now - timedelta(hours=2, minutes=1),
            started_at=now - timedelta(hours=2),
            finished_at=now - timedelta(minutes=10, seconds=5),
            command=["false"],
            labels={},
        ),
    ]


def test_ps_table(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    node.containers = live_containers()
    assert main(["ps", "-a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert columns(lines[0]) == [
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS",
        "NAMES",
    ]
    assert [line.split()[0] for line in lines[1:]] == [ID[:12], "9" * 12]
    assert "Up Less than a second" in lines[1]
    assert "2 minutes ago" in lines[1]
    assert lines[1].endswith("   web")
    assert "Exited (3) 10 minutes ago" in lines[2]
    assert '"false"' in lines[2]
    assert lines[2].endswith("   job")
    # Columns line up: each header starts where its values start.
    status = lines[0].index("STATUS")
    assert lines[1][status:].startswith("Up ")
    assert lines[2][status:].startswith("Exited ")
    assert node.calls == [("list", True, {})]


def test_ps_json(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    node.containers = live_containers()
    assert main(["ps", "-a", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in data] == [ID, "9" * 64]
    assert data[1]["status"] == "Exited (3) 10 minutes ago"
    assert data[1]["state"] == "exited"
    assert data[1]["exit_code"] == 3
    assert data[0]["labels"] == {"team": "infra"}
    assert data[0]["command"] == ["sh", "-c", "echo hello; sleep 1000"]
    assert data[0]["created_at"].endswith("Z")


def test_ps_quiet_and_filters(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    node.containers = live_containers()
    assert main(["ps", "-q", "--filter", "label=team=infra"]) == 0
    assert capsys.readouterr().out == ID[:12] + "\n"
    assert node.calls[-1] == ("list", False, {"team": "infra"})
    # a status filter lists stopped containers without -a, as Docker does
    assert main(["ps", "-q", "--no-trunc", "-f", "status=exited", "-f", "name=jo"]) == 0
    assert capsys.readouterr().out == "9" * 64 + "\n"
    assert node.calls[-1] == ("list", True, {})
    assert main(["ps", "-q", "-f", "label=team"]) == 0
    assert capsys.readouterr().out == ID[:12] + "\n"


def test_ps_empty_prints_only_the_header(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ps"]) == 0
    headers = capsys.readouterr().out.splitlines()
    assert [columns(line) for line in headers] == [
        ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    ]


@pytest.mark.parametrize("text", ["label", "label=", "color=red", "status=paused"])
def test_ps_rejects_bad_filters(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps", "--filter", text]) == 1
    assert "invalid" in error_line(capsys)


# --- run against a fake node -----------------------------------------------------------------


def test_run_pulls_a_missing_image_then_streams_output_and_exits_with_its_code(
    node: FakeNode, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    node.missing_image = True
    node.exit_code = 3
    t = datetime.now(UTC)
    node.log_lines = [
        LogLine(t, "stdout", b"hello\n"),
        LogLine(t, "stderr", b"oops\n"),
        LogLine(t, "stdout", b"\x00\xffraw"),
    ]
    assert main(["run", "--rm", "-e", "A=1", "busybox", "sh", "-c", "exit 3"]) == 3
    captured = capsysbinary.readouterr()
    assert captured.out == b"hello\n\x00\xffraw"  # the container's bytes, nothing else
    err = captured.err.decode()
    assert err.splitlines() == [
        "Unable to find image 'busybox:latest' locally",
        "latest: Pulling from busybox",
        "ab12cd34ef56: Pull complete",
        "Digest: sha256:" + "9" * 64,
        "Status: Downloaded newer image for busybox:latest",
        "oops",
    ]
    assert [c[0] for c in node.calls] == [
        "create",
        "pull",
        "create",
        "start",
        "logs",
        "wait",
        "remove",
    ]
    assert node.calls[-3] == ("logs", ID, True, 0)
    assert node.calls[-1] == ("remove", ID, False)


def test_run_detached_prints_the_full_id(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "-d", "--name", "web", "busybox"]) == 0
    assert capsys.readouterr().out == ID + "\n"
    assert [c[0] for c in node.calls] == ["create", "start"]
    assert node.calls[0][2].name == "web"


def test_run_rm_removes_a_container_that_failed_to_start(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    node.failing[ID] = BerthClientError("exec: nosuch: not found", "FAILED_PRECONDITION")
    assert main(["run", "--rm", "busybox", "nosuch"]) == 125  # Docker's: run itself failed
    assert error_line(capsys) == "Error: exec: nosuch: not found"
    assert node.calls[-1] == ("remove", ID, True)


def test_pull_display_on_a_terminal_shows_each_state() -> None:
    """The live lines take every event without printing anything but the final states."""
    out = Console(file=io.StringIO(), force_terminal=True, width=120)
    with LayerProgress(out, "Downloading") as display:
        progress = PullDisplay(display)
        for state in ["Waiting", "Downloading", "Verifying Checksum", "Extracting"]:
            progress(PullProgress(LAYER, state, 10, 20))
        progress(PullProgress(LAYER, "Pull complete", 20, 20))
        progress(PullProgress("sha256:" + "e" * 64, "Already exists", 0, 0))
    assert progress.fetched
    text = out.file.getvalue()
    assert "ab12cd34ef56: Pull complete" in text
    assert "eeeeeeeeeeee: Already exists" in text


def test_pull_of_a_present_image_is_up_to_date(
    node: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def present(image: str, progress: Callable[[PullProgress], None]) -> ImageInfo:
        progress(PullProgress(LAYER, "Already exists", 0, 0))
        return ImageInfo("sha256:" + "9" * 64, [image], "sha256:" + "c" * 64, [], 1)

    monkeypatch.setattr(node, "pull", present)
    assert main(["pull", "demo/busybox:1.35"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "1.35: Pulling from demo/busybox",
        "ab12cd34ef56: Already exists",
        "Digest: sha256:" + "9" * 64,
        "Status: Image is up to date for demo/busybox:1.35",
    ]
    assert main(["pull", "demo/busybox"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "Using default tag: latest",
        "latest: Pulling from demo/busybox",
    ]


# --- the other commands against a fake node --------------------------------------------------


def test_images_table_and_json(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    node.images_on_node = [
        ImageInfo("sha256:" + "1" * 64, ["demo/busybox:1.35", "demo/busybox:latest"],
                  "sha256:" + "c0ffee" * 10 + "0000", [], 2_157_000),
        ImageInfo("sha256:" + "2" * 64, [], "sha256:" + "f" * 64, [], 528),
    ]  # fmt: skip
    assert main(["images"]) == 0
    assert [line.split() for line in capsys.readouterr().out.splitlines()] == [
        ["REPOSITORY", "TAG", "IMAGE", "ID", "SIZE"],
        ["<none>", "<none>", "ffffffffffff", "528B"],
        ["demo/busybox", "1.35", "c0ffeec0ffee", "2.16MB"],
        ["demo/busybox", "latest", "c0ffeec0ffee", "2.16MB"],
    ]
    assert main(["images", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["references"][0] == "demo/busybox:1.35"


def test_image_rows_one_per_reference() -> None:
    info = ImageInfo("sha256:" + "1" * 64, ["a/b.c:v1", "Odd:x"], "sha256:" + "a" * 64, [], 1000)
    assert image_rows([info]) == [
        ["Odd:x", "<none>", "a" * 12, "1kB"],  # not the registry's grammar: shown, not fatal
        ["a/b.c", "v1", "a" * 12, "1kB"],
    ]


def test_rmi(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rmi", "busybox"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Untagged: busybox:latest",
        "Deleted: sha256:" + "1" * 64,
    ]


def test_stop_kill_rm_start_echo_each_container(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stop", "-t", "0", "a", "b"]) == 0
    assert main(["kill", "-s", "HUP", "a"]) == 0
    assert main(["rm", "-f", "a"]) == 0
    assert main(["start", "a"]) == 0
    assert main(["stop", "a"]) == 0
    assert capsys.readouterr().out.splitlines() == ["a", "b", "a", "a", "a", "a"]
    assert node.calls == [
        ("stop", "a", 0),  # -t 0: killed at once, as in Docker
        ("stop", "b", 0),
        ("kill", "a", "HUP"),
        ("remove", "a", True),
        ("start", "a"),
        ("stop", "a", None),  # no -t: the node's default grace
    ]


def test_one_bad_container_of_several_still_does_the_rest(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    node.failing["x"] = BerthClientError("no such container: x", "NOT_FOUND")
    node.failing["y"] = BerthClientError("no such container: y", "NOT_FOUND")
    assert main(["rm", "x", "a", "y"]) == 1
    line = error_line(capsys, out="a\n")
    assert line == "Error: no such container: x; no such container: y"


def test_wait_prints_exit_codes(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    node.exit_code = 137
    assert main(["wait", "a", "b"]) == 0
    assert capsys.readouterr().out == "137\n137\n"


def test_inspect_has_docker_shape(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "web"]) == 0
    [data] = json.loads(capsys.readouterr().out)
    assert data["Id"] == ID
    assert data["Name"] == "/web"
    assert data["Path"] == "sh"
    assert data["Args"] == ["-c", "echo hello; sleep 1000"]
    assert data["State"]["Status"] == "running"
    assert data["State"]["Running"] is True
    assert data["State"]["Pid"] == 4242
    assert data["State"]["FinishedAt"] == "0001-01-01T00:00:00Z"
    assert data["Config"]["Labels"] == {"team": "infra"}


def test_inspect_prints_what_it_found_then_the_error(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    node.failing["nope"] = BerthClientError("no such container: nope", "NOT_FOUND")
    assert main(["inspect", "web", "nope"]) == 1
    captured = capsys.readouterr()
    assert [c["Name"] for c in json.loads(captured.out)] == ["/web"]
    assert captured.err == "Error: no such container: nope\n"


def test_docker_inspect_of_an_exited_container() -> None:
    data = docker_inspect(container(state="exited", exit_code=2, finished_at=NOW, pid=0))
    assert data["State"]["Running"] is False
    assert data["State"]["ExitCode"] == 2
    assert data["State"]["FinishedAt"] == "2024-05-01T12:00:00Z"


def test_logs_streams_and_timestamps(
    node: FakeNode, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    t = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    node.log_lines = [LogLine(t, "stdout", b"out\n"), LogLine(t, "stderr", b"err\n")]
    assert main(["logs", "-t", "--tail", "5", "web"]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == b"2024-05-01T12:00:00.123456Z out\n"
    assert captured.err == b"2024-05-01T12:00:00.123456Z err\n"
    assert node.calls[-1] == ("logs", "web", False, 5)


def test_logs_tail_0_shows_no_old_lines(
    node: FakeNode, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    old = datetime.now(UTC) - timedelta(minutes=1)
    node.log_lines = [LogLine(old, "stdout", b"old\n")]
    assert main(["logs", "-f", "--tail", "0", "web"]) == 0
    assert capsysbinary.readouterr().out == b""
    assert node.calls[-1] == ("logs", "web", True, 0)
    assert main(["logs", "--tail", "all", "web"]) == 0
    assert capsysbinary.readouterr().out == b"old\n"


def test_exec_interactive_sends_stdin_and_exits_with_its_code(
    node: FakeNode, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(b"abc\n"))))
    assert main(["exec", "-i", "-e", "X=1", "web", "tr", "a-z", "A-Z"]) == 7
    captured = capsysbinary.readouterr()
    assert (captured.out, captured.err) == (b"ABC\n", b"warning\n")
    assert node.calls[-1] == ("exec", "web", ["tr", "a-z", "A-Z"], ["X=1"])
    assert main(["exec", "web", "true"]) == 7
    assert node.exec_stdin == []  # without -i the process gets no input


def test_exec_needs_a_command(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec", "web"]) == 1
    assert "needs a command" in error_line(capsys)


def test_stats_snapshot(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--no-stream", "web"]) == 0
    assert [columns(line) for line in capsys.readouterr().out.splitlines()] == [
        ["CONTAINER", "CPU %", "MEM USAGE / LIMIT", "PIDS"],
        ["web", "12.35%", "1.539MiB / 64MiB", "3"],
    ]
    node.containers = [container()]
    node.calls.clear()
    assert main(["stats", "--no-stream", "--format", "json"]) == 0
    [sample] = json.loads(capsys.readouterr().out)
    assert (sample["container"], sample["pids"]) == (ID[:12], 3)
    # Every container in one call (the server fans out), not a listing and a call each.
    assert node.calls == [("stats_many", [])]


def test_stats_of_a_container_out_of_reach_show_dashes_and_fail(
    node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    node.failing["db"] = BerthClientError("unused", "UNAVAILABLE")
    assert main(["stats", "--no-stream", "web", "db"]) == 1
    out, err = capsys.readouterr()
    assert [columns(line) for line in out.splitlines()][1:] == [
        ["web", "12.35%", "1.539MiB / 64MiB", "3"],
        ["db", "--", "-- / --", "--"],
    ]
    assert err == "Error: no stats for db: node n2: not reachable\n"


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0B"), (1023, "1023B"), (1024, "1KiB"), (1_613_824, "1.539MiB"), (8 * 1024**3, "8GiB")],
)
def test_binary_size(size: int, text: str) -> None:
    assert binary_size(size) == text


def test_diff(node: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "web"]) == 0
    assert capsys.readouterr().out == "C /etc\nA /etc/new.conf\nD /tmp/gone\n"


# --- addresses and an unreachable node -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--node", UNREACHABLE, "ps"],
        ["ps", "-a", "--node", UNREACHABLE],
        ["--node", UNREACHABLE, "images"],
        ["--node", UNREACHABLE, "run", "busybox"],
        ["--node", UNREACHABLE, "run", "-d", "busybox"],
        ["--node", UNREACHABLE, "logs", "-f", "web"],
        ["--node", UNREACHABLE, "exec", "web", "true"],
        ["--node", UNREACHABLE, "stop", "a", "b"],
        ["--node", UNREACHABLE, "inspect", "a"],
        ["--node", UNREACHABLE, "wait", "a"],
        ["--node", UNREACHABLE, "stats", "--no-stream", "a"],
        ["--node", UNREACHABLE, "diff", "a"],
        ["--node", UNREACHABLE, "rmi", "a", "b"],
    ],
)
def test_unreachable_node(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # `run` that could not create the container exits 125, as Docker's does.
    assert main(argv) == (125 if "run" in argv else 1)
    line = error_line(capsys)
    assert f"cannot reach the node at {UNREACHABLE}" in line
    assert "BERTH_NODE" in line


def test_unreachable_node_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BERTH_NODE", UNREACHABLE)
    assert main(["ps"]) == 1
    assert UNREACHABLE in error_line(capsys)


def test_images_use_the_cluster_files_image_service_not_its_node(
    no_ambient_cluster: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --node or BERTH_NODE, `images` lists the catalog, not node-1's cache."""
    no_ambient_cluster.mkdir(parents=True)
    cluster = {"services": {"node": {"address": "127.0.0.1:2"}, "image": {"address": UNREACHABLE}}}
    (no_ambient_cluster / "cluster.json").write_text(json.dumps(cluster))
    assert main(["images"]) == 1
    line = error_line(capsys)
    assert f"cannot reach the image service at {UNREACHABLE}" in line
    assert "--image-service or BERTH_IMAGE" in line


def test_unreachable_node_as_a_process_prints_exactly_one_line() -> None:
    """The whole stderr of `python -m berth`, including anything gRPC's core might log."""
    result = subprocess.run(
        [sys.executable, "-m", "berth", "--node", UNREACHABLE, "ps"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"Error: cannot reach the node at {UNREACHABLE}")


def test_no_node_configured_says_how_to_get_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps"]) == 1
    line = error_line(capsys)
    assert "--node" in line
    assert "BERTH_NODE" in line
    assert "berthd up" in line


def test_security_flags_reach_the_config_and_inspect(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    profile.write_text('{\n  "defaultAction": "SCMP_ACT_ALLOW"\n}\n')
    args = run_args(
        "--cap-add",
        "sys_admin",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges=false",
        "--security-opt",
        f"seccomp={profile}",
        "--userns",
        "host",
        "busybox",
    )
    config = run_config(args)
    assert (config.cap_add, config.cap_drop, config.userns) == (["sys_admin"], ["ALL"], "host")
    # The CLI sends the profile's JSON: the node cannot read the client's files.
    assert config.security_opt == [
        "no-new-privileges=false",
        'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}',
    ]
    assert run_config(run_args("--userns", "remap", "busybox")).userns == "remap"
    data = docker_inspect(replace(container(), cap_add=["NET_ADMIN"], userns="host"))
    assert data["HostConfig"] == {
        "CapAdd": ["NET_ADMIN"],
        "CapDrop": None,
        "SecurityOpt": None,
        "UsernsMode": "host",
        "NetworkMode": "none",
        "PortBindings": {},
    }


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--cap-add", "FLY", "busybox"], 'unknown capability "FLY"'),
        (["--security-opt", "seccomp=/no/such.json", "busybox"], "cannot read seccomp profile"),
        (["--security-opt", "label=disable", "busybox"], "unsupported security option"),
        (["--userns", "private", "busybox"], "invalid choice: 'private'"),
        (["--userns", "remap", "--network", "host", "busybox"], "cannot share the host's network"),
    ],
)
def test_security_flag_mistakes(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises((SystemExit, BerthClientError)) as failed:
        run_config(run_args(*argv))
    said = str(failed.value) + capsys.readouterr().err
    assert mentions in said
