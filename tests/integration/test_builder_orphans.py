"""A RUN step's container outlives neither its build nor its builder: the builder removes it
when the build ends, and sweeps up what a failed removal or a killed builder left behind."""

from __future__ import annotations

import signal
import threading

import pytest

from berth.client import ClusterClient, NodeClient

from .builder_cluster import BASE, Build, BuildCluster, build_cluster
from .conftest import wait_until

pytestmark = pytest.mark.integration
__all__ = ["build_cluster"]  # the module's fixture: imported so that pytest finds it

GUARD = 90  # seconds: a guard against a hang, not a promise


def build_containers(cluster: BuildCluster) -> list[str]:
    with ClusterClient(cluster.cluster.address) as client:
        return [f"{c.name}:{c.state}" for c in client.list(all=True, name="build-")]


def test_a_killed_builders_step_container_is_removed_by_the_next_builder(
    build_cluster: BuildCluster,
) -> None:
    builds: list[Build] = []
    thread = threading.Thread(
        target=lambda: builds.append(
            build_cluster.build({"Dockerfile": f"FROM {BASE}\nRUN sleep 600\n"}, tags=["t/o:1"])
        )
    )
    thread.start()
    wait_until(
        lambda: any(c.endswith(":running") for c in build_containers(build_cluster)),
        GUARD,
        "the RUN step's container running",
    )
    old = build_cluster.builder
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()
    thread.join(GUARD)
    assert builds and builds[0].error is not None  # the build died with its builder
    assert build_containers(build_cluster)  # the container it left behind
    build_cluster.builder = build_cluster.services.start(
        "builder",
        f"--data-dir={build_cluster.tmp / 'builder'}",
        f"--registry={build_cluster.registry.address}",
        f"--cluster={build_cluster.cluster.address}",
    )
    wait_until(lambda: not build_containers(build_cluster), GUARD, "the orphan removed")
    with NodeClient(build_cluster.node.address) as node:
        wait_until(lambda: node.list(all=True) == [], GUARD, "the orphan gone from its node")
