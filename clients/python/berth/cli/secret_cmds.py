"""`berth secret create|ls|rm`: the cluster's secrets, as `docker secret` (docs/security.md).

A value goes in from a file or stdin and is never printed again: containers read it at
/run/secrets/NAME (`berth run --secret NAME`, `berth service create --secret NAME`).
"""

from __future__ import annotations

import argparse
import sys

from berth.cli.output import (
    for_each,
    format_options,
    host_options,
    human_ago,
    parse_label,
    print_json,
    print_line,
    print_listing,
)
from berth.client.secrets import MAX_SECRET_BYTES, SecretClient, SecretInfo
from berth.config import resolve_cluster_address
from berth.errors import BerthClientError

SECRET_HEADERS = ["ID", "NAME", "CREATED"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = [host_options(), format_options()]
    secret = commands.add_parser("secret", help="secrets containers read at /run/secrets")
    secrets = secret.add_subparsers(dest="secret_command", metavar="COMMAND", required=True)

    create = secrets.add_parser(
        "create", parents=data, help="store a secret from a file or stdin (-); prints its id"
    )
    create.add_argument(
        "-l",
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="set a label (repeatable)",
    )
    create.add_argument("name", metavar="NAME", help="secret name")
    create.add_argument("file", metavar="FILE", help="file holding the value, or - for stdin")
    create.set_defaults(func=cmd_secret_create)

    ls = secrets.add_parser("ls", parents=data, help="list secrets (never their values)")
    ls.add_argument("-q", "--quiet", action="store_true", help="only ids")
    ls.set_defaults(func=cmd_secret_ls)

    rm = secrets.add_parser("rm", parents=data, help="remove secrets no container uses")
    rm.add_argument("secrets", nargs="+", metavar="SECRET", help="name, id or id prefix")
    rm.set_defaults(func=cmd_secret_rm)


def connect(args: argparse.Namespace) -> SecretClient:
    return SecretClient(resolve_cluster_address(getattr(args, "host", None)))


def read_value(path: str) -> bytes:
    """The value from `path` or stdin ("-"), refused here when over the cluster's limit."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_SECRET_BYTES + 1)
    else:
        with open(path, "rb") as source:
            data = source.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise BerthClientError(
            f"secret data is larger than {MAX_SECRET_BYTES // 1024} KiB", "INVALID_ARGUMENT"
        )
    if not data:
        raise BerthClientError("secret data is empty", "INVALID_ARGUMENT")
    return data


def cmd_secret_create(args: argparse.Namespace) -> int:
    data = read_value(args.file)
    with connect(args) as client:
        info = client.create(args.name, data, dict(args.label))
    if args.format == "json":
        print_json(info)
    else:
        print_line(info.id)
    return 0


def secret_rows(secrets: list[SecretInfo]) -> list[list[str]]:
    return [[s.id, s.name, human_ago(s.created_at)] for s in secrets]


def cmd_secret_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        secrets = client.list()
    print_listing(args, secrets, SECRET_HEADERS, secret_rows, lambda s: s.id)
    return 0


def cmd_secret_rm(args: argparse.Namespace) -> int:
    with connect(args) as client:

        def remove(secret: str) -> None:
            client.remove(secret)
            print_line(secret)  # as Docker: what was asked for

        for_each(args.secrets, remove)
    return 0
