"""`berth node ...`, `berth service ...` and `berth events`: what only the cluster answers.

They always talk to the cluster (--host, else BERTH_HOST, else the `berthd up` cluster), never to
a node agent, and print like `docker node`, `docker service` and `docker events`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from berth.cli.container_cmds import (
    SHORT_ID,
    add_image_arguments,
    add_spec_options,
    binary_size,
    container_config,
    container_status,
    host_options,
    non_negative_int,
    parse_env,
    placement_options,
    publish_option,
)
from berth.cli.health_opts import add_health_options, health_check
from berth.cli.output import (
    for_each,
    format_options,
    format_time,
    jsonable,
    parse_duration,
    print_fields,
    print_json,
    print_line,
    print_table,
)
from berth.cli.rollout_opts import add_rollout_options, rollout_changes
from berth.client.cluster import ClusterClient, ClusterContainer, Event, NodeInfo, ServiceInfo
from berth.client.join import JoinClient, JoinInfo
from berth.config import resolve_cluster_address
from berth.enums.cluster import UPDATE_STATES
from berth.errors import BerthClientError
from berth.ports import parse_service_publish

NODE_HEADERS = [
    "ID",
    "ADDRESS",
    "STATUS",
    "AVAILABILITY",
    "CPUS",
    "MEMORY",
    "ALLOCATED",
    "CONTAINERS",
    "LABELS",
]
SERVICE_HEADERS = ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS", "UPDATE"]
SERVICE_PS_HEADERS = ["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"]
# Event types as `docker events` words: (object, action).
EVENT_WORDS = {
    "node_joined": ("node", "join"),
    "node_lost": ("node", "lost"),
    "container_scheduled": ("container", "schedule"),
    "container_started": ("container", "start"),
    "container_died": ("container", "die"),
    "container_rescheduled": ("container", "reschedule"),
    "service_scaled": ("service", "scale"),
    "container_create_failed": ("container", "create-failed"),
    "node_availability_changed": ("node", "update"),
    "node_drain_completed": ("node", "drained"),
    "service_created": ("service", "create"),
    "service_update_started": ("service", "update"),
    "service_update_completed": ("service", "update-completed"),
    "service_update_paused": ("service", "update-paused"),
    "service_removed": ("service", "remove"),
    "health_status": ("container", "health_status"),
    "service_rollback_started": ("service", "rollback"),
    "service_rollback_completed": ("service", "rollback-completed"),
    "service_rollback_paused": ("service", "rollback-paused"),
    "service_follow": ("service", "follow"),
}
EVENT_FILTER_KEYS = ("type", "event", "node", "container", "service")


# --- argument types ---------------------------------------------------------------------------


def parse_scale(text: str) -> tuple[str, int]:
    """SERVICE=REPLICAS, as `docker service scale web=3`."""
    name, sep, count = text.rpartition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(
            f'invalid scale "{text}": use SERVICE=REPLICAS, e.g. web=3'
        )
    return name, int(count)


def parse_event_filter(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key not in EVENT_FILTER_KEYS or not value:
        raise argparse.ArgumentTypeError(
            f'invalid filter "{text}": use type=, event=, node=, container= or service='
        )
    objects = {obj for obj, _ in EVENT_WORDS.values()}
    actions = {action for _, action in EVENT_WORDS.values()}
    if key == "type" and value not in objects:
        raise argparse.ArgumentTypeError(
            f'invalid event type "{value}": use one of {", ".join(sorted(objects))}'
        )
    if key == "event" and value not in actions:
        raise argparse.ArgumentTypeError(
            f'invalid event "{value}": use one of {", ".join(sorted(actions))}'
        )
    return key, value


def event_request(filters: list[tuple[str, str]]) -> dict[str, object]:
    """ClusterClient.events arguments for `--filter`s: values of one key widen (any of them),
    different keys narrow (all of them), as in Docker."""
    wanted: dict[str, list[str]] = {}
    for key, value in filters:
        wanted.setdefault(key, []).append(value)
    for key in ("node", "container", "service"):
        if len(wanted.get(key, [])) > 1:
            raise BerthClientError(f"only one {key}= filter is supported", "INVALID_ARGUMENT")
    types = [
        name
        for name, (obj, action) in EVENT_WORDS.items()
        if obj in wanted.get("type", [obj]) and action in wanted.get("event", [action])
    ]
    if not types:
        raise BerthClientError(
            "no event matches these type= and event= filters", "INVALID_ARGUMENT"
        )
    return {
        # All types is the server's default: send none, so new types are not filtered out.
        "types": [] if len(types) == len(EVENT_WORDS) else types,
        "node_id": wanted.get("node", [""])[0],
        "container": wanted.get("container", [""])[0],
        "service": wanted.get("service", [""])[0],
    }


# --- parsers ----------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `node`, `service` and `events` on the top-level subcommands."""
    host = [host_options()]
    data = [host_options(), format_options()]

    node = commands.add_parser("node", help="the cluster's nodes")
    nodes = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    ls = nodes.add_parser("ls", parents=data, help="list nodes")
    ls.set_defaults(func=cmd_node_ls)
    inspect = nodes.add_parser("inspect", parents=data, help="one node in detail")
    inspect.add_argument("node_id", metavar="NODE", help="node id")
    inspect.set_defaults(func=cmd_node_inspect)
    changes = [
        ("cordon", "place no new containers on nodes", "cordon"),
        ("drain", "cordon nodes and move their service replicas elsewhere", "drain"),
        ("activate", "let placement use cordoned or drained nodes again", "activate"),
    ]
    for name, help_text, method in changes:
        change = nodes.add_parser(name, parents=data, help=help_text)
        change.add_argument("node_ids", nargs="+", metavar="NODE", help="node id")
        change.set_defaults(func=cmd_node_change, method=method)
    join_token = nodes.add_parser(
        "join-token",
        parents=data,
        help="show or rotate the token new nodes join with, and the command to run on them",
    )
    join_token.add_argument(
        "--rotate", action="store_true", help="make a new token; the current one stops working"
    )
    join_token.add_argument(
        "--expires",
        type=parse_duration,
        metavar="DURATION",
        help="with --rotate: the token's lifetime (24h, 30m, 7d); default: it never expires",
    )
    join_token.add_argument(
        "-q", "--quiet", action="store_true", help="print only the token (with --rotate)"
    )
    join_token.set_defaults(func=cmd_node_join_token)

    service = commands.add_parser("service", help="replicated services")
    services = service.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    create = services.add_parser(
        "create", parents=data, help="create a service: keep N replicas of a container running"
    )
    create.add_argument("--name", required=True, help="service name; replicas are NAME.SLOT")
    create.add_argument(
        "--replicas", type=non_negative_int, default=1, metavar="N", help="replicas (default 1)"
    )
    create.add_argument(
        "-p",
        "--publish",
        action="append",
        type=publish_option(parse_service_publish),
        default=[],
        metavar="[PUBLISHED:]TARGET[/PROTO]",
        help="publish a port on every node, through the routing mesh; also "
        "published=P,target=T[,protocol=udp] (repeatable; implies --network berth)",
    )
    add_follow_option(create)
    add_spec_options(create)
    add_rollout_options(create)
    add_image_arguments(create)
    create.set_defaults(func=cmd_service_create)

    sinspect = services.add_parser(
        "inspect", parents=host, help="services in detail, as JSON (spec, previous spec, update)"
    )
    sinspect.add_argument("services", nargs="+", metavar="SERVICE", help="id, id prefix or name")
    sinspect.set_defaults(func=cmd_service_inspect)

    rollback = services.add_parser(
        "rollback", parents=data, help="return a service to its previous spec"
    )
    rollback.add_argument("service", metavar="SERVICE", help="id, id prefix or name")
    rollback.set_defaults(func=cmd_service_rollback)

    sls = services.add_parser("ls", parents=data, help="list services")
    sls.set_defaults(func=cmd_service_ls)

    ps = services.add_parser("ps", parents=data, help="a service's replicas and their nodes")
    ps.add_argument("-a", "--all", action="store_true", help="include replicas not running")
    ps.add_argument("service", metavar="SERVICE", help="id, id prefix or name")
    ps.set_defaults(func=cmd_service_ps)

    scale = services.add_parser("scale", parents=data, help="change replica counts")
    scale.add_argument("scales", nargs="+", type=parse_scale, metavar="SERVICE=REPLICAS")
    scale.set_defaults(func=cmd_service_scale)

    update = services.add_parser(
        "update", parents=data, help="change a service and roll its replicas, one at a time"
    )
    update.add_argument("--image", help="new image")
    add_follow_option(update)
    update.add_argument(
        "--no-follow",
        dest="follow",
        action="store_const",
        const="",
        help="stop following a tag (the replicas keep the digest they run)",
    )
    update.add_argument(
        "-e",
        "--env",
        action="append",
        type=parse_env,
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (repeatable)",
    )
    update.add_argument(
        "--env-rm", action="append", default=[], metavar="KEY", help="drop a variable"
    )
    update.add_argument("--replicas", type=non_negative_int, metavar="N", help="replica count")
    update.add_argument(
        "--network", metavar="NETWORK", help="none, host or a network's name (berth network ls)"
    )
    update.add_argument(
        "--network-alias",
        action="append",
        metavar="ALIAS",
        help="another name the replicas answer to on their network; replaces the aliases "
        "(repeatable)",
    )
    update.add_argument(
        "--publish-add",
        action="append",
        type=publish_option(parse_service_publish),
        default=[],
        metavar="[PUBLISHED:]TARGET[/PROTO]",
        help="publish a port on every node (repeatable)",
    )
    update.add_argument(
        "--publish-rm",
        action="append",
        type=publish_option(parse_service_publish),
        default=[],
        metavar="PUBLISHED[:TARGET][/PROTO]",
        help="stop publishing a port (repeatable)",
    )
    add_health_options(update)
    add_rollout_options(update)
    update.add_argument("service", metavar="SERVICE", help="id, id prefix or name")
    update.set_defaults(func=cmd_service_update)

    rm = services.add_parser("rm", parents=host, help="remove services and their replicas")
    rm.add_argument("services", nargs="+", metavar="SERVICE", help="id, id prefix or name")
    rm.set_defaults(func=cmd_service_rm)

    events = commands.add_parser("events", parents=data, help="stream cluster events")
    events.add_argument(
        "-f",
        "--filter",
        action="append",
        type=parse_event_filter,
        default=[],
        metavar="KEY=VALUE",
        help="type=node|container|service, event=start|die|..., node=, container=, service=",
    )
    events.set_defaults(func=cmd_events)


