"""Server bootstrap shared by every service.

One call, `run_server`, gives a service: a grpc.aio server with the observability interceptor,
the standard health service (NOT_SERVING while etcd cannot be reached: EtcdWatchdog), server
reflection (v1 and v1alpha), a Prometheus endpoint, its
endpoint key in etcd bound to a kept-alive lease, a ready file for supervisors, and a SIGTERM
that drains in-flight calls before exiting. The port speaks TLS only (mutual TLS: callers
present a certificate from the cluster CA), with the instance's certificate renewed at two
thirds of its life without a restart (berthd.common.security.tls). With --public-listen a
second port serves the same methods over TLS without a client certificate: callers there
present a bearer token or nothing (anonymous). The interceptor authorizes every call either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import disable_created_metrics, start_http_server

from berth.files import atomic_write
from berth.tls import PLAINTEXT_ENV, plaintext_mode
from berthd.common.config import ServiceConfig, split_host_port
from berthd.common.errors import Unavailable
from berthd.common.interceptor import ObservabilityInterceptor
from berthd.common.logs import setup_logging
from berthd.common.reflection import enable_reflection
from berthd.common.rpc import channels
from berthd.common.rpc.channels import close_shared
from berthd.common.security.authorize import Authorizer
from berthd.common.security.tokens import TokenVerifier
from berthd.common.state.endpoints import EndpointRecord, endpoint_key
from berthd.common.store import LeaseKeeper, Store

log = logging.getLogger("berthd.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Adds servicers to the server and returns their full names (for health and reflection).
Mount = Callable[[grpc.aio.Server], list[str]]

# The health entry that says whether this instance reaches etcd (`berthd status` reads it to
# say why a service is NOT_SERVING).
ETCD_HEALTH = "etcd"
# How often the watchdog asks etcd, and how long it waits for the answer.
ETCD_CHECK_SECONDS = 2.0
ETCD_CHECK_TIMEOUT = 2.0


class EtcdWatchdog:
    """Health follows etcd: every service needs it for every call, so while this instance
    cannot reach it, `""`, each service name and ETCD_HEALTH read NOT_SERVING (load balancers
    and `berthd status` see it); SERVING again when etcd answers."""

    def __init__(self, store: Store, health: HealthServicer, names: list[str]) -> None:
        self._store = store
        self._health = health
        self._names = ["", *names, ETCD_HEALTH]
        self.reachable = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(ETCD_CHECK_SECONDS)
            try:
                await self._store.ping(ETCD_CHECK_TIMEOUT)
            except Unavailable as exc:
                if self.reachable:
                    log.error("NOT_SERVING: %s", exc)
                    await self._set(False)
            else:
                if not self.reachable:
                    log.info("SERVING: etcd at %s answers again", self._store.endpoint)
                    await self._set(True)

    async def _set(self, reachable: bool) -> None:
        self.reachable = reachable
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if reachable
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._health.set(name, status)


def _advertised(config: ServiceConfig, port: int) -> str:
    if config.advertise:
        return config.advertise
    host, _ = split_host_port(config.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


async def run_server(
    config: ServiceConfig,
    store: Store,
    mount: Mount,
    on_start: Callable[[str], Awaitable[dict[str, bytes]]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    authorizer: Authorizer | None = None,
    http_url: str = "",
    on_lease: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and clean up.

    `on_start(address)` runs once the server listens; the keys it returns are registered in
    etcd under this instance's lease (a node's `nodes/<id>`, for example). `authorizer`
    defaults to tokens checked against etcd and no public repositories. `http_url` is an
    HTTP API the service serves on the same loop (the registry's /v2/), for its endpoint
    record and ready file. `on_lease(lease id)` is told the instance's lease each time it is
    granted (at the start, and again after one expired), for keys bound to it later.
    """
    setup_logging(config.service, config.instance_id, config.log_level)
    disable_created_metrics()  # the *_created series only add noise to every counter
    server = grpc.aio.server(
        interceptors=[
            ObservabilityInterceptor(config.service, authorizer or Authorizer(TokenVerifier(store)))
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    names = mount(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    enable_reflection([*names, health_name], server)

    credentials = config.credentials
    if credentials is None:
        raise RuntimeError("TLS is required: the service has no certificate")
    channels.configure(credentials)
    # etcd checks the client certificate at each handshake: reconnect with the renewed one.
    credentials.on_renew.append(store.reconnect)
    renewal = asyncio.create_task(credentials.keep_renewed(), name="certificate renewal")
    plaintext = plaintext_mode()
    if plaintext:
        log.warning(
            "SECURITY IS OFF: plaintext ports, every caller is the administrator "
            "(the benchmark-only mode, %s=1)",
            PLAINTEXT_ENV,
        )
    port = (
        server.add_insecure_port(config.listen)
        if plaintext
        else server.add_secure_port(config.listen, credentials.server_credentials())
    )
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.listen}")
    public_address = ""
    if config.public_listen:
        public_port = (
            server.add_insecure_port(config.public_listen)
            if plaintext
            else server.add_secure_port(
                config.public_listen, credentials.server_credentials(require_client_auth=False)
            )
        )
        if public_port == 0:
            raise RuntimeError(f"cannot listen on {config.public_listen}")
        host, _ = split_host_port(config.public_listen)
        public_address = f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{public_port}"
    metrics_host, metrics_port = split_host_port(config.metrics_listen)
    metrics_httpd, _ = start_http_server(metrics_port, addr=metrics_host)
    metrics_url = f"http://{metrics_host}:{metrics_httpd.server_port}/metrics"
    address = _advertised(config, port)

    await server.start()
    for name in ("", *names, ETCD_HEALTH):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    endpoint = EndpointRecord(
        service=config.service,
        instance=config.instance_id,
        address=address,
        public_address=public_address,
        http_url=http_url,
        metrics=metrics_url,
        pid=os.getpid(),
        version=version("berth"),
        started_at=time.time(),
    )
    keys = {endpoint_key(config.service, config.instance_id): endpoint.encode()}
    if on_start:
        keys.update(await on_start(address))
    lease = LeaseKeeper(store, config.lease_ttl, keys, on_lease)
    await lease.start()
    if config.ready_file:
        atomic_write(Path(config.ready_file), endpoint.encode())
    log.info(
        "serving",
        extra={
            "address": address,
            "public_address": public_address or "-",
            "http": http_url or "-",
            "metrics": metrics_url,
            "identity": credentials.identity,
        },
    )

    watchdog = asyncio.create_task(EtcdWatchdog(store, health, names).run(), name="etcd watchdog")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("draining", extra={"grace_seconds": config.drain_seconds})
    watchdog.cancel()
    await health.enter_graceful_shutdown()
    await server.stop(config.drain_seconds)
    renewal.cancel()
    if on_stop:
        await on_stop()
    # After the server stopped and the service's own shutdown: no outgoing call is in flight.
    await close_shared()
    await lease.stop()
    await store.close()
    metrics_httpd.shutdown()
    log.info("stopped")
