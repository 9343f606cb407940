"""Networks in the multi-host harness (tests/integration/hosts.py): etcd, registry and cluster
in the control namespace, node agents in host namespaces h1 and h2. Every bridge, veth,
namespace and nftables table an agent makes lives inside its host's namespace, which this test
made; the only addresses traffic goes to are the containers' (given by the agents) and the
control namespace's bridge address (given by the harness). Containers talk within one host:
the overlay between hosts is not there yet (docs/networking.md)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berthd.node.network import table_name
from berthd.node.secrets import run_dir as run_dir_of

from .hosts import REPO, HostService, TestNetwork, force_remove_containers
from .test_hosts import PUSH, _cleanup_agents

pytestmark = pytest.mark.integration

IMAGE = "test/busybox:1"
LEASE_TTL = 3

CLIENT = """
import json, sys, time
import grpc
from berth.client import ContainerConfig, Placement
from berth.client.cluster import ClusterClient
from berth.client.networks import NetworkClient
from berth.errors import BerthClientError
from berth.error_details import from_rpc_error

ADDRESS, IMAGE = sys.argv[1], sys.argv[2]
cluster = ClusterClient(ADDRESS)
networks = NetworkClient(ADDRESS)

def failure(call, *args):
    try:
        call(*args)
    except BerthClientError as e:
        return {"code": e.code, "error": e.message, "reason": e.details.reason}
    return None

def running(name, command, network, node="host1"):
    c = cluster.run(ContainerConfig(IMAGE, name=name, command=["sh", "-c", command],
                                    network_mode=network),
                    Placement(constraints=[f"node.id=={node}"]))
    deadline = time.monotonic() + 60
    while (info := cluster.inspect(c.id)).state != "running":
        assert time.monotonic() < deadline, f"{name} is {info.state}: {info.error}"
        time.sleep(0.1)
    # Its address is reported once it runs (the status write follows the start).
    while not info.network and network not in ("none", "host"):
        assert time.monotonic() < deadline, f"{name} reports no address"
        time.sleep(0.1)
        info = cluster.inspect(c.id)
    return {"id": c.id, "network": info.network}

def out(value):
    print(json.dumps(value))
