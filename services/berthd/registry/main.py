"""`berthd registry`: flags and wiring for the registry service."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from berth.registry.v1 import registry_pb2, registry_pb2_grpc, webhook_pb2, webhook_pb2_grpc
from berthd.common.config import add_common_flags, add_flag, service_config
from berthd.common.security.authorize import Authorizer
from berthd.common.security.tokens import TokenVerifier
from berthd.common.server import run_server
from berthd.common.store import Store
from berthd.registry.blobstore import BlobStore
from berthd.registry.core import Registry
from berthd.registry.http_api import HttpServer, OciApi, needs_tls
from berthd.registry.http_auth import HttpAuth
from berthd.registry.metadata import Metadata
from berthd.registry.service import RegistryServicer
from berthd.registry.webhook_sender import Sender, SendPolicy
from berthd.registry.webhook_service import WebhookServicer
from berthd.registry.webhooks import Webhooks

DEFAULT_LISTEN = "127.0.0.1:5050"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("registry", help="run the registry service")
    add_common_flags(parser, "registry", DEFAULT_LISTEN)
    add_flag(
        parser,
        "--data-dir",
        default="/var/lib/berth/registry",
        scope="registry",
        help="blob directory (may be shared by several registry processes)",
    )
    add_flag(
        parser,
        "--http-listen",
        default="",
        scope="registry",
        help="serve the OCI Distribution HTTP API (/v2/: docker, podman, skopeo, containerd) "
        "on host:port: plain HTTP on loopback, TLS with the instance's certificate elsewhere; "
        "default: none",
    )
    add_flag(
        parser,
        "--webhook-first-retry",
        type=float,
        default=1.0,
        scope="registry",
        help="seconds before a failed webhook delivery's first retry; doubled each retry",
    )
    add_flag(
        parser,
        "--webhook-max-retry",
        type=float,
        default=300.0,
        scope="registry",
        help="longest wait between webhook delivery attempts, in seconds",
    )
    add_flag(
        parser,
        "--webhook-max-age",
        type=float,
        default=86400.0,
        scope="registry",
        help="seconds after its event when an undelivered webhook delivery is marked failed",
    )
    parser.set_defaults(run=run)


async def run(args: argparse.Namespace) -> None:
    config = service_config("registry", args)
    store = Store(config.etcd, config.etcd_prefix, config.credentials.channel_credentials)
    await store.connect()
    source = {"addr": args.http_listen or config.listen, "instanceID": config.instance_id}
    webhooks = Webhooks(store, source)
    registry = Registry(BlobStore(Path(args.data_dir)), Metadata(store), webhooks)
    policy = SendPolicy(args.webhook_first_retry, args.webhook_max_retry, args.webhook_max_age)
    sender = Sender(webhooks, config.instance_id, policy)
    # Public repositories are pullable with no credential: the registry answers which are.
    verifier = TokenVerifier(store)
    authorizer = Authorizer(verifier, public_repository=registry.is_public)
    http: HttpServer | None = None
    http_url = ""
    if args.http_listen:
        # The same core on the same loop: one set of rules for both APIs.
        auth = await HttpAuth.load(store, authorizer, verifier)
        http = HttpServer(OciApi(registry, auth), config.credentials, needs_tls(args.http_listen))
        http_url = await http.start(args.http_listen)
        webhooks.http_url = http_url

    def mount(server: grpc.aio.Server) -> list[str]:
        servicer = RegistryServicer(registry, authorizer)
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
        webhook_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(webhooks), server)
        return [
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
            webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
        ]

    async def start(address: str) -> dict[str, bytes]:
        await sender.start()
        return {}

    async def stop() -> None:
        await sender.stop()
        if http is not None:
            await http.stop()

    await run_server(
        config,
        store,
        mount,
        on_start=start,
        on_stop=stop,
        authorizer=authorizer,
        http_url=http_url,
        on_lease=sender.on_lease,
    )
