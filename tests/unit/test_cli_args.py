"""The berth CLI without servers: parsing, durations, addresses, error lines and exit codes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from berth.cli.main import build_parser, main
from berth.cli.output import human_ago, human_size, print_error
from berth.cli.progress import docker_bar
from berth.cli.registry_cmds import parse_duration, parse_grace
from berth.client.registry import ImageReference, RegistryClient, parse_image_reference
from berth.config import default_state_dir, resolve_service_address
from berth.errors import BerthClientError

from .cli_output import error_line

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once


@pytest.fixture(autouse=True)
def no_ambient_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the developer's own registry settings out of every test."""
    monkeypatch.delenv("BERTH_REGISTRY", raising=False)
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


# --- parsing ---------------------------------------------------------------------------------


def test_search_arguments() -> None:
    args = build_parser().parse_args(
        ["search", "busy", "--label", "team=infra", "--label", "tier=a=b", "--limit", "5"]
    )
    assert (args.term, dict(args.label), args.limit, args.format) == (
        "busy",
        {"team": "infra", "tier": "a=b"},
        5,
        "table",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--registry", "h:1", "--format", "json", "registry", "ls"],
        ["registry", "ls", "--registry", "h:1", "--format", "json"],
    ],
)
def test_global_options_work_before_and_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.registry, args.format) == ("h:1", "json")


def test_registry_subcommands() -> None:
    parser = build_parser()
    assert parser.parse_args(["registry", "tags", "library/busybox"]).repository == (
        "library/busybox"
    )
    args = parser.parse_args(["registry", "set", "lib/x", "--description", "d", "--label", "k=v"])
    assert (args.description, dict(args.label), args.replace_labels) == ("d", {"k": "v"}, False)
    assert args.visibility is None
    assert parser.parse_args(["registry", "set", "lib/x", "--visibility", "public"]).visibility == (
        "public"
    )
    args = parser.parse_args(["registry", "gc", "--dry-run", "--grace", "10m"])
    assert (args.dry_run, args.grace) == (True, 600)
    assert parser.parse_args(["registry", "gc"]).grace is None
    args = parser.parse_args(["oci", "push", "./dir:v1", "lib/x:1.0"])
    assert (args.source, args.target) == ("./dir:v1", "lib/x:1.0")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("2d", 172800),
        ("90", 90),
        ("500ms", 1),  # rounded up: the protocol counts whole seconds
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "h1", "-5s", "1h 30m", "1.h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        parse_duration(text)


def test_a_grace_of_zero_means_zero_and_no_flag_the_server_default() -> None:
    assert parse_grace("0s") == 0
    parser = build_parser()
    assert parser.parse_args(["registry", "gc", "--grace", "0s"]).grace == 0
    assert parser.parse_args(["registry", "gc"]).grace is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", ImageReference("busybox")),
        ("library/busybox:1.36", ImageReference("library/busybox", "1.36")),
        ("a/b@sha256:" + "e" * 64, ImageReference("a/b", None, "sha256:" + "e" * 64)),
        ("a:1@sha256:" + "e" * 64, ImageReference("a", "1", "sha256:" + "e" * 64)),
    ],
)
def test_parse_image_reference(text: str, expected: ImageReference) -> None:
    assert parse_image_reference(text) == expected


@pytest.mark.parametrize("text", ["Busybox", "a//b", "a:-bad", "a@sha256:xyz", ""])
def test_parse_image_reference_rejects(text: str) -> None:
    with pytest.raises(BerthClientError) as info:
        parse_image_reference(text)
    assert info.value.code == "INVALID_ARGUMENT"


# --- error lines and exit codes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["search", "--limit", "x"], "--limit"),
        (["search", "--label", "novalue"], "KEY=VALUE"),
        (["registry", "gc", "--grace", "soon"], "invalid duration"),
        (["registry", "bogus"], "invalid choice"),
        (["registry"], "required"),
        (["frobnicate"], "invalid choice"),
        (["registry", "tags", "Upper/Case"], "invalid repository name"),
        (["registry", "set", "lib/x", "--registry", UNREACHABLE], "nothing to change"),
        (["registry", "set", "lib/x", "--visibility", "open"], "invalid choice: 'open'"),
        (["oci", "push", "/nonexistent/layout:v1", "lib/x"], "no OCI layout at /nonexistent"),
        (["oci", "pull", "lib/x", "dir:bad ref"], "invalid layout reference"),
    ],
)
def test_user_mistakes_print_one_error_line_and_exit_1(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    line = error_line(capsys)
    assert mentions in line


def test_usage_errors_point_at_the_help_of_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "gc", "--grace", "x"]) == 1
    assert "see 'berth registry gc --help'" in error_line(capsys)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "--help"]) == 0
    assert "gc" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--registry", UNREACHABLE, "registry", "ls"],
        ["search", "x", "--registry", UNREACHABLE],
        ["--registry", UNREACHABLE, "registry", "gc", "--dry-run"],
    ],
)
def test_unreachable_registry(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    line = error_line(capsys)
    assert f"cannot reach the registry at {UNREACHABLE}" in line
    assert "berthd up" in line


def test_unreachable_registry_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BERTH_REGISTRY", UNREACHABLE)
    assert main(["registry", "ls"]) == 1
    assert UNREACHABLE in error_line(capsys)


def test_unreachable_registry_as_a_process_prints_exactly_one_line() -> None:
    """The whole stderr of `python -m berth`, including anything gRPC's core might log."""
    result = subprocess.run(
        [sys.executable, "-m", "berth", "--registry", UNREACHABLE, "registry", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"Error: cannot reach the registry at {UNREACHABLE}")


def test_no_registry_configured_says_how_to_get_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "ls"]) == 1
    line = error_line(capsys)
    assert "--registry" in line
    assert "BERTH_REGISTRY" in line
    assert "berthd up" in line


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: RegistryClient, page_size: int = 100) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(RegistryClient, "iter_repositories", interrupted)
    assert main(["--registry", UNREACHABLE, "registry", "ls"]) == 130