"""

# A web server whose page names the container.
SERVE = "mkdir -p /www && echo hello from $(hostname) > /www/index.html && httpd -f -p 8080 -h /www"


@dataclass
class Net:
    net: TestNetwork
    cluster: HostService
    agent: HostService
    run_dir: Path
    registry: str
    prefix: str
    agents: dict[str, HostService]

    def client(self, body: str, *args: str, timeout: float = 120) -> object:
        return self.net.python_json(
            self.net.ctl, CLIENT + body, self.cluster.address, IMAGE, *args, timeout=timeout
        )

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`berth ARGV` in the control namespace, against the cluster."""
        code = "import sys; from berth.cli.main import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [
                *self.net.exec_argv(self.net.ctl),
                *(sys.executable, "-c", code, "--host", self.cluster.address, *argv),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    def outside_server(self, name: str, port: int) -> subprocess.Popen:
        """A web server in the control namespace on the address the harness gave its bridge
        (answering "outside"): what a container reaches only through its node's forwarding
        and masquerade. The caller stops it."""
        www = self.run_dir / f"{name}-www"
        return self.net.spawn(
            self.net.ctl,
            [
                "busybox",
                "sh",
                "-c",
                f"mkdir -p {www}; echo outside > {www}/index.html; "
                f"exec busybox httpd -f -p {self.net.control_address}:{port} -h {www}",
            ],
            self.run_dir / f"{name}.log",
        )

    def in_host(self, *argv: str, host: int = 1) -> str:
        return subprocess.run(
            [*self.net.exec_argv(self.net.host(host)), *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def leftovers(net: Net) -> dict[str, list[str]]:
    """What of berth's networking is in the hosts: bridges, veths and vxlan devices, namespace
    files, nft tables, host-local leases."""
    found: dict[str, list[str]] = {"links": [], "namespaces": [], "tables": [], "leases": []}
    for n in range(1, len(net.net.hosts) + 1):
        links = [
            line.split(":")[1].strip().split("@")[0]
            for line in net.in_host("ip", "-o", "link", host=n).splitlines()
        ]
        found["links"] += [name for name in links if name.startswith(("bn-", "veth", "vx-"))]
        netns_dir = run_dir_of(net.run_dir / f"host{n}") / "netns"
        found["namespaces"] += sorted(p.name for p in netns_dir.glob("*"))
        tables = net.in_host("nft", "list", "tables", host=n).splitlines()
        found["tables"] += [t for t in tables if "berth" in t]
        ipam = net.run_dir / f"host{n}" / "network" / "ipam"
        found["leases"] += sorted(p.name for p in ipam.glob("*/*") if p.name[0].isdigit())
    return found


@pytest.fixture(scope="module")
def network_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    with started(tmp_path_factory.mktemp("networks")) as state:
        yield state


@contextlib.contextmanager
def started(
    run_dir: Path, *agent_flags: str, hosts: int = 2, cluster_flags: tuple[str, ...] = ()
) -> Iterator[Net]:
    """The cluster of these tests (`hosts` agents started with `agent_flags`, the cluster
    service with `cluster_flags`); on the way out, after the test's containers and networks
    are gone, nothing of berth's must be left."""
    net = TestNetwork(run_dir)
    prefix = f"/berth-net-{uuid.uuid4().hex[:8]}/"
    agents: dict[str, HostService] = {}
    try:
        registry = net.start_control(hosts, prefix)
        service = net.start_service(net.ctl, "cluster", *cluster_flags, prefix=prefix)
        registry.wait_ready()
        agents.update(net.start_agents(registry.address, prefix, LEASE_TTL, *agent_flags))
        service.wait_ready()
        for agent in agents.values():
            agent.wait_ready()
        net.python_json(net.ctl, PUSH, registry.address, IMAGE, timeout=60)
        state = Net(net, service, agents["host1"], Path(run_dir), registry.address, prefix, agents)
        yield state
        # After the test's containers and networks are gone: nothing of berth's in h1.
        assert leftovers(state) == {"links": [], "namespaces": [], "tables": [], "leases": []}
    finally:
        _cleanup_agents(net, agents, Path(run_dir))
        net.close()
        # Namespace files a failed test left (bind mounts under /run, not under run_dir).
        for n in range(1, hosts + 1):
            netns_dir = run_dir_of(Path(run_dir) / f"host{n}") / "netns"
            for path in netns_dir.glob("*") if netns_dir.is_dir() else []:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
                path.unlink(missing_ok=True)
            if netns_dir.is_dir():
                subprocess.run(["umount", "-l", str(netns_dir)], capture_output=True, check=False)
                netns_dir.rmdir()


def test_network_crud_and_its_errors_over_grpc_and_the_cli(network_cluster: Net) -> None:
    result = network_cluster.client(
        """
default = [(n.name, n.subnet) for n in networks.list()]
made = networks.create("front", labels={"team": "web"})
taken = failure(networks.create, "front")
overlap = failure(networks.create, "other", "10.90.8.0/24")
reserved = failure(networks.create, "host")
bad_subnet = failure(networks.create, "odd", "10.1.2.3/33")
unknown = failure(cluster.run, ContainerConfig(IMAGE, command=["true"], network_mode="nope"))
no_service = failure(cluster.create_service, "svc",
                     ContainerConfig(IMAGE, command=["true"], network_mode="nope"))
user = running("user", "sleep 600", "front")
in_use = failure(networks.remove, "front")
cluster.remove(user["id"], force=True)
removed = networks.remove(made.id[:12]).name
gone = failure(networks.get, "front")
out({"default": default, "made": [made.name, made.subnet, made.labels], "taken": taken,
     "overlap": overlap, "reserved": reserved, "bad_subnet": bad_subnet, "unknown": unknown,
     "in_use": in_use, "removed": removed, "gone": gone, "user": user,
     "no_service": no_service})
"""
    )
    assert isinstance(result, dict)
    assert result["default"] == [["berth", "10.89.0.0/16"]]
    assert result["made"] == ["front", "10.90.0.0/16", {"team": "web"}]
    assert (result["taken"]["code"], result["taken"]["reason"]) == (
        "ALREADY_EXISTS",
        "NETWORK_NAME_IN_USE",
    )
    assert result["taken"]["error"] == 'the network name "front" is already in use'
    assert (result["overlap"]["code"], result["overlap"]["reason"]) == (
        "INVALID_ARGUMENT",
        "SUBNET_OVERLAP",
    )
    assert result["overlap"]["error"] == (
        "subnet 10.90.8.0/24 overlaps network front (10.90.0.0/16)"
    )
    assert result["reserved"]["reason"] == result["bad_subnet"]["reason"] == "INVALID_NETWORK_SPEC"
    assert result["reserved"]["code"] == result["bad_subnet"]["code"] == "INVALID_ARGUMENT"
    assert result["unknown"] == {
        "code": "NOT_FOUND",
        "error": "no such network: nope",
        "reason": "NETWORK_NOT_FOUND",
    }
    assert (result["no_service"]["code"], result["no_service"]["error"]) == (
        "NOT_FOUND",
        "no such network: nope",
    )
    assert (result["in_use"]["code"], result["in_use"]["reason"]) == (
        "FAILED_PRECONDITION",
        "NETWORK_IN_USE",
    )
    assert (
        result["in_use"]["error"] == "network front is in use by container user: remove them first"
    )
    assert result["removed"] == "front"
    assert result["gone"]["code"] == "NOT_FOUND"
    # The container had an address of host1's slice (the network's first /24 is skipped).
    settings = result["user"]["network"]
    assert settings["ip_address"].startswith("10.90.1.")
    assert (settings["gateway"], settings["ip_prefix_length"]) == ("10.90.1.1", 24)

    cli = network_cluster.cli
    made = cli("network", "create", "--subnet", "10.95.0.0/16", "--internal", "cli-net")
    assert made.returncode == 0, made.stderr
    listed = cli("network", "ls")
    assert listed.stdout.splitlines()[0].split() == ["NETWORK", "ID", "NAME", "DRIVER", "SCOPE"]
    assert made.stdout.strip()[:12] in listed.stdout
    inspected = json.loads(cli("network", "inspect", "cli-net").stdout)
    assert inspected[0]["IPAM"]["Config"] == [{"Subnet": "10.95.0.0/16"}]
    assert inspected[0]["Internal"] is True
    clash = cli("network", "create", "--subnet", "10.95.3.0/24", "clash")
    assert clash.returncode == 1
    assert len(clash.stderr.strip().splitlines()) == 1
    assert "subnet 10.95.3.0/24 overlaps network cli-net (10.95.0.0/16)" in clash.stderr
    unknown = cli("run", "-d", "--network", "nope", IMAGE, "true")
    assert unknown.returncode == 125  # as `docker run` when the daemon refuses
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert "no such network: nope" in unknown.stderr
    assert cli("network", "rm", "cli-net").stdout.strip() == "cli-net"


def test_containers_reach_their_network_not_another_and_go_out_masqueraded(
    network_cluster: Net,
) -> None:
    net = network_cluster
    outside = net.outside_server("outside", 8099)
    try:
        result = net.client(
            """
SERVE, OUTSIDE = sys.argv[3], sys.argv[4]
networks.create("alpha")
networks.create("beta")
a1 = running("a1", SERVE, "alpha")
a2 = running("a2", "sleep 600", "alpha")
b1 = running("b1", "sleep 600", "beta")
def fetch(container, url):
    r = cluster.exec(container, ["wget", "-q", "-O", "-", url])
    return [r.exit_code, r.stdout.decode().strip()]
url = f"http://{a1['network']['ip_address']}:8080/"
same = fetch("a2", url)
other = fetch("b1", url)
out_alpha = fetch("a2", f"http://{OUTSIDE}:8099/")
inspect = cluster.inspect("a1").network
for c in ("a1", "a2", "b1"):
    cluster.remove(c, force=True)
networks.remove("alpha")
networks.remove("beta")
out({"same": same, "other": other, "outside": out_alpha, "inspect": inspect,
     "a1": a1, "b1": b1})
""",
            SERVE,
            net.net.control_address,
        )
    finally:
        outside.terminate()
        outside.wait(timeout=10)
    assert isinstance(result, dict)
    assert result["same"] == [0, "hello from " + result["a1"]["id"][:12]]
    # b1 cannot reach alpha: wget fails at once (rejected between the bridges).
    assert result["other"][0] != 0
    assert result["outside"] == [0, "outside"]
    assert result["inspect"]["network"] == "alpha"
    assert result["inspect"]["mac_address"]
    assert result["a1"]["network"]["network_id"] != result["b1"]["network"]["network_id"]
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}


def test_a_restarted_agent_adopts_namespaces_and_rebuilds_its_table(network_cluster: Net) -> None:
    net = network_cluster
    started = net.client(
        """
networks.create("gamma")
g1 = running("g1", sys.argv[3], "gamma")
g2 = running("g2", "sleep 600", "gamma")
out({"g1": g1})
""",
        SERVE,
    )
    assert isinstance(started, dict)
    # The agent dies; its table is lost meanwhile (as after a flush by hand).
    net.agent.proc.kill()
    net.agent.proc.wait(timeout=10)
    net.in_host("nft", "delete", "table", "inet", table_name("host1"))
    net.agent = net.agents["host1"] = net.net.start_agent(1, net.registry, net.prefix, LEASE_TTL)
    net.agent.wait_ready()
    tables = net.in_host("nft", "list", "tables")
    result = net.client(
        """
url = f"http://{sys.argv[3]}:8080/"
r = cluster.exec("g2", ["wget", "-q", "-O", "-", url])
address = cluster.inspect("g1").network["ip_address"]
for c in ("g1", "g2"):
    cluster.remove(c, force=True)
networks.remove("gamma")
out({"fetched": [r.exit_code, r.stdout.decode().strip()], "address": address})
""",
        started["g1"]["network"]["ip_address"],
    )
    assert f"table inet {table_name('host1')}" in tables.splitlines()
    assert isinstance(result, dict)
    assert result["fetched"] == [0, "hello from " + started["g1"]["id"][:12]]
    assert result["address"] == started["g1"]["network"]["ip_address"]
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}


