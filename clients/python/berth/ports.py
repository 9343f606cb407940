"""Published ports: Docker's `-p`/`--publish` grammar, their checks and their printed forms.

A container's PortBinding (`docker run -p [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]`)
publishes a port on its node; a service's PublishedPort (`docker service create --publish
8080:80` or `published=8080,target=80[,protocol=udp][,mode=ingress]`) on every node, through
the routing mesh. The messages of a bad value are Docker's (go-connections' nat.ParsePortSpec,
the CLI's PortOpt), so scripts and people read the same words.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from berth.errors import InvalidArgumentError

__all__ = [
    "MESH_PORT_RANGE",
    "PROTOCOLS",
    "InvalidPort",
    "PortBinding",
    "PublishedPort",
    "binding_key",
    "check_bindings",
    "check_published",
    "conflicts",
    "format_ps",
    "ingress_label",
    "parse_port_filter",
    "parse_publish",
    "parse_service_publish",
]

PROTOCOLS = ("tcp", "udp")
# Where the cluster picks a service's published port when none is given (Swarm's range).
MESH_PORT_RANGE = (30000, 32767)
_MAX_PORT = 65535


class InvalidPort(InvalidArgumentError):
    """A published port no node could publish (code INVALID_ARGUMENT)."""


@dataclass
class PortBinding:
    """A container port published on its node. host_ip "" is every address (0.0.0.0);
    host_port 0 asks the node to choose one (the actual binding then has it)."""

    container_port: int
    host_port: int = 0
    host_ip: str = ""
    protocol: str = "tcp"

    @property
    def shown_ip(self) -> str:
        return self.host_ip or "0.0.0.0"

    def __str__(self) -> str:
        """Docker's `docker ps` form: 0.0.0.0:8080->80/tcp."""
        return f"{self.shown_ip}:{self.host_port}->{self.container_port}/{self.protocol}"


@dataclass
class PublishedPort:
    """A service port published on every node (Swarm's ingress mode)."""

    target_port: int
    published_port: int = 0
    protocol: str = "tcp"

    def __str__(self) -> str:
        """Swarm's `docker service ls` form: *:8080->80/tcp."""
        return f"*:{self.published_port}->{self.target_port}/{self.protocol}"


def binding_key(port: int, protocol: str) -> str:
    """`8080/tcp`: how a published port is named in messages and allocation records."""
    return f"{port}/{protocol}"


# --- parsing ------------------------------------------------------------------------------------


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= _MAX_PORT:
        raise InvalidPort(f"invalid {what}: {text}")
    return int(text)


def _range(text: str, what: str) -> list[int]:
    """`80` or `8000-8010`, Docker's port ranges."""
    first, sep, last = text.partition("-")
    start = _port(first, what)
    if not sep:
        return [start]
    end = _port(last, what)
    if end < start:
        raise InvalidPort(f"invalid {what}: {text}")
    return list(range(start, end + 1))


def _protocol(text: str) -> str:
    proto = text.lower()
    if proto not in PROTOCOLS:
        raise InvalidPort(f"invalid proto: {text}")
    return proto


def _host_ip(text: str) -> str:
    if text.startswith("[") or ":" in text:
        raise InvalidPort(f"invalid IP address: {text}: berth publishes on IPv4 addresses only")
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidPort(f"invalid IP address: {text}") from None
    # 0.0.0.0 is every address: the same as none given.
    return "" if ip.is_unspecified else str(ip)


def parse_publish(text: str) -> list[PortBinding]:
    """One `-p` value: `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]`, ports or equal ranges."""
    spec, _, proto = text.partition("/")
    protocol = _protocol(proto) if proto else "tcp"
    parts = spec.split(":")
    if len(parts) > 3:
        raise InvalidPort(f"invalid port format: {text}: expected [ip:][hostPort:]containerPort")
    container = parts[-1]
    host = parts[-2] if len(parts) >= 2 else ""
    ip = _host_ip(parts[0]) if len(parts) == 3 and parts[0] else ""
    if not container:
        raise InvalidPort(f"no port specified: {text}<empty>")
    container_ports = _range(container, "containerPort")
    host_ports = _range(host, "hostPort") if host else [0] * len(container_ports)
    if len(host_ports) != len(container_ports):
        raise InvalidPort(
            f"invalid ranges specified for container and host Ports: {container} and {host}"
        )
    return [
        PortBinding(container_port=c, host_port=h, host_ip=ip, protocol=protocol)
        for h, c in zip(host_ports, container_ports, strict=True)
    ]


