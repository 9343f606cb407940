"""Names on networks (berthd.node.dns) in the multi-host harness of test_networks: the agents
of h1 and h2 run their resolvers on their bridges' gateways, and forward what is not a
network's name to a stand-in upstream resolver the test runs in the control namespace on the
harness's own address (never the machine's resolvers). Resolving a container on the other
host needs no overlay: its address comes from etcd, so the tests compare it with inspect."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from .test_networks import CLIENT, SERVE, Net, leftovers, started
from .test_ports import fetch

pytestmark = pytest.mark.integration

UPSTREAM_PORT = 5353
NOTHING_LEFT = {"links": [], "namespaces": [], "tables": [], "leases": []}

# A resolver that answers every *.test name with the address it is given (the harness's
# control address) and logs each name it is asked.
UPSTREAM = """
import socket, sys
import dns.message, dns.rcode, dns.rrset
address, port, log, answer = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, port))
while True:
    data, peer = sock.recvfrom(4096)
    query = dns.message.from_wire(data)
    name = query.question[0].name
    with open(log, "a") as f:
        f.write(name.to_text() + "\\n")
    reply = dns.message.make_response(query)
    if name.to_text().endswith(".test.") and query.question[0].rdtype == 1:
        reply.answer.append(dns.rrset.from_text(name, 5, "IN", "A", answer))
    else:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    sock.sendto(reply.to_wire(), peer)
"""

DNS = """
import re

def lookup(container, name):
    # busybox nslookup: the addresses after "Name:"; None when the name does not resolve.
    r = cluster.exec(container, ["nslookup", name])
    answers = r.stdout.decode().partition("Name:")[2]
    found = re.findall(r"^Address:\\s*([0-9.]+)\\s*$", answers, re.M)
    return sorted(set(found)) or None

def address(container):
    return cluster.inspect(container).network["ip_address"]
"""


@pytest.fixture(scope="module")
def dns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    # Each agent forwards to a stand-in resolver on its own namespace's loopback.
    flag = f"--dns-upstream=127.0.0.1:{UPSTREAM_PORT}"
    # A third host: after one is cut, a client and the mesh on another than the replicas'.
    with started(tmp_path_factory.mktemp("dns"), flag, hosts=3) as net:
        for n in (1, 2, 3):
            argv = [sys.executable, "-c", UPSTREAM, "127.0.0.1", str(UPSTREAM_PORT)]
            argv += [str(net.run_dir / f"upstream{n}.names"), net.net.control_address]
            net.net.spawn(net.net.host(n), argv, net.run_dir / f"upstream{n}.log")
        yield net


def asked_upstream(net: Net, n: int) -> list[str]:
    path = net.run_dir / f"upstream{n}.names"
    return path.read_text().split() if path.exists() else []


def test_names_resolve_on_their_network_on_either_host_and_not_on_another(
    dns_cluster: Net,
) -> None:
    net = dns_cluster
    result = net.client(
        CLIENT
        + DNS
        + """
SERVE = sys.argv[3]
networks.create("names")
networks.create("apart")
web = cluster.run(ContainerConfig(IMAGE, name="web", command=["sh", "-c", SERVE],
                                  network_mode="names", network_aliases=["www"]),
                  Placement(constraints=["node.id==host1"]))
running("api", "sleep 600", "names", "host2")
running("client", "sleep 600", "names", "host1")
running("stranger", "sleep 600", "apart", "host1")
deadline = time.monotonic() + 60
while not cluster.inspect("web").network:
    assert time.monotonic() < deadline
    time.sleep(0.1)
fetched = cluster.exec("client", ["wget", "-q", "-O", "-", "http://web:8080/"])
result = {
    "web": lookup("client", "web"), "www": lookup("client", "www"),
    "short_id": lookup("client", web.id[:12]), "api": lookup("client", "api"),
    "stranger": lookup("stranger", "web"), "outside": lookup("client", "open-probe.test"),
    "addresses": {c: address(c) for c in ("web", "api", "stranger")},
    "fetched": [fetched.exit_code, fetched.stdout.decode().strip()],
    "resolv": cluster.exec("client", ["cat", "/etc/resolv.conf"]).stdout.decode(),
    "inspect_aliases": cluster.inspect("web").network_aliases,
    "web_id": web.id,
}
for c in ("web", "api", "client", "stranger"):
    cluster.remove(c, force=True)
networks.remove("names")
networks.remove("apart")
out(result)
""",
        SERVE,
    )
    assert isinstance(result, dict)
    addresses = result["addresses"]
    assert result["web"] == result["www"] == result["short_id"] == [addresses["web"]]
    # On the other host: the address its own node gave it.
    assert result["api"] == [addresses["api"]]
    assert addresses["api"].split(".")[:3] != addresses["web"].split(".")[:3]
    # Another network's container does not know the name (its upstream does not either).
    assert result["stranger"] is None
    # Not a name of the network: the node asked its upstream.
    assert result["outside"] == [net.net.control_address]
    assert "open-probe.test." in asked_upstream(net, 1)
    assert result["fetched"] == [0, "hello from " + result["web_id"][:12]]
    gateway = addresses["web"].rsplit(".", 1)[0] + ".1"
    assert result["resolv"].splitlines()[0] == f"nameserver {gateway}"
    assert "options ndots:0" in result["resolv"]
    assert result["inspect_aliases"] == ["www"]
    assert leftovers(net) == NOTHING_LEFT


def test_an_internal_network_resolves_its_own_names_and_forwards_nothing(
    dns_cluster: Net,
) -> None:
    net = dns_cluster
    result = net.client(
        CLIENT
        + DNS
        + """
