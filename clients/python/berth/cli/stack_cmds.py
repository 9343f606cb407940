"""`berth stack deploy|ls|ps|services|rm`: a compose file as a stack of services, as
`docker stack` (docs/deploy-pipeline.md#stacks). A stack is its label,
com.docker.stack.namespace=NAME, on services (NAME_svc), networks and secrets."""

from __future__ import annotations

import argparse
import sys

from berth.cli.cluster_cmds import (
    SERVICE_HEADERS,
    SERVICE_PS_HEADERS,
    service_ps_rows,
    service_rows,
)
from berth.cli.container_cmds import container_status
from berth.cli.output import (
    format_options,
    host_options,
    jsonable,
    print_json,
    print_line,
    print_table,
)
from berth.client.cluster import ClusterClient
from berth.client.networks import NetworkClient
from berth.client.secrets import SecretClient
from berth.config import resolve_cluster_address
from berth.errors import BerthClientError

STACK_HEADERS = ["NAME", "SERVICES"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = [host_options(), format_options()]
    stack = commands.add_parser("stack", help="stacks of services from a compose file")
    stacks = stack.add_subparsers(dest="stack_command", metavar="COMMAND", required=True)

    deploy = stacks.add_parser(
        "deploy", parents=data, help="deploy a new stack or update an existing one"
    )
    deploy.add_argument(
        "-c",
        "--compose-file",
        metavar="FILE",
        help="the compose file (default: compose.yaml or docker-compose.yml here)",
    )
    deploy.add_argument(
        "--prune", action="store_true", help="remove the stack's services the file no longer has"
    )
    deploy.add_argument("stack", metavar="STACK", help="stack name")
    deploy.set_defaults(func=cmd_stack_deploy)

    ls = stacks.add_parser("ls", parents=data, help="list stacks")
    ls.set_defaults(func=cmd_stack_ls)

    ps = stacks.add_parser("ps", parents=data, help="the replicas of a stack's services")
    ps.add_argument("-a", "--all", action="store_true", help="include replicas not running")
    ps.add_argument("stack", metavar="STACK", help="stack name")
    ps.set_defaults(func=cmd_stack_ps)

    services = stacks.add_parser("services", parents=data, help="a stack's services")
    services.add_argument("stack", metavar="STACK", help="stack name")
    services.set_defaults(func=cmd_stack_services)

    rm = stacks.add_parser("rm", parents=data, help="remove stacks")
    rm.add_argument("stacks", nargs="+", metavar="STACK", help="stack name")
    rm.set_defaults(func=cmd_stack_rm)


def _address(args: argparse.Namespace) -> str:
    return resolve_cluster_address(getattr(args, "host", None))


def _check_name(name: str) -> None:
    # The stack's name prefixes every object name: the same rule as a network's.
    import re

    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", name):
        raise BerthClientError(
            f'invalid stack name "{name}": only [a-zA-Z0-9][a-zA-Z0-9_.-] is allowed',
            "INVALID_ARGUMENT",
        )


def cmd_stack_deploy(args: argparse.Namespace) -> int:
    from berth.stack import compose, deploy, plan

    _check_name(args.stack)
    path = compose.find_file(args.compose_file)
    data = compose.load(path)
    env = compose.environment_of(path.parent)
    wanted = plan.make_plan(args.stack, data, path.parent.resolve(), env)
    for warning in wanted.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    say = print_line if args.format != "json" else (lambda _: None)
    address = _address(args)
    with (
        ClusterClient(address) as cluster,
        NetworkClient(address) as networks,
        SecretClient(address) as secrets,
    ):
        done = deploy.deploy(wanted, cluster, networks, secrets, say, prune=args.prune)
    if args.format == "json":
        print_json({"stack": args.stack, "services": done})
    return 0


def cmd_stack_ls(args: argparse.Namespace) -> int:
    from berth.stack.plan import NAMESPACE_LABEL

    with ClusterClient(_address(args)) as client:
        services = client.services()
    counts: dict[str, int] = {}
    for service in services:
        stack = service.labels.get(NAMESPACE_LABEL)
        if stack is not None:
            counts[stack] = counts.get(stack, 0) + 1
    if args.format == "json":
        print_json([{"name": n, "services": c} for n, c in sorted(counts.items())])
    else:
        print_table(STACK_HEADERS, [[n, str(c)] for n, c in sorted(counts.items())])
    return 0


def cmd_stack_services(args: argparse.Namespace) -> int:
    from berth.stack.plan import NAMESPACE_LABEL

    with ClusterClient(_address(args)) as client:
        services = client.services({NAMESPACE_LABEL: args.stack})
    if args.format == "json":
        print_json(services)
    elif not services:
        print(f"Nothing found in stack: {args.stack}", file=sys.stderr)
    else:
        print_table(SERVICE_HEADERS, service_rows(services))
    return 0


def cmd_stack_ps(args: argparse.Namespace) -> int:
    from berth.stack.plan import NAMESPACE_LABEL

    with ClusterClient(_address(args)) as client:
        services = client.services({NAMESPACE_LABEL: args.stack})
        if not services:
            raise BerthClientError(f"nothing found in stack: {args.stack}", "NOT_FOUND")
        replicas = [c for s in services for c in client.service_ps(s.id, all=args.all)]
    if args.format == "json":
        print_json([{**jsonable(c), "status": container_status(c)} for c in replicas])
    else:
        print_table(SERVICE_PS_HEADERS, service_ps_rows(replicas))
    return 0


def cmd_stack_rm(args: argparse.Namespace) -> int:
    from berth.stack import deploy

    address = _address(args)
    with (
        ClusterClient(address) as cluster,
        NetworkClient(address) as networks,
        SecretClient(address) as secrets,
    ):
        for stack in args.stacks:
            if not deploy.remove(stack, cluster, networks, secrets, print_line):
                print(f"Nothing found in stack: {stack}", file=sys.stderr)
    return 0