SWEEP = """
import json, sys
from pathlib import Path
from berthd.node.network import sweep_offline
print(json.dumps(sweep_offline(Path(sys.argv[1]), sys.argv[2])))
"""


def test_berthd_down_sweeps_what_a_killed_agent_left(network_cluster: Net) -> None:
    net = network_cluster
    started = net.client(
        """
networks.create("delta")
out(running("d1", "sleep 600", "delta"))
"""
    )
    assert isinstance(started, dict)
    # As `berthd down` finds a killed node: its containers deleted by runc, its network
    # left behind; the sweep (run inside the host's namespace) takes it.
    net.agent.proc.kill()
    net.agent.proc.wait(timeout=10)
    force_remove_containers(net.run_dir / "host1")
    assert leftovers(net)["links"]
    swept = net.net.python_json(net.net.host(1), SWEEP, str(net.run_dir / "host1"), "host1")
    assert isinstance(swept, list) and any(s.startswith("bridge bn-") for s in swept)
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}
    # The agent comes back, finds its container gone and reports it; then it is removed.
    net.agent = net.agents["host1"] = net.net.start_agent(1, net.registry, net.prefix, LEASE_TTL)
    net.agent.wait_ready()
    net.client(
        """
cluster.remove("d1", force=True)
networks.remove("delta")
out(True)
"""
    )
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}