def connect_cluster(args: argparse.Namespace) -> ClusterClient:
    return ClusterClient(resolve_cluster_address(args.host))


# --- node commands ----------------------------------------------------------------------------


def cmd_node_ls(args: argparse.Namespace) -> int:
    with connect_cluster(args) as client:
        nodes = client.nodes()
    if args.format == "json":
        print_json(nodes)
    else:
        print_table(NODE_HEADERS, node_rows(nodes))
    return 0


def cmd_node_inspect(args: argparse.Namespace) -> int:
    with connect_cluster(args) as client:
        node = client.node(args.node_id)
    if args.format == "json":
        print_json(node)
    else:
        print_fields(node_fields(node))
    return 0


def cmd_node_change(args: argparse.Namespace) -> int:
    changed: list[NodeInfo] = []
    with connect_cluster(args) as client:

        def one(node_id: str) -> None:
            changed.append(getattr(client, args.method)(node_id))
            if args.format != "json":
                print_line(node_id)  # Docker echoes each node, as given

        try:
            for_each(args.node_ids, one)
        finally:
            if args.format == "json" and changed:
                print_json(changed)
    return 0


def cmd_node_join_token(args: argparse.Namespace) -> int:
    if args.expires is not None and not args.rotate:
        raise BerthClientError(
            "--expires needs --rotate: it sets the new token's lifetime", "INVALID_ARGUMENT"
        )
    if args.quiet and not args.rotate:
        # Only the hash is kept: the token is shown once, when it is made.
        raise BerthClientError(
            "the cluster keeps only the join token's hash; make a new one with "
            "`berth node join-token --rotate -q`",
            "FAILED_PRECONDITION",
        )
    with JoinClient(resolve_cluster_address(args.host)) as client:
        info = client.rotate_join_token(args.expires or 0) if args.rotate else client.join_token()
    if args.format == "json":
        print_json(info)
    elif args.quiet:
        print_line(info.token.token if info.token else "")
    else:
        print_line(join_token_text(info, args.rotate))
    return 0


