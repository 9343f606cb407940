"""Three hosts on one machine (tests/integration/hosts.py): etcd and the registry in the control
namespace, one `berthd node` per host namespace.

The test process stays in the root network namespace, which has no route to the test subnet, so
every client call runs as a small Python snippet inside a namespace (`TestNetwork.python_in`).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .hosts import REPO, HostService, TestNetwork, force_remove_containers, unmount_under

pytestmark = pytest.mark.integration

LEASE_TTL = 3
IMAGE = "test/busybox:1"

NODES = """
import asyncio, json, sys
from berthd.common.store import Store

async def main():
    store = Store(sys.argv[1], sys.argv[2])
    await store.connect()
    print(json.dumps({e.key: e.json() for e in await store.list("nodes/")}))
    await store.close()

asyncio.run(main())
"""

# Waits until a key is gone (or back); `timeout` only guards against a hang. On connecting it
# prints the TTL granted to the key's lease; once done, what that lease has left (-1: it
# expired). The clock, for the printed elapsed time only, starts at the epoch time read from
# stdin, so the snippet is connected before the test cuts the link.
WAIT_KEY = """
import asyncio, json, sys, time
from berthd.common.store import Store

async def lease_ttl(store, lease, field):
    return getattr(await store._client.get_lease_info(lease, keys=False), field) if lease else None

async def main():
    endpoint, prefix, key, want, timeout = sys.argv[1:]
    store = Store(endpoint, prefix)
    await store.connect()
    entry = await store.get(key)
    lease = entry.lease if entry else 0
    print(json.dumps({"granted": await lease_ttl(store, lease, "grantedTTL")}), flush=True)
    start = float(sys.stdin.readline())
    while (await store.get(key) is not None) != (want == "present"):
        if time.time() - start > float(timeout):
            print(json.dumps(None))
            return
        await asyncio.sleep(0.05)
    elapsed = time.time() - start
    print(json.dumps({"elapsed": elapsed, "left": await lease_ttl(store, lease, "TTL")}))
    await store.close()

asyncio.run(main())
"""

PUSH = """
import json, pathlib, sys, tempfile
from berth.client import RegistryClient
from tests.integration.images import busybox_layer, push_image

with RegistryClient(sys.argv[1]) as client, tempfile.TemporaryDirectory() as tmp:
    repository, tag = sys.argv[2].split(":")
    print(json.dumps(push_image(client, repository, tag, [busybox_layer()], pathlib.Path(tmp))))
"""

RUN = """
import json, sys
from berth.client import ContainerConfig, NodeClient

with NodeClient(sys.argv[1]) as node:
    image = node.pull(sys.argv[2])
    hello_command = ["sh", "-c", "echo hello from $(hostname)"]
    hello = node.run(ContainerConfig(sys.argv[2], command=hello_command))
    code = node.wait(hello.id)
    out = b"".join(line.data for line in node.logs(hello.id)).decode()
    node.remove(hello.id)
    sleeper = node.run(ContainerConfig(sys.argv[2], command=["sleep", "60"]))
    print(json.dumps({"digest": image.digest, "code": code, "out": out, "sleeper": sleeper.id}))
"""

REMOVE_ALL = """
import json, sys
from berth.client import NodeClient

with NodeClient(sys.argv[1], timeout=10) as node:
    ids = [c.id for c in node.list(all=True)]
    for cid in ids:
        node.remove(cid, force=True)
    print(json.dumps(ids))
