"""The `berth` command line: parsing, dispatch, and the one place failures become exit codes.

Exit codes: 0 success, 1 a user mistake or a server error (one `Error: ...` line on stderr),
130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from berth.cli.output import FORMATS, print_error
from berth.config import (
    BUILDER_HELP,
    HOST_HELP,
    IMAGE_RULE,
    IMAGE_SERVICE_HELP,
    TARGET_RULE,
)
from berth.errors import BerthClientError

# The modules that register the commands, in `--help` order, and which one registers each
# top-level command: a command imports only its own module (and so only its own gRPC client),
# which keeps `berth build` or `berth ps` from paying for every other client at start-up.
_COMMANDS = {
    "registry_cmds": "search registry",
    "oci_cmds": "oci",
    "image_cmds": "images history tag rmi commit import save load pull push login logout image",
    "container_cmds": "run ps logs exec attach start stop kill rm inspect wait stats diff",
    "cluster_cmds": "node service events",
    "secret_cmds": "secret",
    "build_cmds": "build builder",
    "access_cmds": "token",
}
COMMAND_MODULES = list(_COMMANDS)
MODULE_OF = {command: module for module, words in _COMMANDS.items() for command in words.split()}
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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the arguments, only with the command they name (every command when
    they name none, ask for help, or name an unknown one, so argparse can list them all)."""
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
    wanted = command_module(argv)
    for name in COMMAND_MODULES:
        if wanted is None or name == wanted:
            importlib.import_module(f"berth.cli.{name}").add_commands(commands)
    return parser


def command_module(argv: Sequence[str] | None) -> str | None:
    """The module of the command argv names; None when every command is needed."""
    args = list(sys.argv[1:] if argv is None else argv)
    while args:
        word = args.pop(0)
        if word in _VALUED_OPTIONS:
            args = args[1:]
        elif not word.startswith("-"):
            return MODULE_OF.get(word)
        elif word.split("=", 1)[0] not in _VALUED_OPTIONS:
            return None  # --help, --version, or a mistake argparse should report in full
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
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
    """--version, reading the installed version only when asked (importlib.metadata is slow to
    import, and every command would pay for it)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("berth")
        except PackageNotFoundError:
            text = "unknown"
        print(f"berth {text}")
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
