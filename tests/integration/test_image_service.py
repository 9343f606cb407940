"""The image service end to end: a `berthd image` process over a registry, a cluster and two
node agents (two hosts, each with its own layer store), driven through the typed client.

Commit on one host and run the result on the other; remove one of two images sharing layers
and run the other; load what skopeo wrote and run it; pull what skopeo pushed to Debian's
docker-registry and run it; bad references and unknown images fail with clear errors.
"""

from __future__ import annotations

import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berth.client import ClusterClient, ContainerConfig, ImageClient, NodeClient, Placement
from berth.errors import BerthClientError

from .conftest import NodeProcess, ServiceProcess, Services, wait_until
from .docker_registry import DockerRegistry

pytestmark = pytest.mark.integration

HOSTS = ("host-a", "host-b")


@dataclass
class ImageCluster:
    images: ImageClient
    cluster: ClusterClient
    agents: dict[str, NodeProcess]
    metrics_url: str

    def metric(self, name: str) -> float:
        """A sample of the image service's /metrics, by its full name with labels."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
        return 0.0

    def run(self, image: str, command: list[str] | None = None, host: str = "") -> str:
        """Run to completion on `host` (any when empty); returns its output."""
        placement = Placement(constraints=[f"node.id=={host}"] if host else [])
        box = self.cluster.run(ContainerConfig(image, command=command or []), placement)
        try:
            code = self.cluster.wait(box.id)
            output = b"".join(line.data for line in self.cluster.logs(box.id)).decode()
            assert code == 0, f"{image} {command} exited {code}: {output}"
            return output
        finally:
            self.cluster.remove(box.id, force=True)

    def start(self, image: str, script: str, host: str) -> str:
        """Start a long-running container on `host` that runs `script` then waits."""
        command = ["sh", "-c", f"{script}; touch /tmp/done; trap 'exit 0' TERM; sleep 600 & wait"]
        placement = Placement(constraints=[f"node.id=={host}"])
        box = self.cluster.run(ContainerConfig(image, command=command), placement)
        wait_until(lambda: self.cluster.inspect(box.id).state == "running", 60, "container")
        with NodeClient(self.agents[host].address) as node:
            wait_until(lambda: ("A", "/tmp/done") in node.changes(box.id), 30, "its script")
        return box.id


@pytest.fixture
def hosts(
    services: Services, registry: ServiceProcess, busybox: str, tmp_path: Path
) -> Iterator[ImageCluster]:
    cluster = services.start("cluster")
    agents = {
        host: NodeProcess(services, tmp_path / host, f"{host}-{uuid.uuid4().hex[:6]}", registry)
        for host in HOSTS
    }
    for agent in agents.values():
        agent.start()
    image = services.start("image", f"--data-dir={tmp_path / 'image'}")
    by_host = {agent.node_id: agent for agent in agents.values()}
    with ClusterClient(cluster.address) as c, ImageClient(image.address) as images:
        wait_until(
            lambda: sum(n.state == "ready" for n in c.nodes()) == len(HOSTS), 30, "both nodes"
        )
        try:
            yield ImageCluster(images, c, by_host, image.metrics)
        finally:
            for box in c.list(all=True):
                c.remove(box.id, force=True)
            for agent in agents.values():
                agent.cleanup()


def host_ids(hosts: ImageCluster) -> tuple[str, str]:
    first, second = sorted(hosts.agents)
    return first, second


def test_commit_on_one_host_runs_on_the_other(hosts: ImageCluster, busybox: str) -> None:
    here, there = host_ids(hosts)
    script = "echo new > /added; echo changed > /etc/motd; rm /etc/group"
    box = hosts.start(busybox, f"echo old > /etc/motd; {script}", here)
    stages: list[str] = []
    image = hosts.images.commit(
        box,
        "test/committed:1",
        author="berth tests",
        message="add, change, delete",
        pause=True,
        changes=['CMD ["cat", "/added", "/etc/motd"]'],
        progress=lambda event: stages.append(event.stage),
    )
    assert stages == sorted(stages, key=["resolve", "export", "write"].index)
    assert "export" in stages and image.repo_tags == ["test/committed:1"]
    assert hosts.metric('berth_image_commits_total{outcome="ok"}') == 1
    # The cluster reports the digest its node resolved the container's image to.
    assert hosts.cluster.inspect(box).image_digest == hosts.images.inspect(busybox).digest

    # The new CMD, the added and changed files, on a host that never saw the container.
    assert hosts.run("test/committed:1", host=there) == "new\nchanged\n"
    assert hosts.run("test/committed:1", ["sh", "-c", "test ! -e /etc/group && echo gone"], there)
    parent = hosts.images.inspect(busybox)
    history = hosts.images.history("test/committed:1")
    assert history[0].comment == "add, change, delete"
    assert history[0].layer == image.layers[-1].digest
    assert [step.layer for step in history[1:] if step.layer] == [
        layer.digest for layer in reversed(parent.layers)
    ]
    assert [layer.digest for layer in image.layers[:-1]] == [x.digest for x in parent.layers]


def test_removing_one_of_two_images_sharing_layers_leaves_the_other_runnable(
    hosts: ImageCluster, busybox: str
) -> None:
    here, there = host_ids(hosts)
    box = hosts.start(busybox, "echo two > /two", here)
    hosts.images.commit(box, "test/two:1", message="second image")
    with pytest.raises(BerthClientError, match="being used by container") as in_use:
        hosts.images.remove(busybox)  # as Docker: not while a container uses it
    assert in_use.value.reason == "IMAGE_IN_USE"
    [violation] = in_use.value.details.violations
    assert violation.subject.startswith("container/")
    hosts.cluster.remove(box, force=True)
    assert hosts.images.tag(busybox, "test/one:1")
    untagged, deleted = hosts.images.remove("test/two:1")
    assert untagged == ["test/two:1"]
    shared = {layer.digest for layer in hosts.images.inspect(busybox).layers}
    assert deleted and not shared & set(deleted)
    with pytest.raises(BerthClientError) as missing:
        hosts.images.inspect("test/two:1")
    assert missing.value.code == "NOT_FOUND"
    assert missing.value.reason == "IMAGE_NOT_FOUND"
    assert missing.value.metadata == {"image": "test/two:1"}
    hosts.images.remove(busybox)  # its other name, test/one:1, keeps the content
    assert hosts.run("test/one:1", ["sh", "-c", "echo still runs"], there) == "still runs\n"


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
def test_archives_skopeo_writes_load_and_run(
    hosts: ImageCluster, busybox: str, tmp_path: Path, transport: str
) -> None:
    ours = tmp_path / "ours.tar"
    with ours.open("wb") as out:
        hosts.images.save([busybox], "oci-archive", out)
    theirs = tmp_path / "theirs.tar"
    skopeo("copy", f"oci-archive:{ours}:1", f"{transport}:{theirs}:skopeo/made:2")
    loaded = hosts.images.load(theirs, reference="skopeo/made:2")
    assert loaded.references == ["skopeo/made:2"]
    assert hosts.metric('berth_image_saves_total{outcome="ok"}') == 1
    assert hosts.metric('berth_image_loads_total{outcome="ok"}') == 1
    _, there = host_ids(hosts)
    assert hosts.run("skopeo/made:2", ["echo", "ran"], there) == "ran\n"


def test_pull_what_skopeo_pushed_and_run_it(
    hosts: ImageCluster, busybox: str, tmp_path: Path, docker_registry: DockerRegistry
) -> None:
    archive = tmp_path / "busybox.tar"
    with archive.open("wb") as out:
        hosts.images.save([busybox], "oci-archive", out)
    remote = f"{docker_registry.address}/elsewhere/box:7"
    skopeo("copy", "--dest-tls-verify=false", f"oci-archive:{archive}:1", f"docker://{remote}")
    pulled = hosts.images.pull(remote)
    assert pulled.local_reference == "elsewhere/box:7"
    here, _ = host_ids(hosts)
    assert hosts.run("elsewhere/box:7", ["echo", "pulled"], here) == "pulled\n"

    pushed = hosts.images.push("elsewhere/box:7", f"{docker_registry.address}/back/box:8")
    seen = skopeo("inspect", "--tls-verify=false", f"docker://{docker_registry.address}/back/box:8")
    assert pushed.digest in seen


BAD_CALLS = [
    (lambda i: i.inspect("Bad:Name"), "INVALID_ARGUMENT", "invalid"),
    (lambda i: i.inspect("test/nothing:1"), "NOT_FOUND", "test/nothing:1"),
    (lambda i: i.remove("sha256:" + "0" * 64), "NOT_FOUND", "No such image"),
    (lambda i: i.tag("test/busybox:1", "127.0.0.1:5000/x:1"), "INVALID_ARGUMENT", "host"),
    (lambda i: i.history("test/busybox:nope"), "NOT_FOUND", "nope"),
    (lambda i: i.commit("no-such-container", "test/x:1"), "NOT_FOUND", "no-such-container"),
    (lambda i: i.pull("no-host/x:1"), "INVALID_ARGUMENT", "registry host"),
]


def test_bad_references_and_unknown_images(hosts: ImageCluster, busybox: str) -> None:
    for call, code, words in BAD_CALLS:
        with pytest.raises(BerthClientError) as raised:
            call(hosts.images)
        assert (raised.value.code, words in raised.value.message) == (code, True), raised.value
        assert "\n" not in raised.value.message


def skopeo(*args: str) -> str:
    done = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout
