"""The overlay between hosts (berthd.node.overlay) in the multi-host harness of test_networks:
containers of one network on host1 and host2 reach each other by address through the hosts'
vxlan devices, with their own source addresses; containers of another network do not; an
internal network spans hosts and still reaches nothing outside. Traffic goes only to the
containers' addresses (given by the agents) and the control namespace's bridge address (given
by the harness), between namespaces this test made."""

from __future__ import annotations

import pytest

from berthd.node.network import bridge_name
from berthd.node.overlay import vxlan_name

from . import test_networks
from .test_networks import LEASE_TTL, Net, leftovers

# test_networks' harness (etcd, registry, cluster, agents on host1 and host2), one per module.
network_cluster = test_networks.network_cluster

pytestmark = pytest.mark.integration

NOTHING = {"links": [], "namespaces": [], "tables": [], "leases": []}

# A web server that answers /cgi-bin/peer with the client's address as it sees it (busybox
# httpd's CGI REMOTE_ADDR), and /big with 200 KiB (more than a window of full-sized frames).
SERVE = (
    "mkdir -p /www/cgi-bin && echo hello from $(hostname) > /www/index.html && "
    "dd if=/dev/zero of=/www/big bs=1024 count=200 2>/dev/null && "
    "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' "
    "> /www/cgi-bin/peer && chmod +x /www/cgi-bin/peer && httpd -f -p 8080 -h /www"
)

FETCH = """
def fetch(container, url):
    # busybox's `timeout`: a dropped packet fails the fetch instead of hanging it.
    r = cluster.exec(container, ["timeout", "20", "wget", "-q", "-O", "-", url])
    return [r.exit_code, r.stdout.decode().strip()]

def peer(container, info):
    # httpd's IPv6 socket names an IPv4 client [::ffff:a.b.c.d].
    code, seen = fetch(container, url(info, "cgi-bin/peer"))
    return [code, seen.strip("[]").removeprefix("::ffff:")]

def url(info, path=""):
    return f"http://{info['network']['ip_address']}:8080/{path}"
"""


def vxlan_devices(net: Net, host: int) -> list[str]:
    links = net.in_host("ip", "-o", "link", "show", "type", "vxlan", host=host).splitlines()
    return sorted(line.split(":")[1].strip() for line in links)


def test_containers_reach_their_network_across_hosts_and_no_other(network_cluster: Net) -> None:
    net = network_cluster
    started = net.client(
        FETCH
        + """
SERVE = sys.argv[3]
made = {n: networks.create(n).id for n in ("ovl", "ovl-other")}
server = running("o-server", SERVE, "ovl", "host2")
client = running("o-client", "sleep 600", "ovl", "host1")
stranger = running("x-server", SERVE, "ovl-other", "host2")
running("x-client", "sleep 600", "ovl-other", "host1")
mtu = cluster.exec("o-client", ["cat", "/sys/class/net/eth0/mtu"]).stdout.decode().strip()
out({"made": made, "server": server, "client": client, "stranger": stranger, "mtu": mtu,
     "page": fetch("o-client", url(server)),
     "peer": peer("o-client", server),
     "big": len(cluster.exec("o-client", ["wget", "-q", "-O", "-", url(server, "big")]).stdout),
     "other": fetch("o-client", url(stranger)),
     "other_peer": peer("x-client", stranger)})
""",
        SERVE,
    )
    assert isinstance(started, dict)
    ovl, other = started["made"]["ovl"], started["made"]["ovl-other"]
    server, client = started["server"]["network"], started["client"]["network"]
    # Each host has its own slice; the page of host2's container answers host1's.
    assert server["gateway"] != client["gateway"]
    assert started["page"] == [0, "hello from " + started["server"]["id"][:12]]
    # No NAT between them: the server sees the client container's own address.
    assert started["peer"] == [0, client["ip_address"]]
    # Full-sized frames fit the tunnel: the containers' MTU is the tunnel's.
    assert started["mtu"] == "1450"
    assert started["big"] == 200 * 1024
    # Another network's container on host2 is refused (its own network still reaches it).
    assert started["other"][0] != 0
    x_client = net.client('out(cluster.inspect("x-client").network)')
    assert isinstance(x_client, dict)
    assert started["other_peer"] == [0, x_client["ip_address"]]
    # A vxlan device per network per host, named as the bridge it goes with.
    assert vxlan_devices(net, 1) == sorted(
        vxlan_name(bridge_name(n, "host1")) for n in (ovl, other)
    )
    assert vxlan_devices(net, 2) == sorted(
        vxlan_name(bridge_name(n, "host2")) for n in (ovl, other)
    )
    routes = net.in_host("ip", "route", "show", "dev", vxlan_name(bridge_name(ovl, "host1")))
    slice2 = server["gateway"].rsplit(".", 1)[0]
    assert routes.split() == f"{slice2}.0/24 via {slice2}.0 onlink".split()

    # The last container of a network on a host takes its vxlan device along.
    net.client(
        'cluster.remove("x-client", force=True); cluster.remove("x-server", force=True); '
        'networks.remove("ovl-other"); out(True)'
    )
    assert vxlan_devices(net, 1) == [vxlan_name(bridge_name(ovl, "host1"))]
    net.client(
        'cluster.remove("o-client", force=True); cluster.remove("o-server", force=True); '
        'networks.remove("ovl"); out(True)'
    )
    assert leftovers(net) == NOTHING


