"""`berthd image`: flags and wiring for the image service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
from pathlib import Path

import grpc

from berth.image.v1 import image_pb2, image_pb2_grpc
from berthd.common.config import add_common_flags, add_flag, add_peer_flag, service_config
from berthd.common.endpoints import service_address
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.registry import RegistryApi
from berthd.common.server import run_server
from berthd.common.store import Store
from berthd.image import metrics
from berthd.image.catalog import Catalog
from berthd.image.service import ImageServicer

DEFAULT_LISTEN = "127.0.0.1:5055"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "image", help="run the image service (catalog, commit, save/load, external push/pull)"
    )
    add_common_flags(parser, "image", DEFAULT_LISTEN)
    add_flag(
        parser,
        "--data-dir",
        default="/var/lib/berth/image",
        scope="image",
        help="scratch space for archives, imports and external transfers in progress",
    )
    add_peer_flag(parser, "image", "registry", "the catalog's names and content")
    add_peer_flag(parser, "image", "cluster", "to find a container to commit")
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> None:
    config = service_config("image", args)
    store = Store(config.etcd, config.etcd_prefix, config.credentials.channel_credentials)
    await store.connect()
    scratch = Path(args.data_dir) / "scratch"
    # Only transfers in progress live here: what a crash left behind is never resumed.
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    registry = RegistryApi(service_address(store, "registry", args.registry))
    catalog = Catalog(store, registry, scratch)
    servicer = ImageServicer(catalog, ClusterApi(service_address(store, "cluster", args.cluster)))

    refresher: asyncio.Task[None] | None = None

    def mount(server: grpc.aio.Server) -> list[str]:
        image_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
        return [image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name]

    async def on_start(address: str) -> dict[str, bytes]:
        nonlocal refresher
        # The catalog gauges follow pushes made straight to the registry too, not only ours.
        refresher = asyncio.create_task(metrics.refresh_catalog(catalog.figures))
        return {}

    async def on_stop() -> None:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await catalog.close()

    await run_server(config, store, mount, on_start=on_start, on_stop=on_stop)
