"""The `berth` command line: parsing, dispatch, and the one place failures become exit codes.

Exit codes: 0 success, 1 a user mistake or a server error (one `Error: ...` line on stderr),
130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from berth.cli import build_cmds, cluster_cmds, container_cmds, image_cmds, oci_cmds, registry_cmds
from berth.cli.output import FORMATS, print_error
from berth.config import IMAGE_RULE, TARGET_RULE
from berth.errors import BerthClientError
from berth.oci_layout import LayoutError


class _Parser(argparse.ArgumentParser):
    """Reports usage mistakes as BerthClientError, so they print like every other error."""

    def error(self, message: str) -> NoReturn:
        raise BerthClientError(f"{message} (see '{self.prog} --help')", "INVALID_ARGUMENT")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="berth",
        description="Command-line client for the berth platform.",
        epilog=f"{TARGET_RULE} `node`, `service` and `events` always ask the cluster. {IMAGE_RULE}",
    )
    parser.add_argument("--version", action="version", version=f"berth {_version()}")
    parser.add_argument(
        "--registry",
        metavar="ADDR",
        default=None,
        help="registry address HOST:PORT (default: $BERTH_REGISTRY, else the `berthd up` cluster)",
    )
    parser.add_argument("--host", metavar="ADDR", default=None, help=container_cmds.HOST_HELP)
    parser.add_argument(
        "--image-service", metavar="ADDR", default=None, help=image_cmds.SERVICE_HELP
    )
    parser.add_argument(
        "--node",
        metavar="ADDR",
        default=None,
        help="a node agent HOST:PORT: container and some image commands then skip the "
        "cluster (see below)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output of data: table (default), json"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registry_cmds.add_commands(commands)
    oci_cmds.add_commands(commands)
    image_cmds.add_commands(commands)
    container_cmds.add_commands(commands)
    cluster_cmds.add_commands(commands)
    build_cmds.add_commands(commands, parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (BerthClientError, LayoutError) as err:
        print_error(err)
        return 1
    except BrokenPipeError:
        # The reader went away (`berth registry ls | head`): stop quietly, like other tools.
        _silence_stdout()
        return 141
    except OSError as err:
        print_error(f"{err.strerror}: {err.filename}" if err.filename else err)
        return 1


def _version() -> str:
    try:
        return version("berth")
    except PackageNotFoundError:
        return "unknown"


def _silence_stdout() -> None:
    """Keep Python's exit-time flush of stdout from failing on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
