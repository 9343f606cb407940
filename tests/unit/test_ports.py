"""Published ports: Docker's `-p`/`--publish` grammar, the node's rules, the mesh's view and
port-aware placement."""

from __future__ import annotations

import dataclasses

import pytest

from berth.containers import ContainerConfig, from_spec, to_spec
from berth.ports import (
    InvalidPort,
    PortBinding,
    PublishedPort,
    parse_publish,
    parse_service_publish,
)
from berthd.cluster.core import allocation_after
from berthd.cluster.scheduler import NodeView, Request, place
from berthd.common.containers import validate
from berthd.common.errors import FailedPrecondition, InvalidArgument
from berthd.common.state.containers import ContainerStatus
from berthd.node.ports import MeshPort, PortHolder, mesh_ports, port_rules, replica_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80", [PortBinding(80)]),
        ("8080:80", [PortBinding(80, 8080)]),
        ("8080:80/udp", [PortBinding(80, 8080, protocol="udp")]),
        ("127.0.0.1:8081:80", [PortBinding(80, 8081, "127.0.0.1")]),
        ("127.0.0.1::80", [PortBinding(80, 0, "127.0.0.1")]),
        ("0.0.0.0:8080:80", [PortBinding(80, 8080)]),
        ("8000-8001:80-81/TCP", [PortBinding(80, 8000), PortBinding(81, 8001)]),
    ],
)
def test_docker_publish_values(text: str, expected: list[PortBinding]) -> None:
    assert parse_publish(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("99999:80", "invalid hostPort: 99999"),
        ("8080:http", "invalid containerPort: http"),
        ("80/sctp", "invalid proto: sctp"),
        ("300.1.1.1:80:80", "invalid IP address: 300.1.1.1"),
        (
            "8000-8002:80-81",
            "invalid ranges specified for container and host Ports: 80-81 and 8000-8002",
        ),
        ("8080:", "no port specified: 8080:<empty>"),
    ],
)
def test_bad_publish_values_get_dockers_messages(text: str, message: str) -> None:
    with pytest.raises(InvalidPort) as caught:
        parse_publish(text)
    assert caught.value.message == message


def test_service_publish_short_and_long_forms() -> None:
    assert parse_service_publish("8080:80") == PublishedPort(80, 8080)
    assert parse_service_publish("published=53,target=5353,protocol=udp") == PublishedPort(
        5353, 53, "udp"
    )
    assert parse_service_publish("target=80") == PublishedPort(80, 0)
    with pytest.raises(InvalidPort, match='missing mandatory field "target"'):
        parse_service_publish("published=80")
    with pytest.raises(InvalidPort, match="routing mesh only"):
        parse_service_publish("target=80,mode=host")


def test_ports_go_through_the_spec_and_need_a_network() -> None:
    config = ContainerConfig(
        "busybox", network_mode="berth", ports=[PortBinding(80, 8080, "127.0.0.1", "udp")]
    )
    config.validate()
    assert from_spec(to_spec(config)) == config
    assert ContainerConfig.from_json(config.to_json()) == config
    with pytest.raises(InvalidArgument, match="published ports need a network"):
        validate(ContainerConfig("busybox", ports=[PortBinding(80, 8080)]))
    twice = ContainerConfig(
        "busybox", network_mode="berth", ports=[PortBinding(80, 8080), PortBinding(81, 8080)]
    )
    with pytest.raises(InvalidArgument, match=r"0\.0\.0\.0:8080/tcp is published twice"):
        validate(twice)


