"""Published ports as the cluster keeps them. No gRPC.

- A container's host ports (`run -p`) are reserved on its node as CPU and memory are: in the
  node's allocation record (`cluster/allocations/<node>`, key "ports", entries
  `HOST_IP:PORT/PROTO`), written in the placement transaction that compares that record, and
  released when the container is removed. The scheduler places a `run -p` on a node where the
  port is free (berthd.cluster.scheduler), and refuses with PORT_ALLOCATED when none is.
- A service's published port is the cluster's (the routing mesh answers on every node): a
  claim `cluster/ports/<port>-<proto>` holding the service id, created absent in the
  transaction that creates or updates the service and deleted with the service (or when an
  update drops the port). A `run -p` compares that the claim of its port is absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from berth.ports import MESH_PORT_RANGE, PortBinding, PublishedPort, binding_key
from berthd.common.errors import FailedPrecondition, ResourceExhausted
from berthd.common.store import Compare, Op, Store

PORT_CLAIMS = "cluster/ports/"


def claim_key(port: int, protocol: str) -> str:
    return f"{PORT_CLAIMS}{port}-{protocol}"


def allocated(binding: PortBinding, holder: str = "") -> FailedPrecondition:
    """Docker's words for a port that is taken; `holder` says by what."""
    where = f"{binding.shown_ip}:{binding.host_port}"
    by = f" ({holder})" if holder else ""
    return FailedPrecondition(
        f"Bind for {where} failed: port is already allocated{by}",
        reason="PORT_ALLOCATED",
        metadata={"port": f"{where}/{binding.protocol}"},
    )


# Allocation records -------------------------------------------------------------------------


def entry(b: PortBinding) -> str:
    return f"{b.shown_ip}:{b.host_port}/{b.protocol}"


def parse_entry(text: str) -> PortBinding:
    address, _, rest = text.rpartition(":")
    port, _, protocol = rest.partition("/")
    return PortBinding(0, int(port), "" if address == "0.0.0.0" else address, protocol)


def reserved(bindings: Iterable[PortBinding]) -> list[str]:
    """The allocation entries of a container's bindings (a node-chosen port reserves none)."""
    return [entry(b) for b in bindings if b.host_port]


def ports_after(current: Mapping[str, Any], add: Iterable[str], remove: Iterable[str]) -> list[str]:
    """An allocation record's ports with a container's added or removed."""
    ports = [str(p) for p in current.get("ports") or []]
    for p in remove:
        if p in ports:
            ports.remove(p)
    return sorted(ports + list(add))


def node_ports(allocation: Mapping[str, Any]) -> tuple[PortBinding, ...]:
    return tuple(parse_entry(p) for p in allocation.get("ports") or [])


# Service port claims ------------------------------------------------------------------------


async def run_guards(store: Store, bindings: Iterable[PortBinding]) -> list[Compare]:
    """A `run -p` of a port a service publishes is refused now; the placement's transaction
    compares that no service claimed it meanwhile."""
    guards = []
    for b in bindings:
        if not b.host_port:
            continue
        key = claim_key(b.host_port, b.protocol)
        if await store.get(key) is not None:
            raise allocated(b, "a service publishes it through the routing mesh")
        guards.append(store.absent(key))
    return guards


async def claim_ports(
    store: Store,
    service_id: str,
    ports: list[PublishedPort],
    allocations: Iterable[Mapping[str, Any]],
) -> tuple[list[Compare], list[Op]]:
    """The compares and writes that claim a service's published ports (a port of 0 gets the
    first free one of MESH_PORT_RANGE, filled into `ports`). PORT_ALLOCATED when another
    service holds one, or a container publishes it on any node."""
    on_nodes = [b for a in allocations for b in node_ports(a)]
    compares: list[Compare] = []
    ops: list[Op] = []
    for p in ports:
        if not p.published_port:
            p.published_port = await _free_port(store, p.protocol, on_nodes, ports)
        key = claim_key(p.published_port, p.protocol)
        found = await store.get(key)
        wanted = PortBinding(p.target_port, p.published_port, "", p.protocol)
        if found is not None and found.value.decode() != service_id:
            raise allocated(wanted, "another service publishes it")
        if any(b.host_port == p.published_port and b.protocol == p.protocol for b in on_nodes):
            raise allocated(wanted, "a container publishes it on a node")
        if found is None:
            compares.append(store.absent(key))
            ops.append(store.op_put(key, service_id.encode()))
    return compares, ops


async def release_ports(
    store: Store, service_id: str, keep: Iterable[PublishedPort] = ()
) -> list[Op]:
    """The deletes of a service's claims but those of `keep`."""
    kept = {claim_key(p.published_port, p.protocol) for p in keep}
    ops = []
    for e in (await store.snapshot(PORT_CLAIMS))[0]:
        if e.value.decode() == service_id and e.key not in kept:
            ops.append(store.op_delete(e.key))
    return ops


async def _free_port(
    store: Store, protocol: str, on_nodes: list[PortBinding], taken: list[PublishedPort]
) -> int:
    claimed = {e.key for e in (await store.snapshot(PORT_CLAIMS))[0]}
    used = {b.host_port for b in on_nodes if b.protocol == protocol}
    used |= {p.published_port for p in taken if p.protocol == protocol}
    for port in range(MESH_PORT_RANGE[0], MESH_PORT_RANGE[1] + 1):
        if port not in used and claim_key(port, protocol) not in claimed:
            return port
    raise ResourceExhausted(
        f"no free port for {binding_key(0, protocol)} in {MESH_PORT_RANGE[0]}-{MESH_PORT_RANGE[1]}",
        reason="PORT_ALLOCATED",
    )