def test_a_start_that_fails_leaves_no_namespace_or_bridge(network_cluster: Net) -> None:
    net = network_cluster
    result = net.client(
        """
networks.create("eps")
c = cluster.run(ContainerConfig(IMAGE, name="broken", command=["/no/such/command"],
                                network_mode="eps"))
deadline = time.monotonic() + 60
while (info := cluster.inspect(c.id)).state not in ("exited", "create_failed"):
    assert time.monotonic() < deadline, info.state
    time.sleep(0.1)
out({"state": info.state, "reason": info.failure_reason, "network": info.network})
"""
    )
    assert isinstance(result, dict)
    assert (result["state"], result["reason"], result["network"]) == ("exited", "START_FAILED", {})
    # The container still exists; its network parts do not.
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}
    net.client('cluster.remove("broken", force=True); networks.remove("eps"); out(True)')


def test_each_host_has_its_own_slice_and_inspect_shows_the_address(network_cluster: Net) -> None:
    net = network_cluster
    result = net.client(
        """
networks.create("wide", "10.120.0.0/16")
w1 = running("w1", "sleep 600", "wide", "host1")
w2 = running("w2", "sleep 600", "wide", "host2")
slices = networks.get("wide").slices
out({"w1": w1["network"], "w2": w2["network"], "slices": slices})
"""
    )
    assert isinstance(result, dict)
    # First come, first served: host1 claimed the first free /24, host2 the next.
    assert result["slices"] == {"host1": "10.120.1.0/24", "host2": "10.120.2.0/24"}
    assert result["w1"]["ip_address"].startswith("10.120.1.")
    assert result["w2"]["ip_address"].startswith("10.120.2.")
    assert result["w2"]["gateway"] == "10.120.2.1"
    shown = json.loads(net.cli("inspect", "w2").stdout)[0]
    assert shown["HostConfig"]["NetworkMode"] == "wide"
    settings = shown["NetworkSettings"]
    assert settings["IPAddress"] == result["w2"]["ip_address"]
    assert settings["Networks"]["wide"]["Gateway"] == "10.120.2.1"
    inspected = json.loads(net.cli("network", "inspect", "wide").stdout)[0]
    assert inspected["Slices"] == result["slices"]
    net.client(
        'cluster.remove("w1", force=True); cluster.remove("w2", force=True); '
        'networks.remove("wide"); out(True)'
    )
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}


def test_an_internal_network_reaches_its_own_and_nothing_outside(network_cluster: Net) -> None:
    net = network_cluster
    outside = net.outside_server("outside-internal", 8098)
    try:
        result = net.client(
            """
SERVE, OUTSIDE = sys.argv[3], sys.argv[4]
networks.create("inner", internal=True)
i1 = running("i1", SERVE, "inner")
running("i2", "sleep 600", "inner")
def fetch(container, url):
    r = cluster.exec(container, ["wget", "-q", "-O", "-", url])
    return [r.exit_code, r.stdout.decode().strip()]
peer = fetch("i2", f"http://{i1['network']['ip_address']}:8080/")
out_of_it = fetch("i2", f"http://{OUTSIDE}:8098/")
for c in ("i1", "i2"):
    cluster.remove(c, force=True)
networks.remove("inner")
out({"peer": peer, "outside": out_of_it, "i1": i1})
""",
            SERVE,
            net.net.control_address,
        )
    finally:
        outside.terminate()
        outside.wait(timeout=10)
    assert isinstance(result, dict)
    assert result["peer"] == [0, "hello from " + result["i1"]["id"][:12]]
    assert result["outside"][0] != 0  # refused at the node, at once
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}
