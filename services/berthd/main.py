"""`berthd`: one console script that starts any berth service, or a whole local cluster."""

from __future__ import annotations

import argparse
import asyncio
import sys

from berthd import localcluster
from berthd.builder import main as builder_main
from berthd.cluster import main as cluster_main
from berthd.common.errors import BerthError
from berthd.image import main as image_main
from berthd.node import main as node_main
from berthd.registry import main as registry_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berthd", description="Run berth services.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry_main.add_parser(commands)
    node_main.add_parser(commands)
    cluster_main.add_parser(commands)
    image_main.add_parser(commands)
    builder_main.add_parser(commands)
    localcluster.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
            return 0
        return int(result or 0)
    except (BerthError, RuntimeError, OSError, ValueError) as exc:
        print(f"berthd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
