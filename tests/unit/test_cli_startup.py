"""What the `berth` CLI imports before it does anything (issue 14's stats goal, issue 18 "Fast").

A command that calls no server (`--help`, `--version`, a mistyped command) imports no grpc,
protobuf, generated stub, client, command module, rich or importlib.metadata; a command imports
its own module and client only. Each case runs in a fresh interpreter and is judged by what it
imported, never by how long that took.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import berth
from berth.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]

# What no command that stays on this machine may import: each is tens of milliseconds.
HEAVY_PREFIXES = ("grpc", "google.protobuf", "google.rpc", "rich", "asyncio", "berth.client")
HEAVY_EXACT = {"importlib.metadata", "dataclasses", "uuid"}


# What the `berth` console script runs, then the modules loaded by the end (sys.modules: -X
# importtime misses those importlib.import_module loads).
ENTRY = """import sys
from berth.cli.main import main
main(sys.argv[1:])
print("MODULES", *sys.modules, file=sys.stderr)
"""


def imported(argv: list[str], tmp_path: Path) -> set[str]:
    """The modules `berth ARGV` imports, run against an empty state directory (no cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env["BERTH_STATE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("MODULES ")]
    assert len(lines) == 1, done.stderr
    return set(lines[0].split()[1:])


def heavy(modules: set[str]) -> set[str]:
    return {
        name
        for name in modules
        if name.startswith(HEAVY_PREFIXES)
        or name in HEAVY_EXACT
        or name.endswith(("_pb2", "_pb2_grpc"))
        or (name.startswith("berth.cli.") and name.endswith("_cmds"))
    }


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], [], ["no-such-command"], ["--no-such-option"]],
    ids=["help", "version", "no-command", "unknown-command", "unknown-option"],
)
def test_a_command_that_calls_no_server_imports_nothing_heavy(
    argv: list[str], tmp_path: Path
) -> None:
    assert heavy(imported(argv, tmp_path)) == set()


CLIENTS = {
    "cluster",
    "node",
    "image",
    "registry",
    "builder",
    "secrets",
    "access",
    "join",
    "webhooks",
}


@pytest.mark.parametrize(
    ("argv", "modules", "clients"),
    [
        (["stats", "--no-stream"], {"container_cmds"}, {"cluster"}),
        (["ps"], {"container_cmds"}, {"cluster"}),
        (["images"], {"image_cmds"}, {"image", "node", "registry"}),
        (["node", "ls"], {"cluster_cmds", "container_cmds"}, {"cluster", "join"}),
        (["secret", "ls"], {"secret_cmds"}, {"secrets"}),
        # The webhook subcommands' parser, not their client.
        (["registry", "ls"], {"registry_cmds", "webhook_cmds"}, {"registry"}),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_a_command_imports_its_own_module_and_clients_only(
    argv: list[str], modules: set[str], clients: set[str], tmp_path: Path
) -> None:
    """A command (it fails here: no cluster) loads its module and its clients, no other command
    module or client, and neither rich (plain tables) nor uuid (only a run's request id)."""
    loaded = imported(argv, tmp_path)
    assert {name for name in loaded if name.startswith(("rich", "importlib.metadata"))} == set()
    assert "uuid" not in loaded
    if modules == {"container_cmds"}:  # a container's whole configuration only for run/create
        assert "berth.containers" not in loaded
    assert {
        name.removeprefix("berth.cli.")
        for name in loaded
        if name.startswith("berth.cli.") and name.endswith("_cmds")
    } == modules
    assert {name.removeprefix("berth.client.") for name in loaded} & CLIENTS == clients


def test_the_listed_commands_are_those_their_modules_register() -> None:
    """`berth --help` lists commands from main's table without importing their modules: the
    table must say what each module registers, in its order, with its help."""
    for module, listed in cli_main._COMMANDS.items():
        parser = argparse.ArgumentParser()
        commands = parser.add_subparsers()
        importlib.import_module(f"berth.cli.{module}").add_commands(commands)
        registered = tuple((action.dest, action.help) for action in commands._choices_actions)
        assert registered == listed, module


def test_help_with_stand_ins_reads_as_with_every_module(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main.build_parser().parse_args(["--help"])  # every module loaded
    whole = capsys.readouterr().out
    assert cli_main.main(["--help"]) == 0  # stand-ins only
    assert capsys.readouterr().out == whole


def test_a_command_alone_gets_the_parser_it_has_among_all() -> None:
    """A named command's module registers that command alone (the others are skipped): its
    parser, nested subcommands included, is the one the whole parser has."""

    def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
        found: dict[str, str] = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{parser.prog} {name}"] = sub.format_help()
                    found |= helps(sub)
        return found

    whole = helps(cli_main.build_parser())
    for command in cli_main.MODULE_OF:
        alone = helps(cli_main.build_parser([command]))
        assert alone == {k: v for k, v in whole.items() if k.startswith(f"berth {command} ")} | {
            f"berth {command}": whole[f"berth {command}"]
        }, command


def test_a_command_after_an_abbreviated_option_gets_its_own_parser(
    capsys: pytest.CaptureFixture,
) -> None:
    """`--form json ps`: the command word is not where main looks for it first, so a stand-in
    takes it; main parses again with the command's module."""
    args = cli_main.parse(["--form", "json", "ps", "-a"])
    assert (args.command, args.format, args.all) == ("ps", "json", True)
    assert args.func is not None
    assert cli_main.main(["--form", "json", "ps", "--no-such-flag"]) == 1
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_the_version_is_the_one_in_pyproject(capsys: pytest.CaptureFixture) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert berth.__version__ == project["version"]
    assert cli_main.main(["--version"]) == 0
    assert capsys.readouterr().out == f"berth {project['version']}\n"
