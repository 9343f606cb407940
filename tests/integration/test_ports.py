"""Published ports and the routing mesh in the multi-host harness (tests/integration/hosts.py,
the `network_cluster` of test_networks): `run -p` answering on its host's address and on
127.0.0.1 from inside that host's namespace, a loopback-only port, UDP, `berth port`, ps and
inspect, conflicts with a berth container and with a foreign listener, and the mesh. Traffic
goes only to addresses the harness gave the namespaces, the containers' and loopback."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest

from berthd.node.network import node_tag, table_name

from . import test_networks
from .test_networks import CLIENT, SERVE, Net, leftovers

# The harness of test_networks, one instance for this module.
network_cluster = test_networks.network_cluster

pytestmark = pytest.mark.integration

FETCH = """
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if proto == "udp":
        # Connected: an ICMP port unreachable comes back as ConnectionRefusedError.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((host, port))
        s.send(b"ping\\n")
        print(s.recv(100).decode().strip())
    else:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print(data.decode().split("\\r\\n\\r\\n", 1)[1].strip())
except OSError as exc:
    print(f"error: {type(exc).__name__}")
"""

PORTS_CLIENT = (
    CLIENT
    + """
from berth.ports import PortBinding, PublishedPort

def published(name, command, ports, node="host1", network="berth"):
    c = cluster.run(ContainerConfig(IMAGE, name=name, command=["sh", "-c", command],
                                    network_mode=network, ports=ports),
                    Placement(constraints=[f"node.id=={node}"] if node else []))
    deadline = time.monotonic() + 60
    while not (info := cluster.inspect(c.id)).published:
        assert time.monotonic() < deadline, f"{name} is {info.state}: {info.error}"
        time.sleep(0.1)
    return info
"""
)


def client(net: Net, body: str, *args: str) -> object:
    return net.net.python_json(
        net.net.ctl, PORTS_CLIENT + body, net.cluster.address, "test/busybox:1", *args, timeout=120
    )


def fetch(net: Net, where: str, host: str, port: int, proto: str = "tcp") -> str:
    """What a request to host:port answers, from namespace `where`."""
    return net.net.python_in(where, FETCH, host, str(port), proto, timeout=30).strip()


def test_a_published_port_answers_on_its_host_only_where_it_is_bound(network_cluster: Net) -> None:
    net = network_cluster
    h1, h2 = net.net.host(1), net.net.host(2)
    h1_address = net.net.address(h1)
    info = client(
        net,
        """
SERVE = sys.argv[3]
web = published("web", SERVE,
                [PortBinding(8080, 8080), PortBinding(8080, 8081, "127.0.0.1"),
                 PortBinding(9000, 9000, protocol="udp"), PortBinding(8080)])
out({"ports": [str(p) for p in web.published], "id": web.id})
""",
        SERVE,
    )
    assert isinstance(info, dict)
    chosen = [p for p in info["ports"] if "->8080/tcp" in p and p.startswith("0.0.0.0:")]
    assert "0.0.0.0:8080->8080/tcp" in chosen
    assert "127.0.0.1:8081->8080/tcp" in info["ports"]
    assert "0.0.0.0:9000->9000/udp" in info["ports"]
    # `-p 8080`: the node chose a port.
    (other,) = [p for p in chosen if p != "0.0.0.0:8080->8080/tcp"]
    chosen_port = int(other.split(":")[1].split("-")[0])
    hello = "hello from " + info["id"][:12]
    try:
        # The server in the container may start a moment after the container.
        wait_for(lambda: fetch(net, h1, net.net.address(h1), 8080) == hello)
        # From another namespace, to the host's address; and from the host itself, to its own
        # address and to 127.0.0.1.
        assert fetch(net, net.net.ctl, h1_address, 8080) == hello
        assert fetch(net, h2, h1_address, chosen_port) == hello
        assert fetch(net, h1, h1_address, 8080) == hello
        assert fetch(net, h1, "127.0.0.1", 8080) == hello
        assert fetch(net, h1, "127.0.0.1", 8081) == hello
        # The loopback-only port is not on the host's address.
        assert fetch(net, net.net.ctl, h1_address, 8081).startswith("error")
        # UDP reaches the container, where nothing listens on 9000: its ICMP port unreachable
        # comes back (without the DNAT the agent's socket holding 9000 would swallow it).
        assert fetch(net, net.net.ctl, h1_address, 9000, "udp") == "error: ConnectionRefusedError"
        # Nothing published on host2.
        assert fetch(net, net.net.ctl, net.net.address(h2), 8080).startswith("error")

        port = net.cli("port", "web")
        assert port.returncode == 0, port.stderr
        assert port.stdout.splitlines() == [
            "8080/tcp -> 0.0.0.0:8080",
            "8080/tcp -> 127.0.0.1:8081",
            "9000/udp -> 0.0.0.0:9000",
            f"8080/tcp -> 0.0.0.0:{chosen_port}",
        ]
        one = net.cli("port", "web", "9000/udp")
        assert one.stdout == "0.0.0.0:9000\n"
        missing = net.cli("port", "web", "81")
        assert missing.returncode == 1
        assert "No public port '81/tcp' published for web" in missing.stderr
        ps = net.cli("ps")
        assert "0.0.0.0:8080->8080/tcp, 127.0.0.1:8081->8080/tcp" in ps.stdout
        inspected = json.loads(net.cli("inspect", "web").stdout)[0]
        assert inspected["NetworkSettings"]["Ports"]["9000/udp"] == [
            {"HostIp": "", "HostPort": "9000"}
        ]
        assert inspected["HostConfig"]["PortBindings"]["8080/tcp"] == [
            {"HostIp": "", "HostPort": "8080"},
            {"HostIp": "127.0.0.1", "HostPort": "8081"},
            {"HostIp": "", "HostPort": ""},
        ]
    finally:
        net.cli("rm", "-f", "web")
    # Released with the container: the rules and the held sockets.
    assert fetch(net, h1, "127.0.0.1", 8080).startswith("error")
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}


def test_a_taken_port_moves_the_container_or_fails_with_port_allocated(
    network_cluster: Net,
) -> None:
    net = network_cluster
    h2 = net.net.host(2)
    # A process of host2 that is not berth's listens on 8090.
    foreign = net.net.spawn(
        h2,
        [
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8090));"
            " s.listen(); time.sleep(600)",
        ],
        net.run_dir / "foreign.log",
    )
    try:
        time.sleep(0.5)
        result = client(
            net,
            """
