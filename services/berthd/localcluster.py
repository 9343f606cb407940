"""`berthd up | down | status | start | stop | restart | kill-node | start-node`: a local cluster
for development.

`up` starts etcd (the Debian binary, data under the state directory) and every berth service as
background processes, `--nodes N` node agents among them (`node-1` .. `node-N`, each with its own
data directory `<state>/node-K`, ports, runc root and cgroup parent `/berth/node-K`, the label
`host=node-K`, and a `--node-lease-ttl` lease (3 s) so a dead one is noticed soon; all on
loopback), waits until each is healthy, and records them in `<state>/cluster.json`, the file the
`berth` CLI reads when no address is given. `down` removes every service and container (through
the cluster, then on each node; a killed node's containers with runc), then stops the processes
by pid (checking the pid still runs what we started) and the agents' watchdogs by the pid in
their data directories; `status` health-checks them. `kill-node` simulates a host death
(SIGKILL of an agent, its watchdog, its conmons and every process in its cgroups; its nftables
table deleted),
`start-node` brings the host back with the same command line. `stop`, `start` and `restart` do
the same for any one component (etcd, a service, a node agent) and record the new pid, so `down`
stops what runs.

Port plan, from `--base-port` N: etcd client N, peer N+1; the registry's OCI HTTP API (/v2/,
plain HTTP on loopback) N+5; service i of SERVICES gRPC N+10+2i and
metrics N+11+2i (N+10..N+39 are kept for services); node-1 is the "node" service (N+12, N+13);
node-K for K >= 2 at N+40+2(K-2) and N+41+2(K-2).

TLS: `up` makes the cluster CA in `<state>/tls` (`ca.crt`, `ca.key`) on first use, and there
the certificates of everything it starts (`etcd`, one per service and node agent) plus the
`user:admin` client certificate the CLI picks up (`client.crt`, `client.key`); all mode 0600.
etcd serves https with `--client-cert-auth`; every service gets `--tls-ca`, `--tls-cert`,
`--tls-key` and `--tls-ca-key`, so it renews its own certificate at two thirds of its life.

cluster.json: {"state_dir", "prefix", "etcd": {...}, "services": {"registry", "node", "cluster",
"image", "builder"}, "nodes": {"node-1": {...}, ...}}; each process entry has address, metrics,
pid, marker (an argument only this cluster's process has: its ready file, etcd's data directory;
a recorded pid counts as the process only while the marker is one of its arguments), log and
argv (the command line `start` runs again), and each node also data_dir.
services.node is node-1: what
single-host clients use.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.client import NodeClient
from berth.cluster.v1 import cluster_pb2, cluster_pb2_grpc
from berth.config import default_state_dir
from berth.errors import BerthClientError
from berth.files import atomic_write
from berth.tls import CA_FILE, CLIENT_CERT, CLIENT_KEY, TLS_DIR, plaintext_mode, secure_channel
from berthd.common.security.ca import (
    CA_KEY,
    DEFAULT_LIFETIME,
    CertificateAuthority,
    ensure_ca,
    validity,
)
from berthd.node.network import sweep_offline, table_name
from berthd.node.watchdog import kill_watchdog

CLUSTER_FILE = "cluster.json"
DEFAULT_BASE_PORT = 23790
STOP_TIMEOUT = 15.0
# Node agents started by `up` hold short leases, so a killed node is noticed within seconds.
DEFAULT_NODE_LEASE_TTL = 3
MAX_NODES = 100
# Ports base+10 .. base+29 are kept for the services (10 of them), base+30 .. base+39 for their
# public ports; extra node agents sit above.
PUBLIC_PORTS_OFFSET = 30
# The registry's OCI Distribution HTTP API (docker, podman, skopeo, containerd).
REGISTRY_HTTP_OFFSET = 5
EXTRA_NODES_OFFSET = 40
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Ports:
    """Every port is an offset from one base, so a second cluster needs one flag.

    etcd client N, etcd peer N+1; berth service i (in SERVICES order) N+10+2i (gRPC) and
    N+11+2i (metrics), and N+30+i its public port (token and anonymous callers; node agents
    have none); node-1 is the "node" service; node-K (K >= 2) N+40+2(K-2) and N+41+2(K-2).
    """

    base: int

    @property
    def etcd(self) -> int:
        return self.base

    @property
    def etcd_peer(self) -> int:
        return self.base + 1

    def service(self, index: int) -> tuple[int, int]:
        """(gRPC port, metrics port) of the index-th berth service."""
        return self.base + 10 + 2 * index, self.base + 11 + 2 * index

    def public(self, index: int) -> int:
        """The public port of the index-th berth service."""
        return self.base + PUBLIC_PORTS_OFFSET + index

    @property
    def registry_http(self) -> int:
        """The registry's OCI Distribution HTTP API."""
        return self.base + REGISTRY_HTTP_OFFSET

    def node(self, number: int) -> tuple[int, int]:
        """(gRPC port, metrics port) of node agent `node-<number>`, from 1."""
        if number == 1:
            return self.service(SERVICES.index("node"))
        offset = EXTRA_NODES_OFFSET + 2 * (number - 2)
        return self.base + offset, self.base + offset + 1

    def all(self, nodes: int) -> list[int]:
        wanted = [self.etcd, self.etcd_peer, self.registry_http]
        for index, name in enumerate(SERVICES):
            wanted += self.service(index)
            if name != "node":
                wanted.append(self.public(index))
        for number in range(2, nodes + 1):
            wanted += self.node(number)
        return wanted


