"""`berthd node`: flags and wiring for the node agent."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
from pathlib import Path

import grpc

from berth.node.v1 import node_pb2, node_pb2_grpc
from berthd.common.config import add_common_flags, add_flag, add_peer_flag, service_config
from berthd.common.endpoints import service_address
from berthd.common.errors import InvalidArgument
from berthd.common.rpc.registry import RegistryApi
from berthd.common.rpc.secrets import SecretApi
from berthd.common.server import run_server
from berthd.common.state.nodes import NODES
from berthd.common.store import Store
from berthd.node.agent import NodeAgent, default_node_id
from berthd.node.containers import ContainerManager
from berthd.node.converge import Converger
from berthd.node.dns import NameService, default_upstreams, parse_upstreams
from berthd.node.fence import PEERS_FILE, Fence, Peers
from berthd.node.idmap import DEFAULT_RANGE, IdMap
from berthd.node.join import join, log_joined, needs_join, renewal_signer
from berthd.node.layers import ImageStore, LayerStore
from berthd.node.runtime import Runtime
from berthd.node.secrets import SecretMounts, default_dir
from berthd.node.service import NodeServicer
from berthd.node.spec import MAX_NOFILE
from berthd.node.watchdog import replace_watchdog, watchdog_argv

DEFAULT_LISTEN = "127.0.0.1:5060"
# Nomad's stop_after_client_disconnect for service replicas: longer than a lease TTL, so a
# replica is stopped only where the cluster has declared the node down.
DEFAULT_STOP_AFTER_DISCONNECT = 30.0


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"berthd node: invalid label {item!r}: expected key=value")
        labels[key] = value
    return labels


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("node", help="run the node agent (containers on this host)")
    add_common_flags(parser, "node", DEFAULT_LISTEN)
    add_flag(
        parser,
        "--data-dir",
        default="/var/lib/berth/node",
        scope="node",
        help="layers, images, containers and volumes of this node",
    )
    add_flag(parser, "--node-id", default=default_node_id(), scope="node", help="node id")
    parser.add_argument(
        "--label",
        action="append",
        default=[x for x in os.environ.get("BERTH_NODE_LABELS", "").split(",") if x],
        help="node label key=value, repeatable [env BERTH_NODE_LABELS, comma-separated]",
    )
    add_peer_flag(parser, "node", "registry", "where images are pulled from")
    add_peer_flag(parser, "node", "cluster", "where containers' secrets come from")
    add_flag(
        parser,
        "--secrets-dir",
        default="",
        scope="node",
        help="where containers' secrets are mounted, one tmpfs each; keep it on /run, out of "
        "the data directory (default: /run/berth/<hash of the data directory>/secrets)",
    )
    add_flag(
        parser,
        "--join",
        default="",
        scope="node",
        help="the cluster's public address host:port: join it with --join-token, and have "
        "it renew this node's certificate (nodes without the CA key)",
    )
    add_flag(
        parser,
        "--join-token",
        default="",
        scope="node",
        help="join token (`berth node join-token`): get this node's certificate from the "
        "cluster when --tls-cert/--tls-key do not exist yet",
    )
    add_flag(
        parser,
        "--runc",
        default=shutil.which("runc") or "/usr/sbin/runc",
        scope="node",
        help="runc binary",
    )
    add_flag(
        parser,
        "--conmon",
        default=shutil.which("conmon") or "/usr/bin/conmon",
        scope="node",
        help="conmon binary",
    )
    add_flag(
        parser,
        "--userns-remap-range",
        default=DEFAULT_RANGE,
        scope="node",
        help="host uids and gids START:SIZE that `--userns remap` containers' ids 0..SIZE-1 "
        "map to (Docker's userns-remap); reserve them for it, as /etc/subuid does",
    )
    add_flag(
        parser,
        "--pull-concurrency",
        default=3,
        type=int,
        scope="node",
        help="layers downloaded at once",
    )
    add_flag(
        parser,
        "--stop-after-disconnect",
        default=DEFAULT_STOP_AFTER_DISCONNECT,
        type=float,
        scope="node",
        help="seconds this node may be cut off from etcd (its registration unseen; an etcd "
        "down for every node does not count) before it stops its service replicas itself, "
        "which the cluster runs elsewhere by then; 0: never",
    )
    add_flag(
        parser,
        "--stop-standalone-after-disconnect",
        default=0.0,
        type=float,
        scope="node",
        help="the same for standalone cluster containers; 0 (default): they run on",
    )
    add_flag(
        parser,
        "--dns-upstream",
        default="",
        scope="node",
        help="resolvers IPv4[:port],... that containers' resolvers ask for names not on "
        "their network (default: the nameservers of /etc/resolv.conf)",
    )
    parser.set_defaults(run=run)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the new soft limit. The agent holds a
    pidfd per running container (berthd.node.exits) besides its sockets and logs: the usual
    soft limit of 1024 would make exits go unnoticed past a few hundred containers. Containers
    are unaffected: their spec sets their own limit (berthd.node.spec.nofile_limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a soft one the kernel takes (fs.nr_open caps it).
    wanted = MAX_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # a limit this process may not set
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run(args: argparse.Namespace) -> None:
    raise_nofile_limit()
    try:
        remap = IdMap.parse(args.userns_remap_range)
    except InvalidArgument as exc:
        raise SystemExit(f"berthd node: --userns-remap-range: {exc}") from None
    try:
        upstreams = parse_upstreams(args.dns_upstream) if args.dns_upstream else None
    except ValueError as exc:
        raise SystemExit(f"berthd node: --dns-upstream: {exc}") from None
    joined = await join(args) if needs_join(args) else None
    config = service_config("node", args)
    store = Store(config.etcd, config.etcd_prefix, config.credentials.channel_credentials)
    await store.connect()
    if args.join and config.credentials.ca is None:
        # No CA key here: the cluster signs the renewals of a node that joined it.
        config.credentials.signer = renewal_signer(store, config.credentials)
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(runc=args.runc, conmon=args.conmon, root=data / "runc")
    layers = LayerStore(data)
    images = ImageStore(data)
    cluster = SecretApi(service_address(store, "cluster", args.cluster))
    secrets = SecretMounts(
        Path(args.secrets_dir) if args.secrets_dir else default_dir(data),
        cluster.container_secrets,
    )
    names = NameService(
        store, args.node_id, default_upstreams() if upstreams is None else upstreams
    )
    manager = ContainerManager(
        data, args.node_id, runtime, images, layers, store, secrets, remap=remap, names=names
    )

    registry = RegistryApi(service_address(store, "registry", args.registry))

    agent = NodeAgent(
        data,
        args.node_id,
        parse_labels(args.label),
        registry,
        manager,
        runtime,
        images,
        layers,
        pull_concurrency=args.pull_concurrency,
        store=store,
    )

    def mount(server: grpc.aio.Server) -> list[str]:
        node_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(agent), server)
        return [node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name]

    converger = Converger(
        store, args.node_id, manager, lambda image: agent.pull(image, lambda _: None)
    )

    fence = Fence(
        store,
        args.node_id,
        manager,
        converger,
        args.stop_after_disconnect,
        args.stop_standalone_after_disconnect,
        Peers(args.node_id, data / PEERS_FILE),
    )

    async def on_start(address: str) -> dict[str, bytes]:
        if joined is not None:
            log_joined(args, joined)
        agent.address = address
        # The previous agent's watchdog goes before this agent adopts the containers; this
        # agent's own outlives it, to stop its replicas should it die (berthd.node.watchdog).
        fencing = args.stop_after_disconnect > 0 or args.stop_standalone_after_disconnect > 0
        argv = watchdog_argv(args, data) if fencing else None
        await asyncio.to_thread(replace_watchdog, data, argv)
        await manager.start_background()
        await converger.start()
        await fence.start()
        await agent.publish_layers()
        info = await agent.describe()
        return {NODES.key(args.node_id): info.encode()}

    async def on_stop() -> None:
        # Containers keep running under their conmon; the next agent adopts them.
        await fence.stop()
        await converger.stop()
        await manager.stop_background()

    # Endpoint records go with the node's registration (berthd.node.dns).
    await run_server(
        config, store, mount, on_start=on_start, on_stop=on_stop, on_lease=names.set_lease
    )
