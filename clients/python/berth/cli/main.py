"""The `berth` command line: parsing, dispatch, and the one place failures become exit codes.

Exit codes: 0 success, 1 a user mistake or a server error (one `Error: ...` line on stderr),
130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import berth
from berth.cli.output import FORMATS, print_error
from berth.config import (
    BUILDER_HELP,
    HOST_HELP,
    IMAGE_RULE,
    IMAGE_SERVICE_HELP,
    TARGET_RULE,
)
from berth.errors import BerthClientError

# The modules that register the commands, in `--help` order, with the top-level commands each
# registers and their help, as it registers them (tests/unit/test_cli_startup.py checks that
# they agree). `berth --help`, `--version` and a mistyped command list these without importing
# any module, so without grpc and the generated stubs; a command imports only its own module
# (and so only its own gRPC client) and builds only its own parser.
_COMMANDS: dict[str, tuple[tuple[str, str], ...]] = {
    "registry_cmds": (
        ("search", "find repositories by name, description or label"),
        ("registry", "manage the registry's repositories"),
    ),
    "oci_cmds": (("oci", "copy images between OCI layouts and the registry"),),
    "image_cmds": (
        ("images", "list images"),
        ("history", "show the history of an image"),
        ("tag", "give an image another name"),
        ("rmi", "remove images (layers other images use stay)"),
        ("commit", "make an image from a container's changes"),
        ("import", "make an image from a root filesystem tarball"),
        ("save", "write images to a tar archive"),
        ("load", "read images from a tar archive"),
        ("pull", "copy an image from an external registry"),
        ("push", "copy an image to an external registry"),
        ("login", "log in to the cluster (a token) or an external registry"),
        ("logout", "forget the cluster token or a registry's credentials"),
        ("image", "manage images (as `docker image`)"),
    ),
    "container_cmds": (
        ("run", "create and start a container"),
        ("ps", "list containers"),
        ("logs", "print a container's output"),
        ("exec", "run a command in a running container"),
        ("start", "start containers"),
        ("stop", "stop containers (SIGTERM, then KILL)"),
        ("kill", "send a signal to containers"),
        ("rm", "remove containers"),
        ("inspect", "containers as JSON"),
        ("port", "a container's published ports"),
        ("wait", "wait for containers to exit"),
        ("stats", "CPU, memory and pids of containers"),
        ("diff", "paths a container changed"),
        ("attach", "connect to a running container's main process"),
    ),
    "cluster_cmds": (
        ("node", "the cluster's nodes"),
        ("service", "replicated services"),
        ("events", "stream cluster events"),
    ),
    "stack_cmds": (("stack", "stacks of services from a compose file"),),
    "secret_cmds": (("secret", "secrets containers read at /run/secrets"),),
    "network_cmds": (("network", "networks containers join (--network NAME)"),),
    "build_cmds": (
        ("build", "build an image from a Dockerfile"),
        ("builder", "manage the build cache"),
    ),
    "access_cmds": (("token", "tokens people and programs log in with"),),
}
COMMAND_MODULES = list(_COMMANDS)
MODULE_OF = {command: module for module, names in _COMMANDS.items() for command, _ in names}
# Global options that take a value, to find the command word after them.
_VALUED_OPTIONS = {
    "--registry",
    "--host",
    "--image-service",
    "--node",
    "--format",
    "--builder",
    "--tls-ca",
}


class _Parser(argparse.ArgumentParser):
    """Reports usage mistakes as BerthClientError, so they print like every other error."""

    def error(self, message: str) -> NoReturn:
        raise BerthClientError(f"{message} (see '{self.prog} --help')", "INVALID_ARGUMENT")


def build_parser(
    argv: Sequence[str] | None = None, *, command: str | None = None
) -> argparse.ArgumentParser:
    """The parser of every command. Given the arguments (or `command`), only the parser of the
    command they name: its module registers that one alone (argparse takes a while to build a
    command's options, and `run` has fifty). When they name none that command_word can find,
    every command is a stand-in that only lists it (for `--help` and argparse's "invalid
    choice" message) and takes any arguments."""
    parser = _Parser(
        prog="berth",
        description="Command-line client for the berth platform.",
        epilog=f"{TARGET_RULE} `node`, `service` and `events` always ask the cluster. {IMAGE_RULE}",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    parser.add_argument(
        "--registry",
        metavar="ADDR",
        default=None,
        help="registry address HOST:PORT (default: $BERTH_REGISTRY, else the `berthd up` cluster)",
    )
    parser.add_argument("--host", metavar="ADDR", default=None, help=HOST_HELP)
    parser.add_argument("--image-service", metavar="ADDR", default=None, help=IMAGE_SERVICE_HELP)
    parser.add_argument("--builder", metavar="ADDR", default=None, help=BUILDER_HELP)
    parser.add_argument(
        "--node",
        metavar="ADDR",
        default=None,
        help="a node agent HOST:PORT: container and some image commands then skip the "
        "cluster (see below)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=None,
        help="the cluster's CA certificate (default: $BERTH_TLS_CA, else the `berthd up` "
        "cluster's); the client certificate comes from $BERTH_TLS_CERT and $BERTH_TLS_KEY, "
        "else the `berthd up` cluster's",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output of data: table (default), json"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if argv is None and command is None:
        for name in COMMAND_MODULES:
            importlib.import_module(f"berth.cli.{name}").add_commands(commands)
        return parser
    command = command or command_word(argv or [])
    if command is not None:
        module = importlib.import_module(f"berth.cli.{MODULE_OF[command]}")
        module.add_commands(_OneCommand(commands, command))
        return parser
    for listed in _COMMANDS.values():
        for name, text in listed:
            stand_in = commands.add_parser(name, help=text, add_help=False)
            stand_in.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            stand_in.set_defaults(func=None)
    return parser


class _OneCommand:
    """The subcommands as a command module sees them when one command was asked for: that
    command gets its parser, every other one a _Skipped that ignores what the module adds."""

    def __init__(self, commands: argparse._SubParsersAction, command: str) -> None:
        self._commands = commands
        self._command = command

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self._command == name or self._command in kwargs.get("aliases", ()):
            return self._commands.add_parser(name, **kwargs)
        return _Skipped()


class _Skipped:
    """A parser not built: every method call does nothing and returns it (so an argument
    group, a nested subcommand or set_defaults on it work the same)."""

    def __getattr__(self, name: str) -> Callable[..., _Skipped]:
        return lambda *args, **kwargs: self


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments, parsed by the full parser of the command they name."""
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if args.func is None:
        # A stand-in took the command: its word came after something command_word cannot
        # skip (an abbreviated option, `--form json ps`). Parse again with its parser.
        return build_parser(argv, command=args.command).parse_args(argv)
    if unknown:
        parser.parse_args(argv)  # reports them
    return args


def command_word(argv: Sequence[str]) -> str | None:
    """The command argv names; None when it names none (or one this cannot find)."""
    args = list(argv)
    while args:
        word = args.pop(0)
        if word in _VALUED_OPTIONS:
            args = args[1:]
        elif not word.startswith("-"):
            return word if word in MODULE_OF else None
        elif word.split("=", 1)[0] not in _VALUED_OPTIONS:
            return None  # --help, --version, or a mistake argparse should report in full
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if args.tls_ca:
            # Every client the command makes reads it (berth.tls).
            os.environ["BERTH_TLS_CA"] = args.tls_ca
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except BerthClientError as err:
        print_error(err)
        return 1
    except BrokenPipeError:
        # The reader went away (`berth registry ls | head`): stop quietly, like other tools.
        _silence_stdout()
        return 141
    except OSError as err:
        print_error(f"{err.strerror}: {err.filename}" if err.filename else err)
        return 1
    except Exception as err:
        # berth.oci_layout is imported only by the commands that read layouts (start-up time):
        # if it is not loaded, it raised nothing.
        layout = sys.modules.get("berth.oci_layout")
        if layout is None or not isinstance(err, layout.LayoutError):
            raise
        print_error(err)
        return 1


class _Version(argparse.Action):
    """--version: the package's own constant, no lookup of the installed distribution."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"berth {berth.__version__}")
        parser.exit()


def _silence_stdout() -> None:
    """Keep Python's exit-time flush of stdout from failing on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