# The services `up` starts, in order ("node" stands for every node agent). Later issues append.
SERVICES = ["registry", "node", "cluster", "image", "builder"]


def node_id(number: int) -> str:
    return f"node-{number}"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    for name, handler, text in (
        ("up", up, "start etcd and every berth service in the background"),
        ("down", down, "remove every service and container, then stop the `berthd up` cluster"),
        ("status", status, "show the health of a cluster started with `berthd up`"),
        ("kill-node", kill_node, "simulate a host death: SIGKILL a node agent and its containers"),
        ("start-node", start_node, "start a node agent again after kill-node (the host is back)"),
        ("start", start, "start one component again (etcd, a service, node-K) as `up` did"),
        ("stop", stop, "stop one component (SIGTERM); `start` brings it back"),
        ("restart", restart, "stop one component and start it again"),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=default_state_dir(),
            help="where the cluster keeps data, logs and cluster.json [env BERTH_STATE_DIR]",
        )
        if name == "up":
            parser.add_argument(
                "--base-port",
                type=int,
                default=int(os.environ.get("BERTH_BASE_PORT", DEFAULT_BASE_PORT)),
                help=f"etcd listens here, services above it (default {DEFAULT_BASE_PORT})"
                " [env BERTH_BASE_PORT]",
            )
            parser.add_argument(
                "--nodes",
                type=int,
                default=1,
                help="node agents to start, node-1 .. node-N, each a host of its own (default 1)",
            )
            parser.add_argument(
                "--node-lease-ttl",
                type=int,
                default=DEFAULT_NODE_LEASE_TTL,
                help="lease TTL (s) of the node agents: how soon a dead node is noticed"
                f" (default {DEFAULT_NODE_LEASE_TTL})",
            )
        if name in ("kill-node", "start-node"):
            parser.add_argument("node", metavar="NODE", help="node id, such as node-2")
        if name in ("start", "stop", "restart"):
            parser.add_argument(
                "service",
                metavar="SERVICE",
                help="etcd, registry, cluster, image, builder, or a node agent (node-2; node is"
                " node-1)",
            )
        parser.set_defaults(run=handler)
    ca = commands.add_parser("ca", help="the cluster CA")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    init = ca_commands.add_parser(
        "init", help="make the cluster CA (EC P-256) and the admin certificate, if missing"
    )
    init.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="the CA goes to STATE_DIR/tls [env BERTH_STATE_DIR]",
    )
    init.set_defaults(run=ca_init)


