"""etcd down for everyone is not a partition: the fence holds while the peers answer.

Two node agents run a service's replicas with a short --stop-after-disconnect, and the test
kills etcd (a real process of its own) for longer than that. Nothing was moved meanwhile (the
cluster cannot write without etcd), so stopping the replicas would only turn a control-plane
outage into a data-plane one: each agent asks the other whether it is alive, it answers (and
cannot reach etcd either), and the replicas run on. When etcd returns, everything is as
before: the same replicas, on the same nodes, running. (A host that is really cut off still
fences: test_node_fencing.py.) An agent that dies during the outage leaves a watchdog that
holds the same way, and fences once etcd is back and the cluster moved its replica.

Every wait is on the event itself, with a generous guard; the one stretch of time the test
lets pass is the one in which nothing may happen (twice --stop-after-disconnect, counted from
the moment both agents logged that they hold).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from berth.client import ClusterClient, ContainerConfig, NodeClient, RegistryClient
from berth.errors import BerthClientError
from berthd.node.fence import PEERS_FILE

from .conftest import ServiceProcess, Services
from .images import busybox_layer, push_image
from .own_etcd import OwnEtcd
from .test_etcd_outage import NOT_SERVING, SERVING, health
from .test_node_fencing import LOOP, node_state, replicas, running_on, start_node, until
from .test_node_watchdog import runc_running

pytestmark = pytest.mark.integration

STOP_AFTER = 6.0  # the lease TTL of these tests is 5 s
HOLD_LINE = "peers answer: not fencing"


def logged(process: ServiceProcess, text: str) -> bool:
    return text in process.log.read_text(errors="replace")


def empty(address: str) -> bool:
    """Whether a node agent holds no container any more (its converger removed them)."""
    with NodeClient(address) as node:
        return not node.list(all=True)


def clear(agents: list[ServiceProcess]) -> None:
    """Remove what is left on the live agents, and wait until it is gone (a removal racing
    the agent's converger may fail: try again)."""
    for agent in agents:
        if agent.proc.poll() is not None:
            continue
        with NodeClient(agent.address) as node:

            def removed(node: NodeClient = node) -> bool:
                for container in node.list(all=True):
                    with contextlib.suppress(BerthClientError):
                        node.remove(container.id, force=True)
                return not node.list(all=True)

            until(removed, f"{agent.address} empty")


def knows(data: Path, peer: str) -> bool:
    """Whether a node agent has read `peer` from etcd (it remembers its peers on disk)."""
    try:
        return peer in json.loads((data / PEERS_FILE).read_text())
    except (OSError, ValueError):
        return False


def test_etcd_down_for_everyone_does_not_stop_the_replicas(
    own_etcd: OwnEtcd, own_etcd_services: Services, tmp_path: Path
) -> None:
    registry = own_etcd_services.registry()
    with RegistryClient(registry.address) as client:
        push_image(client, "test/busybox", "1", [busybox_layer()], tmp_path)
    cluster_process = own_etcd_services.start("cluster")
    limit = f"--stop-after-disconnect={STOP_AFTER:g}"
    a = start_node(own_etcd_services, registry, tmp_path, "outage-a", limit)
    b = start_node(own_etcd_services, registry, tmp_path, "outage-b", limit)
    agents = [a, b]
    try:
        with ClusterClient(cluster_process.address) as cluster:
            until(lambda: node_state(cluster, "outage-b") == "ready", "b ready")
            cluster.create_service("web", ContainerConfig("test/busybox:1", command=LOOP), 2)
            until(
                lambda: [n for n, _ in replicas(cluster, "web")] == ["outage-a", "outage-b"],
                "one replica on each node",
            )
            # Each agent has read the other from etcd: it has someone to ask.
            until(lambda: knows(tmp_path / "outage-a", "outage-b"), "a knows b")
            until(lambda: knows(tmp_path / "outage-b", "outage-a"), "b knows a")
            before = replicas(cluster, "web")
            ids = {c.id for c in cluster.service_ps("web")}
            on = {"outage-a": running_on(a.address), "outage-b": running_on(b.address)}
            assert all(any(n.startswith("web.") for n in names) for names in on.values()), on

            def unchanged() -> bool:
                assert running_on(a.address) == on["outage-a"], "a stopped its replica"
                assert running_on(b.address) == on["outage-b"], "b stopped its replica"
                return True

            own_etcd.kill()

            # Both agents find etcd gone and the other agent alive: they hold.
            for agent in agents:
                until(lambda s=agent: health(s.address, "etcd") == NOT_SERVING, "etcd away")
            for agent in agents:
                until(lambda s=agent: unchanged() and logged(s, HOLD_LINE), "the agent holds")
            # The stretch in which the old fence stopped them: nothing may stop.
            held_since = time.monotonic()
            while time.monotonic() - held_since < 2 * STOP_AFTER:
                unchanged()
                time.sleep(0.5)
            for agent in agents:
                assert not logged(agent, "stopping"), agent.log.read_text()[-3000:]

            own_etcd.start()

            for agent in agents:
                until(lambda s=agent: health(s.address, "etcd") == SERVING, "etcd back")
            until(lambda: node_state(cluster, "outage-a") == "ready", "a ready")
            until(lambda: node_state(cluster, "outage-b") == "ready", "b ready")
            until(lambda: replicas(cluster, "web") == before, "the same replicas as before")
            assert {c.id for c in cluster.service_ps("web")} == ids
            assert running_on(a.address) == on["outage-a"]
            assert running_on(b.address) == on["outage-b"]
            cluster.remove_service("web")
            for agent in agents:
                until(lambda s=agent: empty(s.address), "the replicas removed")
    finally:
        if own_etcd.proc is None or own_etcd.proc.poll() is not None:
            own_etcd.start()
        clear(agents)


def test_a_dead_agents_watchdog_holds_in_an_etcd_outage_and_fences_once_etcd_is_back(
    own_etcd: OwnEtcd, own_etcd_services: Services, tmp_path: Path
) -> None:
    """The agent dies during the outage: its watchdog asks the peers the agent remembered
    (`peers.json`) and holds; once etcd is back the dead agent's lease expires, the cluster
    moves the replica, and the watchdog stops the old one."""
    registry = own_etcd_services.registry()
    with RegistryClient(registry.address) as client:
        push_image(client, "test/busybox", "1", [busybox_layer()], tmp_path)
    cluster_process = own_etcd_services.start("cluster")
    limit = f"--stop-after-disconnect={STOP_AFTER:g}"
    data_a = tmp_path / "outage-a"
    a = start_node(own_etcd_services, registry, tmp_path, "outage-a", limit)
    b = start_node(own_etcd_services, registry, tmp_path, "outage-b", limit)
    agents = [a, b]
    try:
        with ClusterClient(cluster_process.address) as cluster:
            until(lambda: node_state(cluster, "outage-b") == "ready", "b ready")
            cluster.create_service("web", ContainerConfig("test/busybox:1", command=LOOP), 2)
            until(
                lambda: [n for n, _ in replicas(cluster, "web")] == ["outage-a", "outage-b"],
                "one replica on each node",
            )
            on_a = {c.id for c in cluster.service_ps("web") if c.node_id == "outage-a"}
            until(lambda: knows(data_a, "outage-b"), "a knows b")
            until(lambda: knows(tmp_path / "outage-b", "outage-a"), "b knows a")

            own_etcd.kill()
            until(lambda: logged(a, HOLD_LINE), "a holds")
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
            # The watchdog (its lines go to the agent's log) holds too: a second hold line.
            until(
                lambda: (
                    on_a <= runc_running(data_a)
                    and a.log.read_text(errors="replace").count(HOLD_LINE) >= 2
                ),
                "the watchdog holds",
            )
            held_since = time.monotonic()
            while time.monotonic() - held_since < 2 * STOP_AFTER:
                assert on_a <= runc_running(data_a), "the watchdog stopped a's replica"
                time.sleep(0.5)

            own_etcd.start()

            # Now a's registration is gone from a reachable etcd: the cluster moves the
            # replica, the watchdog stops the old one.
            def moved() -> bool:
                try:
                    return [n for n, _ in replicas(cluster, "web")] == ["outage-b"] * 2
                except BerthClientError:  # the cluster service finds etcd again
                    return False

            until(moved, "both replicas on b")
            until(lambda: not on_a & runc_running(data_a), "a's old replica stopped")
            cluster.remove_service("web")
            until(lambda: empty(b.address), "b's replicas removed")
    finally:
        if own_etcd.proc is None or own_etcd.proc.poll() is not None:
            own_etcd.start()
        if a.proc.poll() is not None:  # the agent removes what its dead predecessor left
            a = start_node(own_etcd_services, registry, tmp_path, "outage-a", limit)
            agents.append(a)
        clear(agents)
