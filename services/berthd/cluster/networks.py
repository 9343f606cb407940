"""Networks: create, inspect, list and remove the cluster's networks. No gRPC.

The cluster writes `networks/<id>` and its name claim `networks/names/<name>` in one
transaction (berthd.common.state.networks has the key table); nodes lease their slices of a
network's range themselves when they first run a container on it. A spec that names a network
is accepted only if it exists, and its acceptance compares the name claim, so a network
removed meanwhile fails the acceptance; RemoveNetwork refuses a network a container or service
names, and its delete compares that neither family changed since it looked.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Iterable

from berth.error_details import Violation
from berthd.cluster.refs import existence_guards, resolve_ref
from berthd.common.containers import ContainerConfig
from berthd.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from berthd.common.state.containers import CONTAINERS
from berthd.common.state.networks import (
    DEFAULT_NETWORK,
    DEFAULT_SUBNET,
    MAX_PREFIX_LENGTH,
    NAME_RE,
    NAMES,
    NETWORKS,
    NETWORKS_PREFIX,
    RESERVED_NAMES,
    SLICES_PREFIX,
    NameClaim,
    NetworkRecord,
    free_subnet,
    overlapping,
    slices,
)
from berthd.common.store import Compare, Store

log = logging.getLogger("berthd.cluster.networks")

ATTEMPTS = 12
# Modes that name no network.
NO_NETWORK = ("none", "host")


def network_not_found(ref: str, field: str = "") -> NotFound:
    return NotFound(
        f"no such network: {ref}",
        reason="NETWORK_NOT_FOUND",
        metadata={"network": ref},
        resource=("network", ref),
        field=field,
    )


def invalid(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_NETWORK_SPEC", field=field)


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise invalid(
            f"invalid network name {name!r}: letters, digits, '_', '.' and '-', starting with a "
            "letter or digit, at most 63 characters",
            "name",
        )
    if name in RESERVED_NAMES:
        raise invalid(f'"{name}" is a network mode, not a network name', "name")


def check_subnet(subnet: str) -> str:
    """The subnet in canonical form; INVALID_NETWORK_SPEC for anything but an IPv4 range of
    at most a /28 given by its network address."""
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise invalid(
            f"invalid subnet {subnet!r}: {exc} (an IPv4 CIDR: 10.90.0.0/16)", "subnet"
        ) from None
    if network.prefixlen > MAX_PREFIX_LENGTH:
        raise invalid(f"subnet {subnet} is too small: at most a /{MAX_PREFIX_LENGTH}", "subnet")
    if network.prefixlen < 8 or not network.is_private:
        raise invalid(f"subnet {subnet} is not a private range of at most a /8", "subnet")
    return str(network)


def network_names(configs: Iterable[ContainerConfig]) -> list[str]:
    return list(dict.fromkeys(c.network_mode for c in configs if c.network_mode not in NO_NETWORK))


async def network_guards(
    store: Store, configs: Iterable[ContainerConfig], field: str = "spec.network"
) -> list[Compare]:
    """For specs being accepted: NotFound (NETWORK_NOT_FOUND) for a network that does not
    exist, else compares that fail the acceptance if it is removed before it commits."""
    return await existence_guards(store, NAMES, network_names(configs), network_not_found, field)


def resolve(ref: str, records: Iterable[NetworkRecord]) -> NetworkRecord:
    """A network by name, full id or unique id prefix (as Docker resolves them)."""
    return resolve_ref(ref, records, "network", network_not_found, invalid)


class NetworkCore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(
        self, name: str, subnet: str = "", internal: bool = False, labels: dict | None = None
    ) -> NetworkRecord:
        check_name(name)
        for key in labels or {}:
            if not key or "\0" in key:
                raise invalid(f"invalid label key {key!r}: it must be non-empty text", "labels")
        wanted = check_subnet(subnet) if subnet else ""
        for _ in range(ATTEMPTS):
            existing, revision = await NETWORKS.snapshot(self.store)
            others = [v.record for v in existing]
            if any(o.name == name for o in others):
                raise name_in_use(name)
            chosen = wanted or free_subnet(others)
            if chosen is None:
                raise ResourceExhausted(
                    "no free /16 left for a network: give one with --subnet",
                    reason="NO_FREE_SUBNET",
                )
            clash = overlapping(chosen, others)
            if clash is not None:
                raise InvalidArgument(
                    f"subnet {chosen} overlaps network {clash.name} ({clash.subnet})",
                    reason="SUBNET_OVERLAP",
                    metadata={"subnet": chosen, "network": clash.name, "other": clash.subnet},
                    field="subnet",
                )
            record = NetworkRecord(
                id=secrets.token_hex(32),
                name=name,
                subnet=chosen,
                internal=internal,
                labels=dict(labels or {}),
            )
            ok, _ = await self.store.txn(
                [
                    NAMES.absent(self.store, name),
                    # No network made since the overlap check (names/ and slices/ included:
                    # a false alarm there only costs a retry).
                    self.store.unchanged_since(NETWORKS_PREFIX, revision),
                ],
                [
                    NETWORKS.op_put(self.store, record.id, record),
                    NAMES.op_put(self.store, name, NameClaim(record.id)),
                ],
            )
            if ok:
                log.info("network created", extra={"network": name, "subnet": chosen})
                return record
            if await NAMES.get(self.store, name) is not None:
                raise name_in_use(name)
        raise Aborted(f"networks are changing concurrently; network {name} was not made")

    async def ensure_default(self) -> None:
        """The network `berth` (10.89.0.0/16), when absent. A name taken meanwhile by another
        cluster instance doing the same is fine; a range another network took is logged."""
        if await NAMES.get(self.store, DEFAULT_NETWORK) is not None:
            return
        try:
            await self.create(DEFAULT_NETWORK, DEFAULT_SUBNET)
        except AlreadyExists:
            pass
        except InvalidArgument as exc:
            log.warning("default network %s not made: %s", DEFAULT_NETWORK, exc)

    async def list(self, labels: dict[str, str] | None = None) -> list[NetworkRecord]:
        wanted = (labels or {}).items()
        records = [v.record for v in await NETWORKS.list(self.store)]
        return sorted((r for r in records if wanted <= r.labels.items()), key=lambda r: r.name)

    async def get(self, ref: str) -> tuple[NetworkRecord, dict[str, str]]:
        """The network and its slices ({node: subnet})."""
        record = resolve(ref, await self.list())
        held = await slices(record.id).records(self.store)
        return record, {node: s.subnet for node, s in held.items()}

    async def users(self, name: str) -> tuple[list[tuple[str, str, str]], list[Compare]]:
        """(kind, id, name) of the containers and services naming network `name`, and
        compares that hold while nobody adds one."""
        from berthd.cluster.services import SERVICES, ServiceRecord

        containers, container_revision = await CONTAINERS.snapshot(self.store)
        services, service_revision = await self.store.snapshot(SERVICES)
        found = [
            ("container", v.id, v.record.name)
            for v in containers
            if v.record.config.network_mode == name
        ]
        for entry in services:
            try:
                service = ServiceRecord.from_json(entry.value)
            except (ValueError, TypeError, KeyError, InvalidArgument):
                continue
            if service.template.network_mode == name:
                found.append(("service", service.id, service.name))
        compares = [
            self.store.unchanged_since(CONTAINERS.prefix, container_revision),
            self.store.unchanged_since(SERVICES, service_revision),
        ]
        return found, compares

    async def remove(self, ref: str) -> NetworkRecord:
        """Delete a network that no container or service names, with its nodes' slices."""
        for _ in range(ATTEMPTS):
            found = resolve(ref, await self.list())
            versioned = await NETWORKS.read(self.store, found.id)
            if versioned is None:
                raise network_not_found(ref, "network")
            users, unchanged = await self.users(found.name)
            if users:
                raise in_use(found.name, users)
            ok, _ = await self.store.txn(
                [NETWORKS.unchanged(self.store, found.id, versioned.mod_revision), *unchanged],
                [
                    NETWORKS.op_delete(self.store, found.id),
                    NAMES.op_delete(self.store, found.name),
                ],
            )
            if ok:
                # Slices of a network no container uses are released by their nodes already;
                # what a dead node left goes with the network.
                await self.store.delete_prefix(f"{SLICES_PREFIX}{found.id}/")
                log.info("network removed", extra={"network": found.name})
                return versioned.record
        raise Aborted(f"network {ref} is changing concurrently; try again")


def name_in_use(name: str) -> AlreadyExists:
    return AlreadyExists(
        f'the network name "{name}" is already in use',
        reason="NETWORK_NAME_IN_USE",
        metadata={"name": name},
        resource=("network", name),
    )


def in_use(name: str, users: list[tuple[str, str, str]]) -> FailedPrecondition:
    shown = ", ".join(f"{kind} {who}" for kind, _, who in users[:5])
    more = f" and {len(users) - 5} more" if len(users) > 5 else ""
    return FailedPrecondition(
        f"network {name} is in use by {shown}{more}: remove them first",
        reason="NETWORK_IN_USE",
        metadata={"network": name, "users": len(users)},
        resource=("network", name),
        violations=[Violation("NETWORK_IN_USE", f"{k}/{who}", id) for k, id, who in users],
    )
