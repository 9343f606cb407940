"""Honest state and fencing, with a cluster service and two real node agents on loopback.

- While a node is down (its agent frozen with SIGSTOP, so its lease expires), `berth ps` and
  `berth inspect` say its containers are "Unknown (node down)" instead of repeating the node's
  last "Up"; once the agent is back, the replica the cluster moved meanwhile is gone from it.
- An agent cut off from etcd (a TCP proxy between it and etcd that we cut) stops its service
  replicas itself after --stop-after-disconnect, while the cluster runs them elsewhere: a
  partitioned host does not serve duplicates. Its standalone container runs on (off by
  default). When the link is back, nothing it stopped comes back on it.

Every wait is on the event itself, with a generous guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.client import ClusterClient, ContainerConfig, NodeClient
from berth.errors import BerthClientError
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store
from berthd.node.fence import Peers, observe

from .conftest import ServiceProcess, Services

pytestmark = pytest.mark.integration

BERTH = [sys.executable, "-m", "berth"]
# Exits at once on SIGTERM, so a stop does not wait for its grace.
LOOP = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]
GUARD = 90.0


def until(check: Callable[[], Any], what: str, timeout: float = GUARD) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.1)


class Proxy:
    """A TCP relay to etcd that the test can cut (new connections are closed at once, open
    ones torn down) and restore: a node agent behind it is cut off from etcd, and only it."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.open = True
        self.closed = False
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(etcd_endpoint: str) -> Iterator[Proxy]:
    relay = Proxy(etcd_endpoint)
    yield relay
    relay.close()


def start_node(
    services: Services, registry: ServiceProcess, tmp: Path, node_id: str, *extra: str
) -> ServiceProcess:
    return services.start(
        "node",
        f"--data-dir={tmp / node_id}",
        f"--node-id={node_id}",
        f"--registry={registry.address}",
        *extra,
    )