def test_print_error_keeps_to_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    print_error("first\nsecond\n\tthird")
    assert capsys.readouterr().err == "Error: first second third\n"


# --- addresses -------------------------------------------------------------------------------


def write_cluster(state_dir: Path, address: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = {
        "etcd": {"endpoint": "127.0.0.1:23790"},
        "prefix": "/berth/",
        "services": {"registry": {"address": address, "metrics": "http://x", "pid": 1}},
    }
    (state_dir / "cluster.json").write_text(json.dumps(cluster))


def test_address_precedence_flag_then_env_then_cluster_file(
    no_ambient_cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cluster(no_ambient_cluster, "127.0.0.1:5050")
    assert resolve_service_address("registry", None) == "127.0.0.1:5050"
    monkeypatch.setenv("BERTH_REGISTRY", "env:1")
    assert resolve_service_address("registry", None) == "env:1"
    assert resolve_service_address("registry", "flag:2") == "flag:2"


def test_cluster_without_the_service(no_ambient_cluster: Path) -> None:
    write_cluster(no_ambient_cluster, "x:1")
    with pytest.raises(BerthClientError, match="runs no image service"):
        resolve_service_address("image", None)


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_state_dir() == tmp_path / "state"
    monkeypatch.delenv("BERTH_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "berth"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "berth"


# --- human output ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0B"), (528, "528B"), (45_600, "45.6kB"), (12_345_678, "12.3MB"), (999_999, "1MB")],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


def test_human_ago() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert human_ago(None) == "-"
    assert human_ago(now - timedelta(seconds=30), now) == "30 seconds ago"
    assert human_ago(now - timedelta(hours=3), now) == "3 hours ago"
    assert human_ago(now - timedelta(days=3), now) == "3 days ago"


def test_docker_bar() -> None:
    bar = docker_bar(50, 100)
    assert bar.startswith("[" + "=" * 25 + ">" + " " * 25 + "]")
    assert bar.endswith("50B/100B")
    assert docker_bar(5, 10, width=0) == "5B/10B"


def test_each_command_loads_only_the_module_that_registers_it() -> None:
    """MODULE_OF must name, for every top-level command, the module whose add_commands
    registers it: `berth build` builds a parser with build_cmds alone."""
    import importlib

    from berth.cli import main as cli_main

    for module in cli_main.COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        commands = parser.add_subparsers()
        importlib.import_module(f"berth.cli.{module}").add_commands(commands)
        registered = set(commands.choices)
        assert registered == {c for c, m in cli_main.MODULE_OF.items() if m == module}, module
    assert cli_main.command_word(["--host", "h:1", "--format=json", "ps", "-a"]) == "ps"
    assert cli_main.command_word(["build", "."]) == "build"
    assert cli_main.command_word(["--help"]) is None
    assert cli_main.command_word(["no-such-command"]) is None
    only_build = cli_main.build_parser(["build", "."])
    assert only_build.parse_args(["build", "."]).func is not None
    with pytest.raises(BerthClientError):  # other commands are not there: argparse refuses
        only_build.parse_args(["builder", "prune"])


def test_lines_and_tables_print_data_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """No markup, emoji codes or highlighting: a name like `a:smile:b` stays what it is (rich
    printed an emoji for it)."""
    from berth.cli.output import print_line, print_table

    print_line("x :smile: [bold]y[/bold]")
    print_table(["NAME", "CMD"], [["a:smile:b", "sh\t-c"], ["c", "[red]"]])
    assert capsys.readouterr().out == (
        "x :smile: [bold]y[/bold]\nNAME        CMD\na:smile:b   sh -c\nc           [red]\n"
    )