ROTATE_COMMAND = "    berth node join-token --rotate"


def join_token_text(info: JoinInfo, rotated: bool) -> str:
    """What `docker swarm join-token` prints: the command to run on a new host, once there
    is a token to show; else what the current token is and how to get a new one."""
    token = info.token
    if token is None:
        return "This cluster has no join token yet. Make one with:\n\n" + ROTATE_COMMAND
    expires = format_time(token.expires_at) if token.expires_at else "never"
    created = format_time(token.created_at) if token.created_at else "-"
    made = f"made {created} by {token.created_by or '-'}, expires {expires}"
    if not rotated:
        stale = "" if token.ca_digest == info.ca_digest else " It was made for another CA."
        return (
            f"This cluster has a join token ({made}).{stale}\n"
            "The cluster keeps only its hash, so it cannot be shown again. To show a new one "
            "(the current one stops working at once):\n\n" + ROTATE_COMMAND
        )
    address = info.join_addresses[0] if info.join_addresses else "CLUSTER_PUBLIC_ADDRESS"
    command = [
        "berthd node",
        f"--join {address}",
        f"--join-token {token.token}",
        "--tls-ca ca.crt --tls-cert node.crt --tls-key node.key",
        f"--etcd {info.etcd_endpoint or 'ETCD_ADDRESS'}",
    ]
    if info.etcd_prefix and info.etcd_prefix != "/berth/":
        command.append(f"--etcd-prefix {info.etcd_prefix}")
    return (
        f"Rotated the join token ({made}); the previous one no longer works.\n\n"
        "To add a node to this cluster, copy the cluster's CA certificate to the new host as "
        f"ca.crt (sha256 {info.ca_digest}) and run there:\n\n    " + " \\\n        ".join(command)
    )