def ps(cluster: ServiceProcess, *args: str) -> list[dict]:
    listed = subprocess.run(
        [*BERTH, "--host", cluster.address, "ps", "-a", "--format", "json", *args],
        capture_output=True,
        env=os.environ,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def inspect(cluster: ServiceProcess, name: str) -> dict:
    shown = subprocess.run(
        [*BERTH, "--host", cluster.address, "inspect", name],
        capture_output=True,
        env=os.environ,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)[0]


def status_of(cluster: ServiceProcess, name: str) -> str:
    return next(c["status"] for c in ps(cluster) if c["name"] == name)


def running_on(address: str) -> set[str]:
    """Names of the containers a node agent runs, in its own words."""
    with NodeClient(address) as node:
        return {c.name for c in node.list(all=True) if c.state == "running"}


def replicas(cluster: ClusterClient, service: str) -> list[tuple[str, str]]:
    """(node, name) of each replica the cluster knows to run."""
    return sorted(
        (c.node_id, c.name)
        for c in cluster.service_ps(service)
        if c.state == "running" and c.node_ready
    )


def node_state(cluster: ClusterClient, node_id: str) -> str:
    return next((n.state for n in cluster.nodes() if n.id == node_id), "")


def test_a_node_that_is_down_is_unknown_and_a_cut_off_node_stops_its_replicas(
    services: Services,
    registry: ServiceProcess,
    busybox: str,
    proxy: Proxy,
    tmp_path: Path,
) -> None:
    cluster_process = services.start("cluster")
    # Node a reaches etcd only through the proxy; it stops its replicas after 6 s cut off
    # (the lease TTL of these tests is 5 s).
    a = start_node(
        services,
        registry,
        tmp_path,
        "fence-a",
        f"--etcd={proxy.address}",
        "--stop-after-disconnect=6",
    )
    nodes = [("fence-a", a)]
    try:
        with ClusterClient(cluster_process.address) as cluster:
            solo = cluster.run(ContainerConfig(busybox, name="solo", command=LOOP))
            cluster.create_service("web", ContainerConfig(busybox, command=LOOP), replicas=1)
            until(lambda: replicas(cluster, "web") == [("fence-a", "web.1")], "web.1 on a")
            until(lambda: status_of(cluster_process, "solo").startswith("Up"), "solo up")
            b = start_node(services, registry, tmp_path, "fence-b")
            nodes.append(("fence-b", b))
            until(lambda: node_state(cluster, "fence-b") == "ready", "b ready")

            # 1. The agent of a is frozen: its lease expires, its containers run on.
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                until(lambda: node_state(cluster, "fence-a") == "down", "a down")
                assert status_of(cluster_process, "solo") == "Unknown (node down)"
                shown = inspect(cluster_process, "solo")
                assert shown["State"]["Status"] == "unknown", shown["State"]
                assert shown["Node"] == {"ID": "fence-a", "Ready": False}
                assert not cluster.inspect(solo.id).node_ready
                # The cluster runs the replica on b meanwhile.
                until(lambda: replicas(cluster, "web") == [("fence-b", "web.1")], "web.1 on b")
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            # Back: a removes the replica that was moved, its standalone container is Up.
            until(lambda: "web.1" not in running_on(a.address), "a drops its old web.1")
            until(lambda: status_of(cluster_process, "solo").startswith("Up"), "solo up again")
            assert replicas(cluster, "web") == [("fence-b", "web.1")]
            assert running_on(b.address) >= {"web.1"}

            # 2. A second replica goes to a (b cordoned meanwhile), then a is cut off from etcd.
            cluster.cordon("fence-b")
            cluster.scale("web", 2)
            until(
                lambda: replicas(cluster, "web") == [("fence-a", "web.2"), ("fence-b", "web.1")],
                "web.2 on a",
            )
            cluster.activate("fence-b")
            proxy.cut()
            # a stops web.2 by itself (it cannot hear of the move), its standalone one runs on.
            until(lambda: "web.2" not in running_on(a.address), "a stops web.2 itself")
            assert "solo" in running_on(a.address)
            until(
                lambda: replicas(cluster, "web") == [("fence-b", "web.1"), ("fence-b", "web.2")],
                "web.2 moved to b",
            )
            assert "web.2" not in running_on(a.address)
            proxy.restore()
            until(lambda: node_state(cluster, "fence-a") == "ready", "a ready again")
            # Nothing it stopped comes back on it: the replica now belongs to b.
            with NodeClient(a.address) as node:
                until(
                    lambda: "web.2" not in {c.name for c in node.list(all=True)},
                    "a removes its stopped web.2",
                )
            assert replicas(cluster, "web") == [("fence-b", "web.1"), ("fence-b", "web.2")]
            assert running_on(a.address) == {"solo"}
            until(lambda: status_of(cluster_process, "solo").startswith("Up"), "solo up")
            cluster.remove_service("web")
            cluster.remove(solo.id, force=True)
    finally:
        proxy.restore()
        for _, process in nodes:
            if process.proc.poll() is None:
                os.kill(process.proc.pid, signal.SIGCONT)
            with NodeClient(process.address) as node:
                for container in node.list(all=True):
                    # Its converger may be removing it at the same moment.
                    with contextlib.suppress(BerthClientError):
                        node.remove(container.id, force=True)


async def test_an_agent_knows_a_node_that_joined_a_moment_ago(store: Store) -> None:
    """The peers a fence asks when etcd is cut off come from a watch of nodes/, not a read every
    10 s: a node that registered just before the cut is asked (with the periodic read, an agent
    that had read the nodes before it joined knew nobody, and a cut-off host never fenced)."""
    peers = Peers("a")
    follower = asyncio.create_task(peers.follow(store))
    try:
        deadline = time.monotonic() + GUARD
        await NODES.put(store, "c", NodeRecord("c", address="127.0.0.1:3"))
        while peers.known != {"c": "127.0.0.1:3"}:
            assert time.monotonic() < deadline, peers.known
            await asyncio.sleep(0.05)
        await observe(store, "a", peers)  # a check while etcd answers reads nothing more
        await NODES.put(store, "b", NodeRecord("b", address="127.0.0.1:2"))
        await NODES.delete(store, "c")
        while peers.known != {"b": "127.0.0.1:2"}:
            assert time.monotonic() < deadline, peers.known
            await asyncio.sleep(0.05)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