SERVE = sys.argv[3]
first = published("first", SERVE, [PortBinding(8080, 8070)])
# No node given: the scheduler puts it where 8070 is free.
second = published("second", SERVE, [PortBinding(8080, 8070)], node="")
third = failure(cluster.run, ContainerConfig(IMAGE, name="third", command=["sleep", "60"],
                network_mode="berth", ports=[PortBinding(8080, 8070)]))
taken_h1 = failure(cluster.run, ContainerConfig(IMAGE, name="fourth", command=["sleep", "60"],
                   network_mode="berth", ports=[PortBinding(8080, 8070)]),
                   Placement(constraints=["node.id==host1"]))
service = cluster.create_service("mesh", ContainerConfig(IMAGE, command=["sleep", "600"],
                                 network_mode="berth"), 0, ports=[PublishedPort(80, 8075)])
clash = failure(cluster.create_service, "mesh2", ContainerConfig(IMAGE, command=["true"],
                network_mode="berth"), 0, None, None, "", [PublishedPort(80, 8075)])
on_node = failure(cluster.create_service, "mesh3", ContainerConfig(IMAGE, command=["true"],
                  network_mode="berth"), 0, None, None, "", [PublishedPort(80, 8070)])
run_mesh = failure(cluster.run, ContainerConfig(IMAGE, command=["true"], network_mode="berth",
                   ports=[PortBinding(80, 8075)]))
no_network = failure(cluster.run, ContainerConfig(IMAGE, command=["true"],
                     ports=[PortBinding(80, 8076)]))
cluster.remove_service("mesh")
free_again = cluster.create_service("mesh4", ContainerConfig(IMAGE, command=["true"],
                                    network_mode="berth"), 0, ports=[PublishedPort(80, 8075)])
cluster.remove_service("mesh4")
out({"nodes": [first.node_id, second.node_id], "third": third, "taken_h1": taken_h1,
     "clash": clash, "on_node": on_node, "run_mesh": run_mesh, "no_network": no_network,
     "published": [str(p) for p in service.ports], "free_again": str(free_again.ports[0])})
""",
            SERVE,
        )
        # The CLI with the foreign listener: `run -d -p` reports the node's refusal.
        cli = net.cli(
            "run",
            "-d",
            "--name",
            "foreign",
            "--constraint",
            "node.id==host2",
            "-p",
            "8090:8080",
            "test/busybox:1",
            "sleep",
            "60",
        )
    finally:
        foreign.terminate()
        foreign.wait(timeout=10)
        for name in ("first", "second", "foreign"):
            net.cli("rm", "-f", name)
    assert isinstance(result, dict)
    assert sorted(result["nodes"]) == ["host1", "host2"]
    for refused in ("third", "taken_h1"):
        assert (result[refused]["code"], result[refused]["reason"]) == (
            "FAILED_PRECONDITION",
            "PORT_ALLOCATED",
        ), result[refused]
    assert "port 0.0.0.0:8070 is already allocated" in result["taken_h1"]["error"]
    assert result["published"] == ["*:8075->80/tcp"]
    assert result["clash"]["reason"] == "PORT_ALLOCATED"
    assert result["clash"]["error"] == (
        "Bind for 0.0.0.0:8075 failed: port is already allocated (another service publishes it)"
    )
    assert result["on_node"]["reason"] == "PORT_ALLOCATED"
    assert result["run_mesh"]["reason"] == "PORT_ALLOCATED"
    assert result["no_network"]["code"] == "INVALID_ARGUMENT"
    assert "published ports need a network" in result["no_network"]["error"]
    assert result["free_again"] == "*:8075->80/tcp"
    assert cli.returncode == 125
    assert "Bind for 0.0.0.0:8090 failed: port is already allocated" in cli.stderr
    assert leftovers(net) == {"links": [], "namespaces": [], "tables": [], "leases": []}


MESH = """
SERVE = sys.argv[3]
svc = cluster.create_service("web", ContainerConfig(IMAGE, command=["sh", "-c", SERVE],
                             network_mode="berth"), 1,
                             Placement(constraints=["node.id==host1"]),
                             ports=[PublishedPort(8080, 8088)])