networks.create("sealed", internal=True)
running("inner", "sleep 600", "sealed", "host1")
running("peer", "sleep 600", "sealed", "host1")
result = {"inner": lookup("peer", "inner"), "address": address("inner"),
          "outside": lookup("peer", "sealed-probe.test")}
for c in ("inner", "peer"):
    cluster.remove(c, force=True)
networks.remove("sealed")
out(result)
"""
    )
    assert isinstance(result, dict)
    assert result["inner"] == [result["address"]]
    assert result["outside"] is None
    assert "sealed-probe.test." not in asked_upstream(net, 1)
    assert leftovers(net) == NOTHING_LEFT


MESH_PORT = 8089


def test_a_service_name_answers_its_replicas_and_follows_one_moved_off_a_dead_host(
    dns_cluster: Net,
) -> None:
    """Replicas on host1 and host2, a client on host3; host2 is cut. The name answers the
    replica moved to host1 and the client fetches its page by the name across the overlay;
    the routing mesh of host3 (no replica) answers from the replicas that remain."""
    net = dns_cluster
    before = net.client(
        CLIENT
        + DNS
        + """
from berth.ports import PublishedPort
SERVE = sys.argv[3]

def replicas(avoid=""):
    deadline = time.monotonic() + 90
    while True:
        found = [c for c in cluster.service_ps("svc")
                 if c.state == "running" and c.network and c.node_id != avoid]
        if len(found) == 2:
            return {c.name: [c.node_id, c.network["ip_address"], c.id] for c in found}
        assert time.monotonic() < deadline, [(c.name, c.node_id, c.state)
                                             for c in cluster.service_ps("svc", all=True)]
        time.sleep(0.2)

networks.create("svcnet")
running("asker", "sleep 600", "svcnet", "host3")
cluster.create_service("svc", ContainerConfig(IMAGE, command=["sh", "-c", SERVE],
                                              network_mode="svcnet", network_aliases=["backend"]),
                       2, Placement(constraints=["node.id!=host3"]),
                       ports=[PublishedPort(8080, int(sys.argv[4]))])
placed = replicas()
out({"placed": placed, "svc": lookup("asker", "svc"), "tasks": lookup("asker", "tasks.svc"),
     "backend": lookup("asker", "backend"),
     "replica": {name: lookup("asker", name) for name in placed}})
""",
        SERVE,
        str(MESH_PORT),
    )
    assert isinstance(before, dict)
    placed = before["placed"]
    assert sorted(node for node, _, _ in placed.values()) == ["host1", "host2"]
    everyone = sorted(address for _, address, _ in placed.values())
    assert before["svc"] == before["tasks"] == before["backend"] == everyone
    assert before["replica"] == {name: [address] for name, (_, address, _) in placed.items()}
    (lost,) = [address for node, address, _ in placed.values() if node == "host2"]

    host2 = net.net.host(2)
    net.net.cut(host2)
    try:
        after = net.client(
            CLIENT
            + DNS
            + """
deadline = time.monotonic() + 90
while True:
    found = [c for c in cluster.service_ps("svc")
             if c.state == "running" and c.network and c.node_id == "host1"]
    if len(found) == 2:
        break
    assert time.monotonic() < deadline, "the replica was not moved to host1"
    time.sleep(0.2)
wanted = sorted(c.network["ip_address"] for c in found)
# The moved replica's record comes with its start; the lost one's went with host2's lease.
while (answer := lookup("asker", "svc")) != wanted:
    assert time.monotonic() < deadline, [answer, wanted]
    time.sleep(0.2)
# From host3, by the name, across the overlay: until the moved replica is the one asked.
moved = [c.id for c in found if c.id not in sys.argv[3].split(",")][0]
pages = []
while ("hello from " + moved[:12]) not in pages:
    assert time.monotonic() < deadline, pages
    got = cluster.exec("asker", ["wget", "-q", "-O", "-", "http://svc:8080/"])
    pages.append(got.stdout.decode().strip() if got.exit_code == 0 else f"exit {got.exit_code}")
out({"svc": answer, "wanted": wanted, "pages": pages, "moved": moved,
     "replicas": [c.id for c in found]})
""",
            ",".join(c_id for _, _, c_id in placed.values()),
            timeout=150,
        )
        assert isinstance(after, dict)
        assert after["svc"] == after["wanted"]
        assert lost not in after["svc"]
        live = {"hello from " + c_id[:12] for c_id in after["replicas"]}
        # Every fetch by the name answered (the lost address was never handed out again).
        assert set(after["pages"]) <= live, after["pages"]
        # The mesh on host3, which runs no replica, still answers with the replicas that
        # remain, the moved one among them; never with the lost one.
        h3 = net.net.address(net.net.host(3))
        answers: list[str] = []
        deadline = time.monotonic() + 30
        while "hello from " + after["moved"][:12] not in answers:
            assert time.monotonic() < deadline, answers
            answers.append(fetch(net, net.net.ctl, h3, MESH_PORT))
        # Once it follows the move, every connection finds a live replica.
        answers = [fetch(net, net.net.ctl, h3, MESH_PORT) for _ in range(6)]
        assert set(answers) <= live, answers
    finally:
        net.net.restore(host2)
    net.client(
        """
cluster.remove_service("svc")
cluster.remove("asker", force=True)
deadline = time.monotonic() + 60
while cluster.list(all=True):
    assert time.monotonic() < deadline
    time.sleep(0.2)
networks.remove("svcnet")
out(True)
""",
        timeout=90,
    )
    # host2's stale replica goes once its agent hears again that nothing is desired there.
    deadline = time.monotonic() + 60
    while leftovers(net) != NOTHING_LEFT:
        assert time.monotonic() < deadline, leftovers(net)
        time.sleep(0.5)
