"""Health checks end to end: a Dockerfile HEALTHCHECK built by berth's builder turns a container
healthy; a failing probe (its file removed through exec) turns one unhealthy; the cluster's
events say so; `ps` and `inspect` show it. Real registry, cluster, node agent and builder."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from berth.cli.container_cmds import container_status, docker_inspect
from berth.client import ClusterClient, NodeClient
from berth.client.cluster import Event
from berth.containers import ContainerConfig
from berth.errors import BerthClientError
from berth.health import CMD_SHELL, SECOND, HealthConfig

from .builder_cluster import BASE, BuildCluster, build_cluster
from .conftest import wait_until

pytestmark = pytest.mark.integration

__all__ = ["build_cluster"]

# Probes every 200ms: the tests wait for a few of them.
FAST = 200_000_000


class Recorder:
    """The cluster's health events of one container, read by a thread on its own connection
    while a test runs (closing the connection ends the stream)."""

    def __init__(self, address: str, container: str) -> None:
        self.events: list[Event] = []
        self._client = ClusterClient(address)
        self._stream = self._client.events(["health_status"], container=container)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(BerthClientError):
            for event in self._stream:
                self.events.append(event)

    def statuses(self) -> list[str]:
        return [e.health_status for e in self.events]

    def close(self) -> None:
        self._client.close()
        self._thread.join(10)


@pytest.fixture
def cluster(build_cluster: BuildCluster) -> Iterator[ClusterClient]:
    with ClusterClient(build_cluster.cluster.address) as client:
        yield client


def health(client: ClusterClient, name: str) -> str:
    return client.inspect(name).health.get("Status", "")


def test_a_dockerfile_healthcheck_turns_the_container_healthy(
    build_cluster: BuildCluster, cluster: ClusterClient
) -> None:
    dockerfile = (
        f"FROM {BASE}\n"
        "HEALTHCHECK --interval=200ms --timeout=2s --retries=2 CMD echo probed; test -f /tmp/ok\n"
        'CMD ["sh", "-c", "touch /tmp/ok; exec sleep 600"]\n'
    )
    build = build_cluster.build({"Dockerfile": dockerfile}, tags=["test/healthy:1"])
    assert build.error is None, build.output()
    config = build_cluster.image_config("test/healthy", "1")
    assert config["config"]["Healthcheck"] == {
        "Test": ["CMD-SHELL", "echo probed; test -f /tmp/ok"],
        "Interval": FAST,
        "Timeout": 2 * SECOND,
        "Retries": 2,
    }
    container = cluster.run(ContainerConfig("test/healthy:1", name="healthy"))
    recorder = Recorder(cluster.address, container.id)
    try:
        wait_until(lambda: health(cluster, "healthy") == "healthy", 60, "healthy")
        shown = cluster.inspect("healthy")
        assert container_status(shown).endswith("(healthy)")
        state = docker_inspect(shown)["State"]["Health"]
        assert state["FailingStreak"] == 0
        assert state["Log"][-1]["ExitCode"] == 0
        assert state["Log"][-1]["Output"] == "probed\n"
        wait_until(lambda: recorder.statuses() == ["healthy"], 30, "the healthy event")
    finally:
        recorder.close()
        cluster.remove("healthy", force=True)


def test_a_failing_probe_turns_it_unhealthy_and_the_events_say_so(
    cluster: ClusterClient,
) -> None:
    check = HealthConfig([CMD_SHELL, "test -f /tmp/ok"], interval=FAST, retries=2)
    config = ContainerConfig(
        BASE,
        name="sickly",
        command=["sh", "-c", "touch /tmp/ok; exec sleep 600"],
        health_check=check,
    )
    container = cluster.run(config)
    recorder = Recorder(cluster.address, container.id)
    try:
        wait_until(lambda: health(cluster, "sickly") == "healthy", 60, "healthy")
        assert cluster.exec("sickly", ["rm", "/tmp/ok"]).exit_code == 0
        wait_until(lambda: health(cluster, "sickly") == "unhealthy", 30, "unhealthy")
        shown = cluster.inspect("sickly")
        assert shown.state == "running"  # Docker restarts no plain container for its health
        assert container_status(shown).endswith("(unhealthy)")
        assert shown.health["FailingStreak"] == 2
        assert [e["ExitCode"] for e in shown.health["Log"][-2:]] == [1, 1]
        wait_until(
            lambda: recorder.statuses() == ["healthy", "unhealthy"], 30, "the unhealthy event"
        )
        # Healthy again once the file is back.
        assert cluster.exec("sickly", ["touch", "/tmp/ok"]).exit_code == 0
        wait_until(lambda: health(cluster, "sickly") == "healthy", 30, "healthy again")
    finally:
        recorder.close()
        cluster.remove("sickly", force=True)


def test_no_healthcheck_disables_the_images(
    build_cluster: BuildCluster, cluster: ClusterClient
) -> None:
    build = build_cluster.build(
        {"Dockerfile": f"FROM {BASE}\nHEALTHCHECK --interval=200ms CMD true\n"},
        tags=["test/checked:1"],
    )
    assert build.error is None, build.output()
    off = HealthConfig(["NONE"])
    cluster.run(
        ContainerConfig(
            "test/checked:1", name="unchecked", command=["sleep", "600"], health_check=off
        )
    )
    try:
        wait_until(lambda: cluster.inspect("unchecked").state == "running", 60, "running")
        # A few intervals later, still no health at all.
        threading.Event().wait(1.0)
        assert cluster.inspect("unchecked").health == {}
    finally:
        cluster.remove("unchecked", force=True)


def test_an_unhealthy_service_replica_is_replaced(
    build_cluster: BuildCluster, cluster: ClusterClient
) -> None:
    check = HealthConfig([CMD_SHELL, "test -f /tmp/ok"], interval=FAST, retries=2)
    template = ContainerConfig(
        BASE, command=["sh", "-c", "touch /tmp/ok; exec sleep 600"], health_check=check
    )
    cluster.create_service("checked", template, replicas=1)
    try:

        def healthy_replica() -> str:
            replicas = cluster.service_ps("checked")
            ok = [r for r in replicas if r.health.get("Status") == "healthy"]
            return ok[0].id if len(replicas) == 1 and ok else ""

        wait_until(healthy_replica, 60, "a healthy replica")
        first = healthy_replica()
        assert cluster.exec(first, ["rm", "/tmp/ok"]).exit_code == 0
        # Swarm's rule: the unhealthy replica goes, a new one takes its slot and is healthy.
        wait_until(lambda: healthy_replica() not in ("", first), 60, "a new healthy replica")
        (replica,) = cluster.service_ps("checked")
        assert replica.name == "checked.1"
    finally:
        cluster.remove_service("checked")
        # Gone from the node too before the module's node cleans up (it would race the node).
        with NodeClient(build_cluster.node.address) as node:
            wait_until(lambda: not node.list(all=True), 30, "the replicas removed")
