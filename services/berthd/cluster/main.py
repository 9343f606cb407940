"""`berthd cluster`: flags and wiring for the cluster service (it needs etcd and no data dir)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import grpc

from berth.cluster.v1 import cluster_pb2, cluster_pb2_grpc
from berthd.cluster.controller import Controller
from berthd.cluster.core import ClusterCore
from berthd.cluster.election import Election
from berthd.cluster.service import ClusterServicer
from berthd.common.config import add_common_flags, service_config
from berthd.common.server import run_server
from berthd.common.store import Store

DEFAULT_LISTEN = "127.0.0.1:5070"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cluster", help="run the cluster service (nodes, placement, containers across hosts)"
    )
    add_common_flags(parser, "cluster", DEFAULT_LISTEN)
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> None:
    config = service_config("cluster", args)
    store = Store(config.etcd, config.etcd_prefix, config.credentials.channel_credentials)
    await store.connect()
    core = ClusterCore(store)
    election = Election(store, config.instance_id, config.lease_ttl)
    controller = Controller(store, fence=election.fence())
    campaign: asyncio.Task[None] | None = None

    async def on_start(address: str) -> dict[str, bytes]:
        nonlocal campaign
        # Every instance serves requests; the elected one also runs the controller.
        campaign = asyncio.create_task(election.run(controller.run))
        return {}

    async def on_stop() -> None:
        if campaign is not None:
            campaign.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await campaign
        await election.resign()

    def mount(server: grpc.aio.Server) -> list[str]:
        cluster_pb2_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(core), server)
        return [cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name]

    await run_server(config, store, mount, on_start=on_start, on_stop=on_stop)