def ca_init(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    directory = tls_dir(state)
    existed = (directory / CA_FILE).exists()
    ca = ensure_tls(state)
    subject = ca.cert.subject.rfc4514_string()
    print(f"{'kept the' if existed else 'made a'} cluster CA ({subject}) in {directory}")
    return 0


# --- processes -------------------------------------------------------------------------------


def process_alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and `marker` is still one of its arguments (pids get reused). A
    whole argument, not a part of one: `--data-dir=/s/etcd` is not `--data-dir=/s/etcd-2/etcd`."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return marker.encode() in args


def _pid_running(pid: int) -> bool:
    """A zombie counts as dead: it runs nothing any more."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # A new session: the cluster outlives the shell that started it.
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )


def _wait_for(
    check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {' | '.join(tail)}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready within 30s; see {log}")


# --- TLS -------------------------------------------------------------------------------------

# Certificates `up` issues for etcd and the admin credential live long: nothing renews them
# while the cluster runs (each `up` issues them again when a third of their life is left).
LONG_LIFETIME = datetime.timedelta(days=90)


# In <state>/tls with the other keys; only the cluster service reads it.
SECRETS_KEY = "secrets.key"


def tls_dir(state: Path) -> Path:
    return state / TLS_DIR


def ensure_tls(state: Path) -> CertificateAuthority:
    """The CA in <state>/tls and the certificates of etcd and the admin. A state directory
    without a CA adopts the one BERTH_TLS_CA and BERTH_TLS_CA_KEY name (several local clusters
    under one CA), else a new CA is made."""
    directory = tls_dir(state)
    shared_cert, shared_key = os.environ.get("BERTH_TLS_CA"), os.environ.get("BERTH_TLS_CA_KEY")
    if not (directory / CA_FILE).exists() and shared_cert and shared_key:
        CertificateAuthority.load(Path(shared_cert), Path(shared_key)).save(directory)
    ca = ensure_ca(directory)
    _ensure_cert(ca, directory, "etcd", "service:etcd", LONG_LIFETIME)
    _ensure_cert(ca, directory, "client", "user:admin", LONG_LIFETIME)
    _ensure_secrets_key(directory / SECRETS_KEY)
    return ca


def _ensure_secrets_key(path: Path) -> None:
    """The key the cluster encrypts secrets with (32 random bytes, mode 0600), made once: a
    new key would leave every stored secret unreadable."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(32))


def _ensure_cert(
    ca: CertificateAuthority,
    directory: Path,
    name: str,
    identity: str,
    lifetime: datetime.timedelta = DEFAULT_LIFETIME,
) -> None:
    """Issue <name>.crt/.key when missing or with less than a third of its life left."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    if cert.exists() and key.exists():
        not_before, not_after = validity(cert.read_bytes())
        left = not_after - datetime.datetime.now(datetime.UTC)
        if left > (not_after - not_before) / 3:
            return
    ca.issue(identity, ["127.0.0.1", "localhost"], lifetime).write(cert, key)


def use_state_credentials(state: Path) -> None:
    """This process (`berthd up/down/status`) talks to the cluster with the state directory's
    CA and admin certificate, whatever the environment names."""
    directory = tls_dir(state)
    os.environ["BERTH_TLS_CA"] = str(directory / CA_FILE)
    os.environ["BERTH_TLS_CERT"] = str(directory / CLIENT_CERT)
    os.environ["BERTH_TLS_KEY"] = str(directory / CLIENT_KEY)
    # The administrator's certificate, not a token someone logged in with.
    os.environ["BERTH_TOKEN"] = ""


def _service_health(address: str, timeout: float = 1.0) -> tuple[bool, str]:
    """(healthy, why not) from the service's gRPC health: no answer, or NOT_SERVING and
    whether that is because it cannot reach etcd (its `etcd` health entry)."""
    try:
        with secure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True, ""
            try:
                etcd = stub.Check(health_pb2.HealthCheckRequest(service="etcd"), timeout=timeout)
            except grpc.RpcError:
                return False, "not serving"
            if etcd.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return False, "not serving: cannot reach etcd"
            return False, "not serving"
    except grpc.RpcError as err:
        details = err.details() if callable(getattr(err, "details", None)) else ""
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, "no answer in time"
        # grpc's text ends with the root cause ("...: Connection refused").
        cause = (details or "").rsplit(": ", 1)[-1].strip(" []").lower()
        return False, f"no answer: {cause or err.code().name}"


def _etcd_healthy(endpoint: str) -> bool:
    """etcd's /health over https, with the admin certificate (etcd requires one)."""
    import ssl
    import urllib.request

    if plaintext_mode():
        scheme, context = "http", None
    else:
        scheme, context = "https", ssl.create_default_context(cafile=os.environ["BERTH_TLS_CA"])
        context.load_cert_chain(os.environ["BERTH_TLS_CERT"], os.environ["BERTH_TLS_KEY"])
    try:
        with urllib.request.urlopen(
            f"{scheme}://{endpoint}/health", timeout=1, context=context
        ) as reply:
            return json.loads(reply.read()).get("health") == "true"
    except OSError:
        return False


def _check_ports_free(ports: Ports, nodes: int) -> None:
    """Fail before starting anything: a health check could be answered by another cluster."""
    for port in ports.all(nodes):
        if port > 65535:
            raise RuntimeError(f"port {port} is out of range; choose a lower --base-port")
        with socket.socket() as probe:
            # Like the servers themselves: a port whose old connections linger is reusable.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise RuntimeError(
                    f"port {port} is already in use (another cluster?); "
                    "choose other ports with --base-port"
                ) from None


# etcd keeps every revision until it is compacted, and grows until its quota stops all writes.
# Periodic compaction keeps the last 5 minutes of history whatever the write rate (a revision
# count would shrink to seconds during a burst of pushes): a paged ListManifests listing stays
# valid that long, and the services' watches resynchronize when a compaction catches them.
# The quota is etcd's default, written out: berth's records are small (2.8 MiB for 2000
# repositories), so reaching it means a runaway writer, not growth.
ETCD_MAINTENANCE = (
    "--auto-compaction-mode=periodic",
    "--auto-compaction-retention=5m",
    f"--quota-backend-bytes={2 * 1024**3}",
)


def start_etcd(state: Path, ports: Ports) -> dict[str, object]:
    return _respawn_etcd(etcd_entry(state, ports))


