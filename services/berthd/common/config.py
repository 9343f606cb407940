"""Command-line flags that every service shares, each with an environment-variable equivalent.

A flag `--etcd` reads its default from `BERTH_ETCD`; service-specific flags use the service name,
so `berthd registry --data-dir` defaults to `BERTH_REGISTRY_DATA_DIR`. The flag always wins.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any


def env_name(flag: str, scope: str | None = None) -> str:
    """`--data-dir` in scope `registry` -> `BERTH_REGISTRY_DATA_DIR`."""
    parts = ["BERTH"] + ([scope] if scope else []) + [flag.lstrip("-")]
    return "_".join(parts).upper().replace("-", "_")


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: object = None,
    help: str,
    scope: str | None = None,
    type: type = str,
) -> None:
    """Add `flag` whose default comes from its environment variable, shown in --help."""
    var = env_name(flag, scope)
    raw = os.environ.get(var)
    value = type(raw) if raw is not None else default
    parser.add_argument(flag, default=value, type=type, help=f"{help} [env {var}]")


def add_peer_flag(parser: argparse.ArgumentParser, scope: str, peer: str, purpose: str) -> None:
    """--<peer>: the address of another berth service this one calls (`purpose` says what
    for); by default the first instance registered in etcd (berthd.common.endpoints)."""
    add_flag(
        parser,
        f"--{peer}",
        default="",
        scope=scope,
        help=f"{peer} service address host:port, {purpose} (default: the first one registered "
        "in etcd)",
    )


@dataclass
class ServiceConfig:
    """What the server bootstrap needs from any service's flags."""

    service: str
    listen: str
    metrics_listen: str
    etcd: str
    etcd_prefix: str
    advertise: str | None = None
    instance_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    )
    lease_ttl: int = 10
    drain_seconds: float = 10.0
    ready_file: str | None = None
    log_level: str = "info"
    # berthd.common.security.tls.InstanceCredentials: this instance's certificate (TLS is
    # required: every gRPC port and etcd).
    credentials: Any = None
    # Who this instance is in its certificate: service:<name>, or node:<id>.
    identity: str = ""
    # A second port for callers without a client certificate: TLS, and a bearer token in the
    # metadata or no credential at all (anonymous). Empty: none.
    public_listen: str = ""


def add_common_flags(parser: argparse.ArgumentParser, service: str, default_listen: str) -> None:
    """Flags every service takes: where to listen, etcd, metrics, draining, readiness.

    Addresses are per service (BERTH_REGISTRY_LISTEN), so one shell can configure several
    services; etcd and logging settings are shared (BERTH_ETCD).
    """
    add_flag(
        parser,
        "--listen",
        default=default_listen,
        scope=service,
        help="gRPC listen address host:port",
    )
    add_flag(
        parser,
        "--public-listen",
        default="",
        scope=service,
        help="a second gRPC address for callers without a client certificate: TLS with a "
        "bearer token, or anonymous (public repositories, health); default: none",
    )
    add_flag(
        parser,
        "--advertise",
        scope=service,
        help="address other processes use to reach this one (default: the listen address)",
    )
    add_flag(
        parser,
        "--metrics-listen",
        default="127.0.0.1:0",
        scope=service,
        help="Prometheus HTTP listen address host:port (port 0 picks a free one)",
    )
    add_flag(parser, "--etcd", default="127.0.0.1:2379", help="etcd client endpoint host:port")
    add_flag(parser, "--etcd-prefix", default="/berth/", help="key prefix for all berth keys")
    add_flag(parser, "--lease-ttl", default=10, type=int, help="endpoint lease TTL in seconds")
    add_flag(
        parser,
        "--drain-seconds",
        default=10.0,
        type=float,
        help="on SIGTERM, how long in-flight calls may finish",
    )
    add_flag(
        parser,
        "--ready-file",
        scope=service,
        help="write a JSON file with the bound addresses once serving",
    )
    add_flag(parser, "--log-level", default="info", help="debug, info, warning or error")
    from berthd.common.security.tls import add_tls_flags

    add_tls_flags(parser, service)


def service_config(service: str, args: argparse.Namespace) -> ServiceConfig:
    from berthd.common.security.tls import InstanceCredentials, hosts_for

    node_id = getattr(args, "node_id", None)
    identity = f"node:{node_id}" if service == "node" and node_id else f"service:{service}"
    credentials = InstanceCredentials(
        identity,
        hosts_for(
            args.listen, args.advertise, args.public_listen, getattr(args, "http_listen", "")
        ),
        ca_path=args.tls_ca,
        cert_path=args.tls_cert,
        key_path=args.tls_key,
        ca_key_path=args.tls_ca_key,
        lifetime=args.tls_lifetime,
    )
    from berthd.common.rpc import channels

    # Every channel this process opens to another service presents this certificate, also
    # those made before the server starts.
    channels.configure(credentials)
    return ServiceConfig(
        credentials=credentials,
        identity=identity,
        service=service,
        listen=args.listen,
        public_listen=args.public_listen,
        advertise=args.advertise,
        metrics_listen=args.metrics_listen,
        etcd=args.etcd,
        etcd_prefix=args.etcd_prefix,
        lease_ttl=args.lease_ttl,
        drain_seconds=args.drain_seconds,
        ready_file=args.ready_file,
        log_level=args.log_level,
    )


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected host:port")
    return host.strip("[]"), int(port)