def parse_service_publish(text: str) -> PublishedPort:
    """One `--publish` value of `service create/update`: `PUBLISHED:TARGET[/PROTO]` or
    Docker's long form `published=8080,target=80[,protocol=udp][,mode=ingress]`."""
    if "=" not in text:
        spec, _, proto = text.partition("/")
        published, sep, target = spec.rpartition(":")
        if not sep:
            return PublishedPort(_port(spec, "containerPort"), 0, _protocol(proto or "tcp"))
        if ":" in published:
            raise InvalidPort(
                f"invalid publish value {text}: a service publishes on every node: "
                "expected [PUBLISHED:]TARGET[/PROTO], with no address"
            )
        return PublishedPort(
            _port(target, "containerPort"), _port(published, "hostPort"), _protocol(proto or "tcp")
        )
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("published", "target", "protocol", "mode"):
            raise InvalidPort(f"invalid field key {key}")
        fields[key] = value.strip()
    if "target" not in fields:
        raise InvalidPort('missing mandatory field "target"')
    if fields.get("mode", "ingress") != "ingress":
        raise InvalidPort(
            f"invalid publish mode {fields['mode']}: berth publishes service ports through the "
            "routing mesh only (mode=ingress); publish on one host with `berth run -p`"
        )
    published = fields.get("published", "")
    return PublishedPort(
        _port(fields["target"], "target port"),
        _port(published, "published port") if published else 0,
        _protocol(fields.get("protocol", "tcp")),
    )


def parse_port_filter(text: str) -> tuple[int, str]:
    """`berth port CONTAINER 80[/udp]`: the private port and its protocol."""
    port, _, proto = text.partition("/")
    return _port(port, "port"), _protocol(proto or "tcp")


# --- checks -------------------------------------------------------------------------------------


def conflicts(a: PortBinding, b: PortBinding) -> bool:
    """Two bindings of one node want the same port: same protocol and host port, and one of
    them on every address or both on the same one."""
    return (
        a.host_port != 0
        and a.host_port == b.host_port
        and a.protocol == b.protocol
        and (not a.host_ip or not b.host_ip or a.host_ip == b.host_ip)
    )


def _check_int(value: object, what: str, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPort(f"{what} must be an integer, got {value!r}")
    if not (0 if zero else 1) <= value <= _MAX_PORT:
        raise InvalidPort(f"invalid {what}: {value}")
    return value


def check_bindings(bindings: object, network_mode: str) -> None:
    """A container's ports: well formed, each host port once, and only on a network."""
    if not isinstance(bindings, list) or not all(isinstance(b, PortBinding) for b in bindings):
        raise InvalidPort("ports must be a list of port bindings")
    if bindings and network_mode in ("none", "host"):
        raise InvalidPort(
            f"published ports need a network: network mode {network_mode} has none "
            "(use --network NAME; `berth run -p` alone joins the network berth)"
        )
    for i, b in enumerate(bindings):
        _check_int(b.container_port, "containerPort")
        _check_int(b.host_port, "hostPort", zero=True)
        if not isinstance(b.protocol, str) or b.protocol not in PROTOCOLS:
            raise InvalidPort(f"invalid proto: {b.protocol}")
        if not isinstance(b.host_ip, str):
            raise InvalidPort(f"host_ip must be a string, got {b.host_ip!r}")
        if b.host_ip and _host_ip(b.host_ip) != b.host_ip:
            raise InvalidPort(f"invalid IP address: {b.host_ip}: write 0.0.0.0 as empty")
        for other in bindings[:i]:
            if conflicts(b, other):
                raise InvalidPort(
                    f"port {b.shown_ip}:{binding_key(b.host_port, b.protocol)} is published twice"
                )


def check_published(ports: Iterable[PublishedPort]) -> None:
    """A service's published ports: well formed, each port and protocol once."""
    seen: set[str] = set()
    for p in ports:
        _check_int(p.target_port, "target port")
        _check_int(p.published_port, "published port", zero=True)
        if p.protocol not in PROTOCOLS:
            raise InvalidPort(f"invalid proto: {p.protocol}")
        key = binding_key(p.published_port, p.protocol)
        if p.published_port and key in seen:
            raise InvalidPort(f"port {key} is published twice")
        seen.add(key)


# --- printed forms ------------------------------------------------------------------------------


def ingress_label(ports: Iterable[PublishedPort]) -> str:
    """A service replica's label of its service's published ports: `8080:80/tcp,...`."""
    return ",".join(f"{p.published_port}:{p.target_port}/{p.protocol}" for p in ports)


def format_ps(bindings: Iterable[PortBinding]) -> str:
    """Docker's PORTS column: `0.0.0.0:8080->80/tcp, 127.0.0.1:8081->80/tcp`."""
    return ", ".join(str(b) for b in bindings)
