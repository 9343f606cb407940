"""`berthd cluster`: flags and wiring for the cluster service (it needs etcd and no data dir)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import grpc

from berth.cluster.v1 import (
    access_pb2,
    access_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    join_pb2,
    join_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
)
from berthd.cluster.access import AccessCore, AccessServicer
from berthd.cluster.controller import Controller
from berthd.cluster.core import ClusterCore
from berthd.cluster.election import Election
from berthd.cluster.join import JoinCore, JoinServicer
from berthd.cluster.network_service import NetworkServicer
from berthd.cluster.networks import NetworkCore
from berthd.cluster.secret_service import SecretServicer
from berthd.cluster.secrets import SecretBox, SecretCore, SecretsKeyError
from berthd.cluster.service import ClusterServicer
from berthd.cluster.tag_follower import TagFollower
from berthd.common.config import add_common_flags, add_flag, service_config
from berthd.common.server import run_server
from berthd.common.store import Store

DEFAULT_LISTEN = "127.0.0.1:5070"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cluster", help="run the cluster service (nodes, placement, containers across hosts)"
    )
    add_common_flags(parser, "cluster", DEFAULT_LISTEN)
    add_flag(
        parser,
        "--secrets-key",
        default="",
        scope="cluster",
        help="file of 32 random bytes (mode 0600) that encrypts secrets in etcd; without it "
        "secrets cannot be created or delivered",
    )
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> None:
    config = service_config("cluster", args)
    try:
        box = SecretBox.from_file(args.secrets_key) if args.secrets_key else None
    except SecretsKeyError as exc:
        raise SystemExit(f"berthd cluster: {exc}") from None
    store = Store(config.etcd, config.etcd_prefix, config.credentials.channel_credentials)
    await store.connect()
    core = ClusterCore(store)
    networks = NetworkCore(store)
    # Every cluster has the default network; instances racing to make it agree on one.
    await networks.ensure_default()
    election = Election(store, config.instance_id, config.lease_ttl)
    controller = Controller(store, fence=election.fence())
    follower = TagFollower(store)

    async def lead() -> None:
        # The elected instance's duties: replicas, and services that follow a tag.
        await asyncio.gather(controller.run(), follower.run())

    campaign: asyncio.Task[None] | None = None

    async def on_start(address: str) -> dict[str, bytes]:
        nonlocal campaign
        # Every instance serves requests; the elected one also runs the controller.
        campaign = asyncio.create_task(election.run(lead))
        return {}

    async def on_stop() -> None:
        if campaign is not None:
            campaign.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await campaign
        await election.resign()
        await core.close()

    def mount(server: grpc.aio.Server) -> list[str]:
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(core), server)
        access_pb2_grpc.add_AccessServiceServicer_to_server(
            AccessServicer(AccessCore(store)), server
        )
        # Nodes join and renew here; signing needs the CA key (--tls-ca-key).
        credentials = config.credentials
        join = JoinCore(
            store,
            credentials.ca_pem,
            credentials.ca,
            credentials.lifetime,
            config.etcd,
            config.etcd_prefix,
        )
        join_pb2_grpc.add_JoinServiceServicer_to_server(JoinServicer(join), server)
        secrets_pb2_grpc.add_SecretServiceServicer_to_server(
            SecretServicer(SecretCore(store, box)), server
        )
        network_pb2_grpc.add_NetworkServiceServicer_to_server(NetworkServicer(networks), server)
        return [
            network_pb2.DESCRIPTOR.services_by_name["NetworkService"].full_name,
            cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name,
            access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name,
            join_pb2.DESCRIPTOR.services_by_name["JoinService"].full_name,
            secrets_pb2.DESCRIPTOR.services_by_name["SecretService"].full_name,
        ]

    await run_server(config, store, mount, on_start=on_start, on_stop=on_stop)
