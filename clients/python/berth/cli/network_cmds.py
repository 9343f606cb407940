"""`berth network create|ls|inspect|rm`: the cluster's networks, as `docker network`
(docs/networking.md). Containers join one with `berth run --network NAME`."""

from __future__ import annotations

import argparse

from berth.cli.output import (
    for_each,
    format_options,
    host_options,
    parse_label,
    print_json,
    print_line,
    print_listing,
)
from berth.client.networks import NetworkClient, NetworkInfo
from berth.config import resolve_cluster_address

NETWORK_HEADERS = ["NETWORK ID", "NAME", "DRIVER", "SCOPE"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = [host_options(), format_options()]
    network = commands.add_parser("network", help="networks containers join (--network NAME)")
    networks = network.add_subparsers(dest="network_command", metavar="COMMAND", required=True)

    create = networks.add_parser("create", parents=data, help="make a network; prints its id")
    create.add_argument("--subnet", default="", metavar="CIDR", help="IPv4 range (a free /16)")
    create.add_argument(
        "--internal", action="store_true", help="no way out of the network (no masquerade)"
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
    create.add_argument("name", metavar="NAME", help="network name")
    create.set_defaults(func=cmd_network_create)

    ls = networks.add_parser("ls", parents=data, help="list networks")
    ls.add_argument("-q", "--quiet", action="store_true", help="only ids")
    ls.set_defaults(func=cmd_network_ls)

    inspect = networks.add_parser("inspect", parents=data, help="networks as JSON")
    inspect.add_argument("networks", nargs="+", metavar="NETWORK", help="name, id or id prefix")
    inspect.set_defaults(func=cmd_network_inspect)

    rm = networks.add_parser("rm", parents=data, help="remove networks no container uses")
    rm.add_argument("networks", nargs="+", metavar="NETWORK", help="name, id or id prefix")
    rm.set_defaults(func=cmd_network_rm)


def connect(args: argparse.Namespace) -> NetworkClient:
    return NetworkClient(resolve_cluster_address(getattr(args, "host", None)))


def cmd_network_create(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.create(args.name, args.subnet, args.internal, dict(args.label))
    if args.format == "json":
        print_json(info)
    else:
        print_line(info.id)
    return 0


def network_rows(networks: list[NetworkInfo]) -> list[list[str]]:
    # One driver (a bridge per node) and cluster-wide scope, in Docker's words.
    return [[n.id[:12], n.name, "bridge", "swarm"] for n in networks]


def cmd_network_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        networks = client.list()
    print_listing(args, networks, NETWORK_HEADERS, network_rows, lambda n: n.id[:12])
    return 0


def docker_shape(n: NetworkInfo) -> dict:
    """`docker network inspect`'s fields that berth has, plus each node's slice."""
    return {
        "Name": n.name,
        "Id": n.id,
        "Created": n.created_at,
        "Scope": "swarm",
        "Driver": "bridge",
        "Internal": n.internal,
        "IPAM": {"Driver": "host-local", "Config": [{"Subnet": n.subnet}]},
        "Labels": n.labels,
        "Slices": n.slices,
    }


def cmd_network_inspect(args: argparse.Namespace) -> int:
    found: list[dict] = []
    try:
        with connect(args) as client:
            for_each(args.networks, lambda ref: found.append(docker_shape(client.get(ref))))
    finally:
        print_json(found)  # what was found, as Docker prints before its error
    return 0


def cmd_network_rm(args: argparse.Namespace) -> int:
    with connect(args) as client:

        def remove(network: str) -> None:
            client.remove(network)
            print_line(network)  # as Docker: what was asked for

        for_each(args.networks, remove)
    return 0