def test_an_internal_network_spans_hosts_and_reaches_nothing_outside(
    network_cluster: Net,
) -> None:
    net = network_cluster
    outside = net.outside_server("outside-overlay", 8097)
    try:
        result = net.client(
            FETCH
            + """
SERVE, OUTSIDE = sys.argv[3], sys.argv[4]
networks.create("ovl-inner", internal=True)
server = running("in-server", SERVE, "ovl-inner", "host2")
client = running("in-client", "sleep 600", "ovl-inner", "host1")
out({"client": client,
     "peer": peer("in-client", server),
     "outside": fetch("in-client", f"http://{OUTSIDE}:8097/"),
     "outside2": fetch("in-server", f"http://{OUTSIDE}:8097/")})
for c in ("in-client", "in-server"):
    cluster.remove(c, force=True)
networks.remove("ovl-inner")
""",
            SERVE,
            net.net.control_address,
        )
    finally:
        outside.terminate()
        outside.wait(timeout=10)
    assert isinstance(result, dict)
    assert result["peer"] == [0, result["client"]["network"]["ip_address"]]
    assert result["outside"][0] != 0 and result["outside2"][0] != 0
    assert leftovers(net) == NOTHING


def test_a_restarted_agent_rebuilds_its_tunnel_from_etcd(network_cluster: Net) -> None:
    net = network_cluster
    started = net.client(
        FETCH
        + """
networks.create("ovl-again")
server = running("r-server", sys.argv[3], "ovl-again", "host2")
running("r-client", "sleep 600", "ovl-again", "host1")
out({"server": server, "page": fetch("r-client", url(server))})
""",
        SERVE,
    )
    assert isinstance(started, dict)
    assert started["page"][0] == 0
    (device,) = vxlan_devices(net, 1)
    # host1's agent dies and its tunnel is lost meanwhile (as after a reboot of the device).
    net.agent.proc.kill()
    net.agent.proc.wait(timeout=10)
    net.in_host("ip", "link", "del", device)
    net.agent = net.agents["host1"] = net.net.start_agent(1, net.registry, net.prefix, LEASE_TTL)
    net.agent.wait_ready()
    result = net.client(
        FETCH
        + """
server = {"network": cluster.inspect("r-server").network}
page = fetch("r-client", url(server))
for c in ("r-client", "r-server"):
    cluster.remove(c, force=True)
networks.remove("ovl-again")
out(page)
"""
    )
    assert result == [0, "hello from " + started["server"]["id"][:12]]
    assert leftovers(net) == NOTHING
