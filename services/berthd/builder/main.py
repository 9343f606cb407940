"""`berthd builder`: flags and wiring for the builder service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
from pathlib import Path

import grpc

from berth.builder.v1 import builder_pb2, builder_pb2_grpc
from berthd.builder.cache import CACHE_REPOSITORY, BuildCache
from berthd.builder.context import DEFAULT_MAX_FILES
from berthd.builder.executor import Builder
from berthd.builder.reaper import Reaper
from berthd.builder.runner import Runner
from berthd.builder.service import BuilderServicer
from berthd.common.config import add_common_flags, add_flag, add_peer_flag, service_config
from berthd.common.endpoints import service_address
from berthd.common.errors import InvalidArgument
from berthd.common.images import ImageStore
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.registry import RegistryApi
from berthd.common.server import run_server
from berthd.common.store import Store

DEFAULT_LISTEN = "127.0.0.1:5080"
NETWORKS = ("none", "host")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "builder", help="run the builder service (Dockerfile to image, shared step cache)"
    )
    add_common_flags(parser, "builder", DEFAULT_LISTEN)
    add_flag(
        parser,
        "--data-dir",
        default="/var/lib/berth/builder",
        scope="builder",
        help="scratch space for build contexts and the layers being made",
    )
    add_peer_flag(parser, "builder", "registry", "where images and layers go")
    add_peer_flag(parser, "builder", "cluster", "to run RUN steps")
    add_flag(
        parser,
        "--max-context-bytes",
        default=4 << 30,
        type=int,
        scope="builder",
        help="largest build context accepted, in bytes (of the stream, and of the tar once "
        "decompressed)",
    )
    add_flag(
        parser,
        "--max-context-files",
        default=DEFAULT_MAX_FILES,
        type=int,
        scope="builder",
        help="most members a build context may have",
    )
    add_flag(
        parser,
        "--run-network",
        default="none",
        scope="builder",
        help='network of RUN steps: "none", or "host" to let them reach the network',
    )
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> None:
    if args.run_network not in NETWORKS:
        raise InvalidArgument(f"--run-network must be one of {', '.join(NETWORKS)}")
    config = service_config("builder", args)
    store = Store(config.etcd, config.etcd_prefix, config.credentials.channel_credentials)
    await store.connect()
    scratch = Path(args.data_dir) / "scratch"
    # Only builds in progress live here: what a crash left behind is never resumed.
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    images = ImageStore(RegistryApi(service_address(store, "registry", args.registry)))
    cluster = ClusterApi(service_address(store, "cluster", args.cluster))
    runner = Runner(
        cluster, CACHE_REPOSITORY, network=args.run_network, instance=config.instance_id
    )
    builder = Builder(
        store,
        images,
        BuildCache(store),
        runner,
        scratch,
        args.max_context_bytes,
        args.max_context_files,
    )
    servicer = BuilderServicer(builder)
    reaper = Reaper(cluster, store, config.instance_id, lambda: set(builder.running))
    sweeping: asyncio.Task[None] | None = None

    def mount(server: grpc.aio.Server) -> list[str]:
        builder_pb2_grpc.add_BuilderServiceServicer_to_server(servicer, server)
        return [builder_pb2.DESCRIPTOR.services_by_name["BuilderService"].full_name]

    async def on_start(address: str) -> dict[str, bytes]:
        nonlocal sweeping
        # Step containers a failed removal or a killed builder left behind (reaper.py).
        sweeping = asyncio.create_task(reaper.run(), name="build container reaper")
        return {}

    async def on_stop() -> None:
        if sweeping is not None:
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping

    await run_server(config, store, mount, on_start=on_start, on_stop=on_stop)