"""


@dataclass
class Hosts:
    net: TestNetwork
    prefix: str
    registry: HostService
    agents: dict[str, HostService]  # node id -> agent
    run_dir: Path


def _cleanup_agents(net: TestNetwork, agents: dict[str, HostService], run_dir: Path) -> None:
    """Containers outlive their agent: remove them through it, then by runc as a fallback."""
    for agent in agents.values():
        if agent.proc.poll() is None and agent.address:
            # A failing agent must not stop the cleanup: runc below still removes containers.
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                net.python_in(agent.host, REMOVE_ALL, agent.address, timeout=20)
        agent.stop()
    for node_id in agents:
        force_remove_containers(run_dir / node_id)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    run_dir = tmp_path_factory.mktemp("hosts")
    net = TestNetwork(run_dir)
    prefix = f"/berth-hosts-{uuid.uuid4().hex[:8]}/"
    agents: dict[str, HostService] = {}
    try:
        registry = net.start_control(3, prefix).wait_ready()
        agents.update(net.start_agents(registry.address, prefix, LEASE_TTL))
        for agent in agents.values():  # started together, so their imports overlap
            agent.wait_ready()
        yield Hosts(net, prefix, registry, agents, run_dir)
    finally:
        _cleanup_agents(net, agents, run_dir)
        net.close()


def node_keys(hosts: Hosts) -> dict[str, dict]:
    return hosts.net.python_json(hosts.net.ctl, NODES, hosts.net.etcd, hosts.prefix)  # type: ignore[return-value]


def test_every_host_registers_its_node(hosts: Hosts) -> None:
    nodes = node_keys(hosts)
    assert sorted(nodes) == ["nodes/host1", "nodes/host2", "nodes/host3"]
    for n in (1, 2, 3):
        agent = hosts.agents[f"host{n}"]
        # Each agent listens on its own host's eth0 address, not on loopback.
        assert agent.address.startswith(hosts.net.address(hosts.net.host(n)) + ":")
        assert nodes[f"nodes/host{n}"]["labels"] == {"host": f"h{n}"}


def mounts_under(path: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) of the mounts below `path` in this (the host's) mount namespace."""
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            if fields.split()[4].startswith(prefix):
                found.append((fields.split()[4], rest.split()[0]))
    return found


def test_host2_pulls_from_the_registry_and_runs_busybox(hosts: Hosts) -> None:
    net = hosts.net
    digest = net.python_json(net.ctl, PUSH, hosts.registry.address, IMAGE, timeout=60)
    agent = hosts.agents["host2"]
    result = net.python_json(agent.host, RUN, agent.address, IMAGE, timeout=60)
    assert isinstance(result, dict)
    assert result["digest"] == digest
    assert result["code"] == 0
    assert result["out"].startswith("hello from ")
    # nsenter --net keeps the host's mount namespace: the rootfs overlay is visible here, and
    # only under host2's own data directory.
    data = hosts.run_dir / "host2"
    assert [fs for _, fs in mounts_under(data)] == ["overlay"]
    assert not mounts_under(hosts.run_dir / "host1")
    removed = net.python_json(agent.host, REMOVE_ALL, agent.address)
    assert removed == [result["sleeper"]]
    assert not mounts_under(data)


def test_cut_host3_its_node_key_expires_then_returns(hosts: Hosts) -> None:
    """The node key is bound to a lease of the agent's TTL: cut off, the agent cannot keep it
    alive, etcd expires it and the key goes with it; restored, the agent registers again."""
    net = hosts.net
    host3 = net.host(3)

    def watch(want: str) -> tuple[subprocess.Popen, dict]:
        argv = [sys.executable, "-c", WAIT_KEY, net.etcd, hosts.prefix, "nodes/host3", want]
        proc = subprocess.Popen(
            [*net.exec_argv(net.ctl), *argv, "60"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stdout is not None
        return proc, json.loads(proc.stdout.readline())

    def result(proc: subprocess.Popen) -> dict | None:
        out, _ = proc.communicate(f"{time.time()}\n", timeout=90)
        return json.loads(out)

    gone, before = watch("absent")
    assert before == {"granted": LEASE_TTL}  # the key lives exactly as long as this lease
    net.cut(host3)
    expired = result(gone)
    assert expired is not None, "nodes/host3 still there a minute after the cut"
    assert expired["left"] == -1  # gone because its lease expired, not deleted by anyone
    print(f"nodes/host3 gone {expired['elapsed']:.2f}s after the cut (lease TTL {LEASE_TTL}s)")
    assert sorted(node_keys(hosts)) == ["nodes/host1", "nodes/host2"]

    back, _ = watch("present")
    net.restore(host3)
    returned = result(back)
    assert returned is not None, "host3 did not register again after restore"
    print(f"nodes/host3 back {returned['elapsed']:.2f}s after the restore")
    assert sorted(node_keys(hosts)) == ["nodes/host1", "nodes/host2", "nodes/host3"]


def test_cleanup_helpers_are_idempotent(tmp_path: Path) -> None:
    net = TestNetwork(tmp_path)
    net.create(1)
    names = [net.ctl, net.host(1)]
    net.close()
    net.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    assert unmount_under(tmp_path) == []