def test_rules_dnat_host_ports_and_the_mesh() -> None:
    rules = port_rules(
        [("10.89.1.2", PortBinding(80, 8080)), ("10.89.1.2", PortBinding(80, 8081, "127.0.0.1"))],
        [MeshPort(9090, 80, "udp", ("10.89.1.2", "10.89.2.3"))],
    )
    assert rules.prerouting == [
        "meta nfproto ipv4 fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 "
        "dnat ip to 10.89.1.2:80",
        "meta nfproto ipv4 fib daddr type local ip daddr != 127.0.0.0/8 udp dport 9090 "
        "ct mark set 0x6270 dnat ip to numgen random mod 2 map { 0 : 10.89.1.2, "
        "1 : 10.89.2.3 } : 80",
    ]
    # A loopback-only port is only for the node's own connections.
    assert "meta nfproto ipv4 ip daddr 127.0.0.1 tcp dport 8081 dnat ip to 10.89.1.2:80" in (
        rules.output
    )
    assert rules.forward == ["ct status dnat accept"]
    assert not port_rules([], [MeshPort(9090, 80, "tcp", ())])


def test_the_mesh_view_takes_running_replicas_with_ports_and_an_address() -> None:
    running = ContainerStatus(
        state="running", ingress="8088:80/tcp", network={"ip_address": "10.89.1.2"}
    )
    assert replica_of(running) is not None
    assert replica_of(ContainerStatus(state="exited", ingress="8088:80/tcp")) is None
    assert replica_of(ContainerStatus(state="running", network={"ip_address": "1.2.3.4"})) is None
    # With a health check, only a healthy replica is a backend (Swarm's and k8s' readiness).
    for health, backend in (("starting", False), ("unhealthy", False), ("healthy", True)):
        checked = dataclasses.replace(running, health={"status": health})
        assert (replica_of(checked) is not None) == backend, health
    # Withdrawn by the cluster before a stop (the drain): no backend, healthy or not.
    assert replica_of(dataclasses.replace(running, withdrawn=True)) is None
    other = ContainerStatus(
        state="running", ingress="8088:80/tcp", network={"ip_address": "10.89.2.2"}
    )
    replicas = [r for r in (replica_of(running), replica_of(other)) if r is not None]
    assert mesh_ports(replicas) == [MeshPort(8088, 80, "tcp", ("10.89.1.2", "10.89.2.2"))]


def test_a_held_port_cannot_be_taken_and_comes_back_when_released() -> None:
    holder, other = PortHolder(), PortHolder()
    (held,) = holder.hold("a", [PortBinding(80, 0, "127.0.0.1")])
    assert held.host_port  # the kernel chose one
    with pytest.raises(FailedPrecondition) as caught:
        other.hold("b", [PortBinding(80, held.host_port, "127.0.0.1")])
    assert str(caught.value) == (
        f"Bind for 127.0.0.1:{held.host_port} failed: port is already allocated"
    )
    holder.release("a")
    assert other.hold("b", [PortBinding(80, held.host_port, "127.0.0.1")])
    other.close()


def node(node_id: str, *ports: PortBinding) -> NodeView:
    return NodeView(node_id, {}, 2000, 1 << 30, 0, 0, True, False, ports=tuple(ports))


def test_placement_avoids_a_node_whose_port_is_taken() -> None:
    want = Request(ports=[PortBinding(80, 8080)])
    assert place([node("a", PortBinding(80, 8080)), node("b")], want).id == "b"
    # Another address, or another protocol, is another port.
    assert place([node("a", PortBinding(80, 8080, "127.0.0.1", "udp"))], want).id == "a"
    with pytest.raises(FailedPrecondition) as caught:
        place([node("a", PortBinding(80, 8080, "10.0.0.1"))], want)
    assert caught.value.details.reason == "PORT_ALLOCATED"
    assert "port 0.0.0.0:8080 is already allocated" in str(caught.value)


def test_an_allocation_keeps_its_ports_through_other_changes() -> None:
    taken = allocation_after(None, 100, 0, 1, ["0.0.0.0:8080/tcp"])
    assert taken["ports"] == ["0.0.0.0:8080/tcp"]
    assert allocation_after(taken, 100, 0, 1)["ports"] == ["0.0.0.0:8080/tcp"]
    released = allocation_after(taken, -100, 0, -1, remove_ports=["0.0.0.0:8080/tcp"])
    assert "ports" not in released
