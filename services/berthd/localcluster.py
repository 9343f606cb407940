"""`berthd up | down | status`: a whole local cluster for development and the demo.

`up` starts etcd (the Debian binary, data under the state directory) and every berth service as
background processes, waits until each is healthy, and records them in `<state>/cluster.json`,
the file the `berth` CLI reads when no address is given. `down` stops them by pid (checking
the pid still runs what we started), `status` health-checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.client import NodeClient
from berth.config import default_state_dir
from berth.errors import BerthClientError
from berthd.common.server import write_atomically

CLUSTER_FILE = "cluster.json"
DEFAULT_BASE_PORT = 23790
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Ports:
    """Every port is an offset from one base, so a second cluster needs one flag."""

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


# The services `up` starts, in order. Later issues append to this list.
SERVICES = ["registry", "node", "cluster"]


def add_parsers(commands: argparse._SubParsersAction) -> None:
    for name, handler, text in (
        ("up", up, "start etcd and every berth service in the background"),
        ("down", down, "stop a cluster started with `berthd up`"),
        ("status", status, "show the health of a cluster started with `berthd up`"),
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
        parser.set_defaults(run=handler)


def process_alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and its command line still contains `marker` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return marker in cmdline


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


def _grpc_healthy(address: str, timeout: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _etcd_healthy(endpoint: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=1) as reply:
            return json.loads(reply.read()).get("health") == "true"
    except OSError:
        return False


def _check_ports_free(ports: Ports) -> None:
    """Fail before starting anything: a health check could be answered by another cluster."""
    wanted = [ports.etcd, ports.etcd_peer]
    for index in range(len(SERVICES)):
        wanted += ports.service(index)
    for port in wanted:
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


def start_etcd(state: Path, ports: Ports) -> dict[str, object]:
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    client = f"http://127.0.0.1:{ports.etcd}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    log = state / "logs" / "etcd.log"
    proc = _spawn(
        [
            binary,
            "--name=berth",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=berth={peer}",
            "--logger=zap",
        ],
        log,
    )
    endpoint = f"127.0.0.1:{ports.etcd}"
    _wait_for(lambda: _etcd_healthy(endpoint), "etcd", proc, log)
    return {"endpoint": endpoint, "pid": proc.pid, "marker": "--name=berth", "log": str(log)}


def start_service(name: str, index: int, state: Path, ports: Ports, etcd: str) -> dict[str, object]:
    port, metrics_port = ports.service(index)
    ready = state / "run" / f"{name}.json"
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    log = state / "logs" / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "berthd.main",
        name,
        f"--listen=127.0.0.1:{port}",
        f"--metrics-listen=127.0.0.1:{metrics_port}",
        f"--etcd={etcd}",
        f"--ready-file={ready}",
    ]
    # Each service keeps its data in its own folder of the state directory; the cluster keeps
    # everything in etcd.
    if name != "cluster":
        argv.append(f"--data-dir={state / name}")
    proc = _spawn(argv, log)
    _wait_for(ready.exists, name, proc, log)
    info = json.loads(ready.read_text())
    return {
        "address": info["address"],
        "metrics": info["metrics"],
        "pid": proc.pid,
        "marker": f"--ready-file={ready}",
        "log": str(log),
    }


def load(state: Path) -> dict | None:
    path = state / CLUSTER_FILE
    return json.loads(path.read_text()) if path.exists() else None


def exports(cluster: dict) -> list[str]:
    lines = [
        f"export BERTH_STATE_DIR={cluster['state_dir']}",
        f"export BERTH_ETCD={cluster['etcd']['endpoint']}",
    ]
    for name, info in cluster["services"].items():
        lines.append(f"export BERTH_{name.upper()}={info['address']}")
    return lines


def _print_cluster(cluster: dict) -> None:
    print(f"{'etcd':10} {cluster['etcd']['endpoint']:22} pid {cluster['etcd']['pid']}")
    for name, info in cluster["services"].items():
        print(f"{name:10} {info['address']:22} pid {info['pid']}  metrics {info['metrics']}")
    print()
    print("\n".join(exports(cluster)))


def up(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    existing = load(state)
    if existing and process_alive(existing["etcd"]["pid"], existing["etcd"]["marker"]):
        print(f"a cluster is already running from {state}:", file=sys.stderr)
        _print_cluster(existing)
        return 0
    state.mkdir(parents=True, exist_ok=True)
    ports = Ports(args.base_port)
    _check_ports_free(ports)
    cluster: dict = {"state_dir": str(state), "prefix": "/berth/", "services": {}}
    try:
        cluster["etcd"] = start_etcd(state, ports)
        for index, name in enumerate(SERVICES):
            cluster["services"][name] = start_service(
                name, index, state, ports, cluster["etcd"]["endpoint"]
            )
    except RuntimeError:
        _stop_all(cluster)
        raise
    write_atomically(state / CLUSTER_FILE, json.dumps(cluster, indent=2).encode())
    _print_cluster(cluster)
    return 0


def stop_process(pid: int, marker: str) -> None:
    """SIGTERM, then SIGKILL after a timeout, a process we started (checked by its marker)."""
    if not process_alive(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not process_alive(pid, marker):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _stop_all(cluster: dict) -> None:
    for info in reversed(list(cluster.get("services", {}).values())):
        stop_process(info["pid"], info["marker"])
    if "etcd" in cluster:
        stop_process(cluster["etcd"]["pid"], cluster["etcd"]["marker"])


def _remove_containers(cluster: dict) -> None:
    """Containers outlive their node agent by design; a local cluster going down takes its
    containers (and their overlay mounts) with it."""
    node = cluster["services"].get("node")
    if node is None or not process_alive(node["pid"], node["marker"]):
        return
    try:
        with NodeClient(node["address"], timeout=30) as client:
            containers = client.list(all=True)
            for container in containers:
                client.remove(container.id, force=True)
    except BerthClientError as exc:
        print(f"could not remove the node's containers: {exc}", file=sys.stderr)
        return
    if containers:
        print(f"removed {len(containers)} container(s)")


def down(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    cluster = load(state)
    if cluster is None:
        print(f"no cluster recorded in {state}", file=sys.stderr)
        return 0
    _remove_containers(cluster)
    _stop_all(cluster)
    (state / CLUSTER_FILE).unlink(missing_ok=True)
    print(f"stopped the cluster in {state}")
    return 0


def status(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    cluster = load(state)
    if cluster is None:
        print(f"no cluster recorded in {state}; start one with `berthd up`", file=sys.stderr)
        return 1
    rows = [("etcd", cluster["etcd"]["endpoint"], _etcd_healthy(cluster["etcd"]["endpoint"]))]
    rows += [
        (name, info["address"], _grpc_healthy(info["address"]))
        for name, info in cluster["services"].items()
    ]
    print(f"{'SERVICE':10} {'ADDRESS':22} STATUS")
    for name, address, healthy in rows:
        print(f"{name:10} {address:22} {'healthy' if healthy else 'UNHEALTHY'}")
    return 0 if all(healthy for _, _, healthy in rows) else 1