deadline = time.monotonic() + 60
while not [c for c in cluster.service_ps("web") if c.state == "running" and c.network]:
    assert time.monotonic() < deadline, "web.1 is not running"
    time.sleep(0.1)
(replica,) = [c for c in cluster.service_ps("web") if c.state == "running"]
out({"id": replica.id, "address": replica.network["ip_address"]})
"""


def wait_for(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_mesh_answers_on_a_node_that_shares_the_replicas_namespace(
    network_cluster: Net,
) -> None:
    """Two agents in host1's namespace, as `berthd up` runs them: the second runs no replica,
    and its own table alone carries a connection to the replica on the first."""
    net = network_cluster
    h1 = net.net.host(1)
    extra = net.net.start_service(
        h1,
        "node",
        f"--data-dir={net.run_dir / 'host1b'}",
        "--node-id=host1b",
        "--label=host=h1b",
        f"--registry={net.registry}",
        prefix=net.prefix,
        name="node-h1b",
    )
    net.agents["host1b"] = extra.wait_ready()
    try:
        replica = client(net, MESH, SERVE)
        assert isinstance(replica, dict)
        hello = "hello from " + replica["id"][:12]
        other = table_name("host1b")

        def listed() -> str:
            if other not in net.in_host("nft", "list", "tables"):
                return ""
            return net.in_host("nft", "list", "table", "inet", other)

        # host1b learns the replica from its status (the watch) and publishes it.
        wait_for(lambda: replica["address"] in listed())
        assert "dport 8088" in listed()
        # Without host1's own rules, host1b's alone take the connection there.
        for chain in ("prerouting", "output"):
            net.in_host("nft", "flush", "chain", "inet", table_name("host1"), chain)
        wait_for(lambda: fetch(net, h1, "127.0.0.1", 8088) == hello)
        assert fetch(net, net.net.ctl, net.net.address(h1), 8088) == hello
        listed_services = net.cli("service", "ls")
        assert "*:8088->8080/tcp" in listed_services.stdout
    finally:
        net.cli("service", "rm", "web")
    # The replica gone, host1b's table goes too (it has no container of its own).
    wait_for(lambda: other not in net.in_host("nft", "list", "tables"))
    assert leftovers(net)["tables"] == []


BERTH = 'n = networks.get("berth"); out({"id": n.id, "slices": n.slices})'


def test_the_mesh_answers_on_a_host_that_runs_no_replica(network_cluster: Net) -> None:
    """host2 runs no container: its mesh holds a slice of the replica's network and that
    network's vxlan device (no bridge), reaches the replica on host1 through the tunnel, and
    gives both back when the service goes."""
    net = network_cluster
    h2 = net.net.host(2)
    try:
        replica = client(net, MESH, SERVE)
        assert isinstance(replica, dict)
        hello = "hello from " + replica["id"][:12]
        wait_for(lambda: fetch(net, h2, "127.0.0.1", 8088) == hello, timeout=30)
        assert fetch(net, net.net.ctl, net.net.address(h2), 8088) == hello
        berth = client(net, BERTH)
        assert isinstance(berth, dict)
        device = f"vx-{berth['id'][:6]}{node_tag('host2')}"
        links = [line.split(":")[1].strip() for line in net.in_host("ip", "-o", "link", host=2)
                 .splitlines()]  # fmt: skip
        assert device in links
        assert not [name for name in links if name.startswith(("bn-", "veth"))]
        # The device's address is host2's slice's .0: where host1 sends the replies.
        zero = berth["slices"]["host2"].split("/")[0]
        assert f"inet {zero}/32" in net.in_host("ip", "-o", "addr", "show", device, host=2)
    finally:
        net.cli("service", "rm", "web")
        # Every node drops the port when the replica goes (host2's table had only the mesh).
        wait_for(lambda: not leftovers(net)["tables"])
    # host2's device and slice go with the mesh's last backend on the network.
    wait_for(lambda: not leftovers(net)["links"])
    berth = client(net, BERTH)
    assert isinstance(berth, dict)
    assert "host2" not in berth["slices"]