def etcd_entry(state: Path, ports: Ports) -> dict[str, object]:
    """How the cluster of `state` runs its etcd: endpoint, log, command line and marker."""
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    tls = tls_dir(state)
    plaintext = plaintext_mode()  # benchmarks only: etcd without TLS too
    client = f"{'http' if plaintext else 'https'}://127.0.0.1:{ports.etcd}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    log = state / "logs" / "etcd.log"
    # Clients speak TLS and present a certificate from the cluster CA.
    tls_flags = [
        f"--cert-file={tls / 'etcd.crt'}",
        f"--key-file={tls / 'etcd.key'}",
        f"--trusted-ca-file={tls / CA_FILE}",
        "--client-cert-auth",
    ]
    argv = [
            binary,
            "--name=berth",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=berth={peer}",
            *([] if plaintext else tls_flags),
            *ETCD_MAINTENANCE,
            "--logger=zap",
    ]  # fmt: skip
    # The data directory is this cluster's own: two clusters on one machine (two state
    # directories) never take each other's etcd for theirs (`--name=berth` is every one's).
    marker = f"--data-dir={state / 'etcd'}"
    return {"endpoint": f"127.0.0.1:{ports.etcd}", "marker": marker, "log": str(log), "argv": argv}


def _respawn_etcd(entry: dict) -> dict:
    """Start etcd with its recorded command line; the entry with the new pid once healthy."""
    log = Path(entry["log"])
    proc = _spawn(entry["argv"], log)
    _wait_for(lambda: _etcd_healthy(entry["endpoint"]), "etcd", proc, log)
    return {**entry, "pid": proc.pid}


@dataclass
class Starting:
    """A berth process spawned but not yet ready: agents start in parallel, then are awaited."""

    name: str
    proc: subprocess.Popen[bytes]
    ready: Path
    log: Path
    argv: list[str]
    extra: dict[str, object]

    def wait(self) -> dict[str, object]:
        _wait_for(self.ready.exists, self.name, self.proc, self.log)
        info = json.loads(self.ready.read_text())
        return {
            "address": info["address"],
            **({"public_address": info["public_address"]} if info.get("public_address") else {}),
            **({"http_url": info["http_url"]} if info.get("http_url") else {}),
            "metrics": info["metrics"],
            "pid": self.proc.pid,
            "marker": f"--ready-file={self.ready}",
            "log": str(self.log),
            **self.extra,
        }


def _spawn_berthd(
    name: str,
    service: str,
    state: Path,
    ports: tuple[int, int],
    etcd: str,
    extra_args: list[str],
    extra: dict[str, object] | None = None,
) -> Starting:
    ready = state / "run" / f"{name}.json"
    ready.parent.mkdir(parents=True, exist_ok=True)
    tls = tls_dir(state)
    identity = f"node:{name}" if service == "node" else f"service:{name}"
    _ensure_cert(CertificateAuthority.load_dir(tls), tls, name, identity)
    ready.unlink(missing_ok=True)
    log = state / "logs" / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "berthd.main",
        service,
        f"--listen=127.0.0.1:{ports[0]}",
        f"--metrics-listen=127.0.0.1:{ports[1]}",
        f"--etcd={etcd}",
        f"--ready-file={ready}",
        f"--tls-ca={tls / CA_FILE}",
        f"--tls-cert={tls / f'{name}.crt'}",
        f"--tls-key={tls / f'{name}.key'}",
        # A local cluster's services renew their own certificates with the CA's key.
        f"--tls-ca-key={tls / CA_KEY}",
        *extra_args,
    ]
    return Starting(name, _spawn(argv, log), ready, log, argv, extra or {})


def start_service(name: str, index: int, state: Path, ports: Ports, etcd: str) -> dict[str, object]:
    # Each service keeps its data in its own folder of the state directory; the cluster keeps
    # everything in etcd.
    extra = [] if name == "cluster" else [f"--data-dir={state / name}"]
    if name == "cluster":
        extra.append(f"--secrets-key={tls_dir(state) / SECRETS_KEY}")
    # Token callers and anonymous pulls come in on the public port (no client certificate).
    extra.append(f"--public-listen=127.0.0.1:{ports.public(index)}")
    if name == "registry":
        # docker, podman, skopeo and containerd: plain HTTP on loopback needs no trust setup.
        extra.append(f"--http-listen=127.0.0.1:{ports.registry_http}")
    started = _spawn_berthd(name, name, state, ports.service(index), etcd, extra)
    return {**started.wait(), "argv": started.argv}


def spawn_node(number: int, state: Path, ports: Ports, etcd: str, lease_ttl: int) -> Starting:
    """Node agent `node-<number>`: a host of its own, told apart by its id, data directory
    (hence runc root and cgroup parent /berth/<id>), ports and the label host=<id>."""
    ident = node_id(number)
    data = state / ident
    args = [
        f"--data-dir={data}",
        f"--node-id={ident}",
        f"--label=host={ident}",
        f"--lease-ttl={lease_ttl}",
    ]
    return _spawn_berthd(
        ident, "node", state, ports.node(number), etcd, args, {"data_dir": str(data)}
    )


