"""The node watchdog: a fence that does not need the node agent alive.

Only the agent dies (SIGKILL): its containers live on under their conmons, its lease expires
and the cluster starts its replicas on the other node. Without a watchdog nothing stopped the
old ones, and a 3-replica service ran more than 3 until the agent came back. With it, the
agent's watchdog stops them once the node's registration has been gone for
--stop-after-disconnect; a standalone container runs on (its own, longer, limit), and the
watchdog keeps guarding it until a new agent replaces it. The new agent adopts the stopped
replicas as exited and removes them (they belong to the other node now).

Every wait is on the event itself, with a generous guard.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from berth.client import ClusterClient, ContainerConfig, NodeClient, Placement
from berth.errors import BerthClientError
from berthd.node.watchdog import watchdog_pid

from .conftest import ServiceProcess, Services
from .test_node_fencing import LOOP, node_state, replicas, running_on, start_node, until

pytestmark = pytest.mark.integration


def runc_running(data: Path) -> set[str]:
    """Ids of the containers runc runs under a node's root, whatever its agent knows."""
    listed = subprocess.run(
        ["runc", "--root", str(data / "runc"), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {c["id"] for c in json.loads(listed.stdout or "null") or [] if c["status"] == "running"}


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_dead_agents_watchdog_stops_its_replicas_once_the_cluster_moved_them(
    services: Services, registry: ServiceProcess, busybox: str, tmp_path: Path
) -> None:
    cluster_process = services.start("cluster")
    # Replicas stop 6 s after the registration is gone (the lease TTL of these tests is 5 s);
    # standalone containers only after 10 minutes: within this test, never.
    limits = ["--stop-after-disconnect=6", "--stop-standalone-after-disconnect=600"]
    data_a = tmp_path / "wd-a"
    a = start_node(services, registry, tmp_path, "wd-a", *limits)
    b = start_node(services, registry, tmp_path, "wd-b")
    agents = [a, b]
    try:
        with ClusterClient(cluster_process.address) as cluster:
            until(lambda: node_state(cluster, "wd-b") == "ready", "b ready")
            solo = cluster.run(
                ContainerConfig(busybox, name="solo", command=LOOP),
                Placement(constraints=["node.id==wd-a"]),
            )
            until(lambda: "solo" in running_on(a.address), "solo up on a")
            cluster.create_service("web", ContainerConfig(busybox, command=LOOP), replicas=3)

            def spread() -> bool:
                placed = replicas(cluster, "web")
                return len(placed) == 3 and any(node == "wd-a" for node, _ in placed)

            until(spread, "3 replicas, some on a")
            on_a = {c.id for c in cluster.service_ps("web") if c.node_id == "wd-a"}
            assert on_a <= runc_running(data_a)

            # Only the agent dies: its containers run on.
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
            until(lambda: node_state(cluster, "wd-a") == "down", "a down")
            until(
                lambda: [n for n, _ in replicas(cluster, "web")] == ["wd-b"] * 3,
                "the cluster runs the 3 replicas on b",
            )
            # The dead agent's replicas stop, its standalone container runs on.
            until(lambda: not on_a & runc_running(data_a), "a's old replicas stopped")
            assert solo.id in runc_running(data_a)
            web_on_b = {n for n in running_on(b.address) if n.startswith("web.")}
            assert len(web_on_b) == 3, web_on_b

            # The watchdog still guards the standalone container; a new agent replaces it.
            old_watchdog = watchdog_pid(data_a)
            assert old_watchdog is not None and alive(old_watchdog)
            a = start_node(services, registry, tmp_path, "wd-a", *limits)
            agents.append(a)
            assert not alive(old_watchdog)
            new_watchdog = watchdog_pid(data_a)
            assert new_watchdog is not None and new_watchdog != old_watchdog
            assert alive(new_watchdog)

            # Back, a adopts its stopped replicas as exited and removes them: they are b's.
            with NodeClient(a.address) as node:
                until(
                    lambda: not {c.id for c in node.list(all=True)} & on_a,
                    "a removes its stopped replicas",
                )
            assert running_on(a.address) == {"solo"}
            assert [n for n, _ in replicas(cluster, "web")] == ["wd-b"] * 3
            cluster.remove_service("web")
            cluster.remove(solo.id, force=True)
    finally:
        if a.proc.poll() is not None:  # the agent removes what its dead predecessor left
            a = start_node(services, registry, tmp_path, "wd-a", *limits)
            agents.append(a)
        for process in agents:
            if process.proc.poll() is not None:
                continue
            with NodeClient(process.address) as node:
                for container in node.list(all=True):
                    with contextlib.suppress(BerthClientError):  # its converger may race us
                        node.remove(container.id, force=True)
