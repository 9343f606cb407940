"""`berth token create|ls|rm`: the cluster's users' tokens (docs/security.md), and the cluster
half of `berth login --token` / `berth logout` (the registry half is in image_cmds)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from berth.cli import auth
from berth.cli.output import (
    for_each,
    format_options,
    format_time,
    host_options,
    human_ago,
    parse_duration,
    print_json,
    print_line,
    print_listing,
)
from berth.client.access import AccessClient, TokenInfo
from berth.config import resolve_cluster_address
from berth.errors import BerthClientError

TOKEN_HEADERS = ["ID", "NAME", "ROLE", "REPOSITORIES", "CREATED", "EXPIRES", "CREATED BY"]
ROLES = ("admin", "operator", "developer", "reader")


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = [host_options(), format_options()]
    token = commands.add_parser("token", help="tokens people and programs log in with")
    tokens = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)

    create = tokens.add_parser("create", parents=data, help="make a token (shown once)")
    create.add_argument("--name", required=True, help="token name, unique")
    create.add_argument("--role", required=True, choices=ROLES, help="what the token may do")
    create.add_argument(
        "--repo",
        dest="repositories",
        action="append",
        default=[],
        metavar="PATTERN",
        help="limit pull/push/delete to repositories matching PATTERN (`team/*`); repeatable",
    )
    create.add_argument(
        "--expires", type=parse_duration, default=0, metavar="DURATION", help="lifetime (30d)"
    )
    create.add_argument("-q", "--quiet", action="store_true", help="print only the token")
    create.set_defaults(func=cmd_token_create)

    ls = tokens.add_parser("ls", parents=data, help="list tokens (never their secrets)")
    ls.add_argument("-q", "--quiet", action="store_true", help="only names")
    ls.set_defaults(func=cmd_token_ls)

    rm = tokens.add_parser("rm", parents=data, help="revoke tokens (within seconds everywhere)")
    rm.add_argument("tokens", nargs="+", metavar="TOKEN", help="name or id")
    rm.set_defaults(func=cmd_token_rm)


def connect(args: argparse.Namespace) -> AccessClient:
    return AccessClient(resolve_cluster_address(getattr(args, "host", None)))


def cmd_token_create(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info, secret = client.create_token(args.name, args.role, args.repositories, args.expires)
    if args.format == "json":
        print_json({"token": info, "secret": secret})
    elif args.quiet:
        print_line(secret)
    else:
        print_line(secret)
        print(
            f"Token {info.name!r} ({info.role}) created. Store it now: berth keeps only its "
            "hash. Log in with `berth login --token-stdin`.",
            file=sys.stderr,
        )
    return 0


def token_rows(tokens: list[TokenInfo]) -> list[list[str]]:
    return [
        [
            t.id,
            t.name,
            t.role,
            ",".join(t.repositories) or "*",
            human_ago(t.created_at),
            format_time(t.expires_at) if t.expires_at else "never",
            t.created_by or "-",
        ]
        for t in tokens
    ]


def cmd_token_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        tokens = client.tokens()
    print_listing(args, tokens, TOKEN_HEADERS, token_rows, lambda t: t.name)
    return 0


def cmd_token_rm(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for_each(args.tokens, lambda t: print_line(client.delete_token(t).name))
    return 0


# --- the cluster's login ------------------------------------------------------------------------


def read_token(args: argparse.Namespace) -> str:
    if args.token_stdin:
        token = sys.stdin.read().strip()
    elif args.token:
        print("WARNING! Using --token via the CLI is insecure. Use --token-stdin.", file=sys.stderr)
        token = args.token.strip()
    elif sys.stdin and sys.stdin.isatty():
        token = getpass.getpass("Token: ").strip()
    else:
        raise BerthClientError(
            "Cannot perform an interactive login from a non TTY device: pass --token-stdin",
            "INVALID_ARGUMENT",
        )
    if not token:
        raise BerthClientError("login needs a token (`berth token create`)", "INVALID_ARGUMENT")
    return token


def cluster_login(args: argparse.Namespace) -> int:
    """Check the token with the cluster, then store it for every later call."""
    token = read_token(args)
    previous = os.environ.get("BERTH_TOKEN")
    os.environ["BERTH_TOKEN"] = token  # this check, and only it, uses the new token
    try:
        with connect(args) as client:
            identity = client.identity()
    finally:
        if previous is None:
            os.environ.pop("BERTH_TOKEN", None)
        else:
            os.environ["BERTH_TOKEN"] = previous
    auth.save_cluster_token(token, identity.principal)
    print_line(f"Login Succeeded: {identity.principal} ({identity.role})")
    return 0


def cluster_logout() -> int:
    principal = auth.remove_cluster_token()
    if principal is None:
        print_line("Not logged in to the cluster")
    else:
        print_line(f"Removing the cluster token of {principal or 'this user'}")
    return 0