def start_nodes(count: int, state: Path, ports: Ports, etcd: str, lease_ttl: int) -> dict:
    starting = [spawn_node(n, state, ports, etcd, lease_ttl) for n in range(1, count + 1)]
    nodes: dict[str, dict[str, object]] = {}
    try:
        for item in starting:
            nodes[item.name] = {**item.wait(), "argv": item.argv}
    except RuntimeError:
        for item in starting:
            stop_process(item.proc.pid, f"--ready-file={item.ready}")
        raise
    return nodes


# --- cluster.json ----------------------------------------------------------------------------


def load(state: Path) -> dict | None:
    path = state / CLUSTER_FILE
    return json.loads(path.read_text()) if path.exists() else None


def save(state: Path, cluster: dict) -> None:
    atomic_write(state / CLUSTER_FILE, json.dumps(cluster, indent=2).encode())


def nodes_of(cluster: dict) -> dict[str, dict]:
    """Every node agent; a cluster.json from before --nodes has only services.node."""
    if "nodes" in cluster:
        return dict(cluster["nodes"])
    node = cluster.get("services", {}).get("node")
    return {"node": node} if node else {}


def processes(cluster: dict) -> list[tuple[str, dict]]:
    """The berth processes in start order, each node agent once (services.node is node-1)."""
    listed: list[tuple[str, dict]] = []
    for name, info in cluster.get("services", {}).items():
        if name == "node" and "nodes" in cluster:
            listed += list(cluster["nodes"].items())
        else:
            listed.append((name, info))
    return listed


def exports(cluster: dict) -> list[str]:
    lines = [
        f"export BERTH_STATE_DIR={cluster['state_dir']}",
        f"export BERTH_ETCD={cluster['etcd']['endpoint']}",
    ]
    for name, info in cluster["services"].items():
        lines.append(f"export BERTH_{name.upper()}={info['address']}")
    if "cluster" in cluster["services"]:
        # The CLI's one address (--host): the cluster service.
        lines.append(f"export BERTH_HOST={cluster['services']['cluster']['address']}")
    return lines


def _print_cluster(cluster: dict) -> None:
    print(f"{'etcd':10} {cluster['etcd']['endpoint']:22} pid {cluster['etcd']['pid']}")
    for name, info in processes(cluster):
        public = f"  public {info['public_address']}" if info.get("public_address") else ""
        if info.get("http_url"):
            public += f"  http {info['http_url']}"
        print(
            f"{name:10} {info['address']:22} pid {info['pid']}  metrics {info['metrics']}{public}"
        )
    print()
    print("\n".join(exports(cluster)))


# --- up --------------------------------------------------------------------------------------