def follow_value(text: str) -> str:
    if text != "tag" and not text.startswith("semver:"):
        # `--follow app:prod` took the image as the option's value.
        raise argparse.ArgumentTypeError(
            f'invalid --follow value "{text}": give no value (the image\'s tag) or '
            "semver:RANGE; an image right after a bare --follow needs -- before it"
        )
    return text


def add_follow_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--follow",
        nargs="?",
        const="tag",
        type=follow_value,
        metavar="semver:RANGE",
        help="follow the image's tag: a push that moves it rolls the service to the new "
        "digest; with semver:RANGE (semver:~1.4, 'semver:>=1.2,<2') the highest tag of the "
        "repository in that range",
    )


# --- service commands -------------------------------------------------------------------------


def cmd_service_create(args: argparse.Namespace) -> int:
    template = container_config(args)
    with connect_cluster(args) as client:
        service = client.create_service(
            args.name,
            template,
            args.replicas,
            placement_options(args),
            ports=args.publish,
            update_config=rollout_changes(args, "update"),
            rollback_config=rollout_changes(args, "rollback"),
            follow=args.follow or "",
        )
    if args.format == "json":
        print_json(service)
    else:
        print_line(service.id)
    return 0


def cmd_service_ls(args: argparse.Namespace) -> int:
    with connect_cluster(args) as client:
        services = client.services()
    if args.format == "json":
        print_json(services)
    else:
        print_table(SERVICE_HEADERS, service_rows(services))
    return 0


def cmd_service_ps(args: argparse.Namespace) -> int:
    with connect_cluster(args) as client:
        replicas = client.service_ps(args.service, all=args.all)
    if args.format == "json":
        print_json([{**jsonable(c), "status": container_status(c)} for c in replicas])
    else:
        print_table(SERVICE_PS_HEADERS, service_ps_rows(replicas))
    return 0


def cmd_service_scale(args: argparse.Namespace) -> int:
    scaled: list[ServiceInfo] = []
    counts = dict(args.scales)  # the last count given for a service wins
    with connect_cluster(args) as client:

        def one(name: str) -> None:
            scaled.append(client.scale(name, counts[name]))
            if args.format != "json":
                print_line(f"{name} scaled to {counts[name]}")

        try:
            for_each(counts, one)
        finally:
            if args.format == "json" and scaled:
                print_json(scaled)
    return 0


def cmd_service_update(args: argparse.Namespace) -> int:
    env = [entry for entry in args.env if entry is not None]
    changes = (args.image, args.replicas, args.network, args.network_alias, args.follow)
    ports = args.publish_add or args.publish_rm
    health = health_check(args)
    update, rollback = rollout_changes(args, "update"), rollout_changes(args, "rollback")
    if (
        all(c is None for c in (*changes, health, update, rollback))
        and not env
        and not args.env_rm
        and not ports
    ):
        raise BerthClientError(
            "nothing to update: give --image, --follow, --no-follow, --env, --env-rm, "
            "--replicas, --network, --network-alias, --publish-add, --publish-rm, --health-*, "
            "--no-healthcheck, --update-* or --rollback-*",
            "INVALID_ARGUMENT",
        )
    with connect_cluster(args) as client:
        service = client.update_service(
            args.service,
            image=args.image,
            env=env,
            env_remove=args.env_rm,
            replicas=args.replicas,
            network=args.network,
            network_aliases=args.network_alias,
            publish_add=args.publish_add,
            # `--publish-rm 8080` names the published port (Docker's short form: the target).
            publish_rm=[p.published_port or p.target_port for p in args.publish_rm],
            health_check=health,
            update_config=update,
            rollback_config=rollback,
            follow=args.follow,
        )
    if args.format == "json":
        print_json(service)
    else:
        print_line(args.service)
    return 0