def up(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    if not 1 <= args.nodes <= MAX_NODES:
        raise RuntimeError(f"--nodes must be between 1 and {MAX_NODES}, not {args.nodes}")
    existing = load(state)
    if existing and process_alive(existing["etcd"]["pid"], existing["etcd"]["marker"]):
        print(f"a cluster is already running from {state}:", file=sys.stderr)
        _print_cluster(existing)
        return 0
    state.mkdir(parents=True, exist_ok=True)
    if plaintext_mode():
        print(
            "WARNING: security is off (plaintext, no authentication): the benchmark-only mode",
            file=sys.stderr,
        )
    ensure_tls(state)
    use_state_credentials(state)
    ports = Ports(args.base_port)
    _check_ports_free(ports, args.nodes)
    cluster: dict = {"state_dir": str(state), "prefix": "/berth/", "services": {}, "nodes": {}}
    try:
        cluster["etcd"] = start_etcd(state, ports)
        etcd = cluster["etcd"]["endpoint"]
        for index, name in enumerate(SERVICES):
            if name == "node":
                cluster["nodes"] = start_nodes(args.nodes, state, ports, etcd, args.node_lease_ttl)
                # What a single-host client (`berth --node`, BERTH_NODE) talks to by default.
                cluster["services"]["node"] = cluster["nodes"][node_id(1)]
            else:
                cluster["services"][name] = start_service(name, index, state, ports, etcd)
    except RuntimeError:
        _stop_all(cluster)
        raise
    save(state, cluster)
    _print_cluster(cluster)
    return 0


# --- down ------------------------------------------------------------------------------------


def stop_process(pid: int, marker: str) -> None:
    """SIGTERM, then SIGKILL after a timeout, a process we started (checked by its marker)."""
    if not process_alive(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not process_alive(pid, marker) or not _pid_running(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _stop_many(entries: list[dict]) -> None:
    """Stop several processes at once: each may take its drain time."""
    alive = [e for e in entries if process_alive(e["pid"], e["marker"])]
    if len(alive) <= 1:
        for entry in alive:
            stop_process(entry["pid"], entry["marker"])
        return
    with ThreadPoolExecutor(len(alive)) as pool:
        list(pool.map(lambda e: stop_process(e["pid"], e["marker"]), alive))


def _stop_all(cluster: dict) -> None:
    """Reverse start order: the cluster service, the node agents (together), the registry,
    etcd last."""
    nodes = list(nodes_of(cluster).values())
    for name, info in reversed(list(cluster.get("services", {}).items())):
        if name == "node":
            _stop_many(nodes)
        else:
            stop_process(info["pid"], info["marker"])
    _stop_many(nodes)  # no-op unless `up` failed before services.node was recorded
    if "etcd" in cluster:
        stop_process(cluster["etcd"]["pid"], cluster["etcd"]["marker"])


def _remove_cluster_workloads(cluster: dict) -> None:
    """Remove every service and container through the cluster service, so the desired state
    is empty and no node agent re-creates what is removed below."""
    info = cluster.get("services", {}).get("cluster")
    if info is None or not process_alive(info["pid"], info["marker"]):
        return
    with secure_channel(info["address"]) as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        try:
            request = cluster_pb2.ListServicesRequest(page_size=1000)
            services = stub.ListServices(request, timeout=30).services
        except grpc.RpcError as err:
            services = []
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                print(f"could not list the cluster's services: {err.details()}", file=sys.stderr)
        for service in services:
            with contextlib.suppress(grpc.RpcError):
                stub.RemoveService(cluster_pb2.RemoveServiceRequest(service=service.id), timeout=60)
        try:
            containers = []
            request = cluster_pb2.ListContainersRequest(all=True, page_size=1000)
            while True:  # every page: a listing is at most 1000 containers at a time
                reply = stub.ListContainers(request, timeout=30)
                containers.extend(reply.containers)
                if not reply.next_page_token:
                    break
                request.page_token = reply.next_page_token
        except grpc.RpcError as err:
            print(f"could not list the cluster's containers: {err.details()}", file=sys.stderr)
            return

        # Nodes killed moments ago may still hold their lease: the cluster would wait for them
        # to confirm the removal. The record is deleted before that wait, so cut it short.
        dead = {
            name
            for name, node in nodes_of(cluster).items()
            if not process_alive(node["pid"], node["marker"])
        }

        def remove(container: cluster_pb2.Container) -> bool:
            request = cluster_pb2.RemoveContainerRequest(container=container.id, force=True)
            try:
                stub.RemoveContainer(request, timeout=3 if container.node_id in dead else 60)
            except grpc.RpcError as err:
                # Gone already (a removed service took it), or only the dead node's word missing.
                return err.code() == grpc.StatusCode.NOT_FOUND or container.node_id in dead
            return True

        with ThreadPoolExecutor(8) as pool:
            removed = sum(pool.map(remove, containers))
    if services or containers:
        print(f"removed {len(services)} service(s) and {removed} cluster container(s)")


def _remove_node_containers(name: str, node: dict) -> None:
    """Containers outlive their node agent by design; a local cluster going down takes its
    containers (and their overlay mounts) with it."""
    if not process_alive(node["pid"], node["marker"]):
        _force_clean_node(name, node)
        return
    try:
        with NodeClient(node["address"], timeout=30) as client:
            containers = client.list(all=True)
            for container in containers:
                with contextlib.suppress(BerthClientError):
                    client.remove(container.id, force=True)
    except BerthClientError as exc:
        print(f"could not remove {name}'s containers: {exc}", file=sys.stderr)
        return
    if containers:
        print(f"removed {len(containers)} container(s) of {name}")


def _force_clean_node(name: str, node: dict) -> None:
    """A node whose agent is dead (kill-node) cannot remove its containers: delete them with
    runc under the agent's own root and unmount their overlays."""
    data = Path(node.get("data_dir") or "")
    root = data / "runc"
    if not node.get("data_dir") or not root.is_dir():
        return
    runc = shutil.which("runc") or "/usr/sbin/runc"
    listed = subprocess.run(
        [runc, "--root", str(root), "list", "-q"], capture_output=True, text=True, check=False
    )
    ids = listed.stdout.split()
    for cid in ids:
        subprocess.run(
            [runc, "--root", str(root), "delete", "--force", cid], capture_output=True, check=False
        )
    unmounted = unmount_under(data / "containers")
    for tree in [CGROUP_ROOT / "berth" / name, *CGROUP_ROOT.glob(f"*/berth/{name}")]:
        with contextlib.suppress(OSError):  # not there, or not empty: left as it is
            tree.rmdir()
    if ids or unmounted:
        print(f"{name} is down: deleted {len(ids)} runc container(s), {len(unmounted)} mount(s)")


def unmount_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points


def down(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    use_state_credentials(state)
    cluster = load(state)
    if cluster is None:
        print(f"no cluster recorded in {state}", file=sys.stderr)
        return 0
    _remove_cluster_workloads(cluster)
    # The controller goes first: nothing may reschedule while the nodes empty and stop.
    service = cluster.get("services", {}).get("cluster")
    if service is not None:
        stop_process(service["pid"], service["marker"])
    nodes = nodes_of(cluster)
    if nodes:
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(lambda item: _remove_node_containers(*item), nodes.items()))
    _stop_all(cluster)
    # The agents' watchdogs outlive their agents by design (berthd.node.watchdog).
    for name, node in nodes.items():
        if node.get("data_dir"):
            kill_watchdog(Path(node["data_dir"]))
            # Removing containers detached them; a killed agent's are swept here.
            left = sweep_offline(Path(node["data_dir"]), name)
            if left:
                print(f"{name}: removed {', '.join(left)}")
    (state / CLUSTER_FILE).unlink(missing_ok=True)
    print(f"stopped the cluster in {state}")
    return 0


# --- status ----------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    use_state_credentials(state)
    cluster = load(state)
    if cluster is None:
        print(f"no cluster recorded in {state}; start one with `berthd up`", file=sys.stderr)
        return 1
    entries = [(name, info["address"]) for name, info in processes(cluster)]
    with ThreadPoolExecutor(max(1, len(entries))) as pool:
        checks = list(pool.map(lambda e: _service_health(e[1]), entries))
    etcd = cluster["etcd"]["endpoint"]
    etcd_ok = _etcd_healthy(etcd)
    rows = [("etcd", etcd, etcd_ok, "" if etcd_ok else "no healthy answer at /health")]
    rows += [
        (name, address, ok, why) for (name, address), (ok, why) in zip(entries, checks, strict=True)
    ]
    print(f"{'SERVICE':10} {'ADDRESS':22} STATUS")
    for name, address, healthy, why in rows:
        text = "healthy" if healthy else f"UNHEALTHY ({why})"
        print(f"{name:10} {address:22} {text}")
    return 0 if all(row[2] for row in rows) else 1


# --- kill-node / start-node ------------------------------------------------------------------


def _node_entry(state: Path, node: str) -> tuple[dict, dict]:
    cluster = load(state)
    if cluster is None:
        raise RuntimeError(f"no cluster recorded in {state}; start one with `berthd up`")
    nodes = nodes_of(cluster)
    if node not in nodes:
        raise RuntimeError(f"no node {node!r} in {state / CLUSTER_FILE}: {', '.join(nodes)}")
    return cluster, nodes[node]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup_pids(node: str, containers: list[str]) -> set[int]:
    """Every process in the cgroups of these containers of the node (/berth/<id>/<container>,
    in any hierarchy): container processes, their children, exec sessions. Only this node's
    containers: another local cluster may have a node of the same id."""
    pids: set[int] = set()
    parents = [CGROUP_ROOT / "berth" / node, *CGROUP_ROOT.glob(f"*/berth/{node}")]
    for parent in parents:
        for container in containers:
            tree = parent / container
            if not tree.is_dir():
                continue
            for procs in tree.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in procs.read_text().split())
    return pids


def _container_ids(data: Path | None) -> list[str]:
    if data is None:
        return []
    return [cdir.name for cdir in (data / "containers").glob("*") if cdir.is_dir()]


def _container_pids(node: str, data: Path | None) -> tuple[set[int], set[int]]:
    """(conmon pids, container pids) of the node's containers, from its data directory and
    their cgroups. Only pids whose process still belongs to this node are returned."""
    if data is None:
        return set(), set()
    ids = _container_ids(data)
    conmons: set[int] = set()
    containers = _cgroup_pids(node, ids)
    for container in ids:
        cdir = data / "containers" / container
        conmon = _read_pid(cdir / "conmon.pid")
        # conmon's command line names the container directory: pids get reused.
        if conmon and process_alive(conmon, str(cdir)):
            conmons.add(conmon)
        pid = _read_pid(cdir / "pidfile")
        if pid and _pid_running(pid) and f"/berth/{node}/{container}" in _proc_cgroups(pid):
            containers.add(pid)
    return conmons, containers


def _proc_cgroups(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def _sigkill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_node(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    _, node = _node_entry(state, args.node)
    # The agent first, so it cannot report its containers' deaths: a dead host says nothing.
    agent = node["pid"] if process_alive(node["pid"], node["marker"]) else None
    if agent is not None:
        os.kill(agent, signal.SIGKILL)
    data = Path(node["data_dir"]) if node.get("data_dir") else None
    # Its watchdog (berthd.node.watchdog) too: on a dead host nothing stops anything.
    watchdog = kill_watchdog(data) if data is not None else None
    conmons, containers = _container_pids(args.node, data)
    _sigkill(conmons)
    _sigkill(containers)
    victims = conmons | containers | ({agent} if agent else set())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # Children forked meanwhile (a shell loop's `sleep`) are caught by the cgroup scan.
        late = _cgroup_pids(args.node, _container_ids(data))
        _sigkill(late)
        victims |= late
        if not any(_pid_running(pid) for pid in victims):
            break
        time.sleep(0.05)
    left = sorted(pid for pid in victims if _pid_running(pid))
    if left:
        raise RuntimeError(f"{args.node}: processes {left} survived SIGKILL")
    what = f"agent pid {agent}" if agent else "agent (already dead)"
    if watchdog is not None:
        what += f", watchdog pid {watchdog}"
    if _drop_table(args.node):
        what += f", nftables table {table_name(args.node)}"
    print(
        f"killed {args.node}: {what}, {len(conmons)} conmon(s),"
        f" {len(victims) - len(conmons) - (1 if agent else 0)} container process(es)"
    )
    return 0


def _drop_table(node: str) -> bool:
    """A dead host's firewall goes with it. The agents of `berthd up` share one namespace, so
    the killed agent's table would stay in the living nodes' path with its stale routing mesh
    rules: nftables runs nat chains of one priority newest first and the first DNAT wins, so
    when its chain is the newest it keeps sending connections to its dead replicas. The agent
    writes the table again when it starts (`start-node`)."""
    if not shutil.which("nft"):
        return False
    done = subprocess.run(
        ["nft", "delete", "table", "inet", table_name(node)], capture_output=True, check=False
    )
    return done.returncode == 0


def start_node(args: argparse.Namespace) -> int:
    """`start-node NODE`: `start` for a node agent (kept for the demo and older scripts)."""
    args.service = args.node
    return start(args)


# --- start / stop / restart one component ----------------------------------------------------


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """One command at a time reads and rewrites cluster.json (a chaos test restarts several
    components at once: no pid may be lost)."""
    with open(state / "cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def components(cluster: dict) -> list[str]:
    """What `start`, `stop` and `restart` accept: etcd, each service, each node agent."""
    names = ["etcd"] if "etcd" in cluster else []
    return names + [name for name, _ in processes(cluster)]


def _component(cluster: dict, name: str) -> tuple[str, dict]:
    """(canonical name, cluster.json entry); `node` is node-1, as in services.node."""
    if name == "node" and "nodes" in cluster:
        name = node_id(1)
    if name == "etcd" and "etcd" in cluster:
        return name, cluster["etcd"]
    entry = dict(processes(cluster)).get(name)
    if entry is None:
        known = ", ".join(components(cluster))
        raise RuntimeError(f"no component {name!r} in this cluster; one of: {known}")
    return name, entry


def _record(cluster: dict, name: str, entry: dict) -> None:
    """Put a component's new entry everywhere cluster.json names it."""
    if name == "etcd":
        cluster["etcd"] = entry
        return
    if name in cluster.get("nodes", {}):
        old = cluster["nodes"][name]
        cluster["nodes"][name] = entry
        if cluster["services"].get("node", {}).get("marker") == old["marker"]:
            cluster["services"]["node"] = entry
        return
    cluster["services"][name] = entry


def _start_component(name: str, entry: dict) -> dict:
    """Start a stopped component with the command line `up` recorded; its new entry."""
    if "argv" not in entry:
        raise RuntimeError(f"{name} was recorded without its command line; run `berthd up`")
    if name == "etcd":
        return _respawn_etcd(entry)
    ready = Path(entry["marker"].removeprefix("--ready-file="))
    ready.unlink(missing_ok=True)
    log = Path(entry["log"])
    kept = {k: v for k, v in entry.items() if k in ("data_dir", "argv")}
    return Starting(name, _spawn(entry["argv"], log), ready, log, entry["argv"], kept).wait()


def _state_of(args: argparse.Namespace) -> Path:
    state: Path = args.state_dir.resolve()
    use_state_credentials(state)
    if load(state) is None:
        raise RuntimeError(f"no cluster recorded in {state}; start one with `berthd up`")
    return state


def start(args: argparse.Namespace) -> int:
    state = _state_of(args)
    with _locked(state):
        cluster = load(state) or {}
        name, entry = _component(cluster, args.service)
        if process_alive(entry["pid"], entry["marker"]) and _pid_running(entry["pid"]):
            print(f"{name} is already running (pid {entry['pid']})", file=sys.stderr)
            return 0
        entry = _start_component(name, entry)
        _record(cluster, name, entry)
        save(state, cluster)
    where = entry.get("address") or entry.get("endpoint")
    print(f"started {name}: {where} pid {entry['pid']}")
    return 0


def stop(args: argparse.Namespace) -> int:
    """SIGTERM (SIGKILL after a timeout) one component; a node agent's containers live on, as
    when an agent is stopped on a real host. cluster.json keeps its entry for `start`."""
    state = _state_of(args)
    with _locked(state):
        name, entry = _component(load(state) or {}, args.service)
        if not process_alive(entry["pid"], entry["marker"]):
            print(f"{name} is not running", file=sys.stderr)
            return 0
        stop_process(entry["pid"], entry["marker"])
    print(f"stopped {name} (pid {entry['pid']})")
    return 0


def restart(args: argparse.Namespace) -> int:
    state = _state_of(args)
    with _locked(state):
        cluster = load(state) or {}
        name, entry = _component(cluster, args.service)
        stop_process(entry["pid"], entry["marker"])
        entry = _start_component(name, entry)
        _record(cluster, name, entry)
        save(state, cluster)
    where = entry.get("address") or entry.get("endpoint")
    print(f"restarted {name}: {where} pid {entry['pid']}")
    return 0