def cmd_service_rollback(args: argparse.Namespace) -> int:
    with connect_cluster(args) as client:
        service = client.rollback_service(args.service)
    if args.format == "json":
        print_json(service)
    else:
        # Docker prints the service, then "rollback: manually requested rollback".
        print_line(args.service)
        print_line("rollback: manually requested rollback")
    return 0


def cmd_service_inspect(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    found: list[dict] = []
    with connect_cluster(args) as client:

        def one(name: str) -> None:
            message = client.service_message(name)
            data = MessageToDict(message)
            # Swarm's UpdateStatus: where the last update (or rollback) is, and why.
            data["UpdateStatus"] = {
                "State": UPDATE_STATES.name(message.update_state, ""),
                "Message": message.update_message,
            }
            found.append(data)

        try:
            for_each(args.services, one)
        finally:
            print_json(found)
    return 0


def cmd_service_rm(args: argparse.Namespace) -> int:
    with connect_cluster(args) as client:

        def one(name: str) -> None:
            client.remove_service(name)
            print_line(name)

        for_each(args.services, one)
    return 0


# --- events -----------------------------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    request = event_request(args.filter)
    with connect_cluster(args) as client:
        for event in client.events(**request):
            text = json.dumps(jsonable(event)) if args.format == "json" else event_line(event)
            # One line per event, at once, also into a pipe (`berth events | grep die`).
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    return 0


# --- rendering --------------------------------------------------------------------------------


def cpus(millis: int) -> str:
    """Millicpus as a CPU count: 4000 is "4", 500 is "0.5"."""
    return f"{millis / 1000:g}"


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def node_rows(nodes: Iterable[NodeInfo]) -> list[list[str]]:
    return [
        [
            n.id,
            n.address,
            "Ready" if n.state == "ready" else "Down",
            n.availability.capitalize(),
            cpus(n.capacity.cpu_millis),
            binary_size(n.capacity.memory_bytes),
            f"{cpus(n.allocated.cpu_millis)} CPU / {binary_size(n.allocated.memory_bytes)}",
            str(n.container_count),
            labels_text(n.labels),
        ]
        for n in nodes
    ]


def node_fields(n: NodeInfo) -> list[tuple[str, str]]:
    [row] = node_rows([n])
    fields = [(header.capitalize(), value) for header, value in zip(NODE_HEADERS, row, strict=True)]
    return [
        *fields,
        ("Version", n.version or "-"),
        ("Runtime", n.runtime_version or "-"),
    ]


def service_rows(services: Iterable[ServiceInfo]) -> list[list[str]]:
    return [
        [
            s.id[:SHORT_ID],
            s.name,
            "replicated",
            f"{s.running_replicas}/{s.replicas}",
            s.image,
            ", ".join(str(p) for p in s.ports),
            s.update_state or "-",
        ]
        for s in services
    ]


def service_ps_rows(replicas: Iterable[ClusterContainer]) -> list[list[str]]:
    return [
        [
            c.id[:SHORT_ID],
            c.name,
            c.image,
            c.node_id,
            c.desired_state.capitalize(),
            container_status(c),
            c.error,
        ]
        for c in replicas
    ]


def event_line(e: Event) -> str:
    """`docker events` style: TIME OBJECT ACTION ID (key=value, ...), attributes sorted; the
    principal that caused it is the `actor` attribute."""
    obj, action = EVENT_WORDS.get(e.type, ("cluster", e.type))
    if e.health_status:
        action = f"{action}: {e.health_status}"  # Docker's `health_status: healthy`
    if e.type == "service_follow":
        action = f"{action}: {e.message}"  # `follow: web app:prod -> sha256:...`
    subject = {"node": e.node_id, "container": e.container_id, "service": e.service_id}
    attributes = {
        "actor": e.actor,
        "name": e.container_name or e.service_name,
        "node": e.node_id if obj != "node" else "",
        "previousNode": e.previous_node_id,
        "service": e.service_id if obj != "service" else "",
        "exitCode": str(e.exit_code) if e.exit_code is not None else "",
        "oomKilled": "true" if e.oom_killed else "",
        "reason": e.failure_reason,
        "availability": e.availability,
        "replicas": str(e.replicas) if obj == "service" else "",
        "version": str(e.version) if e.type.startswith("service_update") else "",
    }
    shown = ", ".join(f"{k}={v}" for k, v in sorted(attributes.items()) if v)
    when = format_time(e.occurred_at.replace(microsecond=0)) if e.occurred_at else "-"
    line = f"{when} {obj} {action} {subject.get(obj, '')}"
    return f"{line} ({shown})" if shown else line
