"""Replicated services: records in etcd, and the transaction that changes replicas. No gRPC.

The RPCs only write the service record (create, scale, update) or remove it with its replicas;
the controller (`berthd.cluster.controller`, run by the elected instance) places, moves, rolls
and removes replicas until they match. Keys, relative to the store prefix:

    cluster/services/<id>           ServiceRecord (JSON): the spec, its version, update state
    cluster/service-names/<name>    service id: makes names unique in the create transaction

Replicas are ordinary DesiredContainer records (`cluster/containers/<id>`) with `service`,
`slot` and `service_version` set, named `<service>.<slot>`.

A template that needs host access is admitted at CreateService and UpdateService
(berthd.common.security.admission); its replicas carry the service's stamp (`host_access_by`).
Every write names its principal as `changed_by` (`current_principal()` for requests,
`service:cluster` for the controller's own writes): the actor of the events it causes.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from berth.ports import InvalidPort, PublishedPort, check_published, ingress_label
from berthd.cluster.core import (
    ALLOCATIONS,
    ClusterNode,
    ContainerView,
    allocation_after,
    allocation_key,
    build_nodes,
    join_status,
    name_key,
)
from berthd.cluster.networks import network_guards
from berthd.cluster.ports import claim_ports, release_ports
from berthd.cluster.rollout import (
    DEFAULT_MONITOR_SECONDS,
    FAILURE_ACTIONS,
    NOT_SPEC,
    ORDERS,
    PAUSE,
    STOP_FIRST,
    RolloutConfig,
    remember_previous,
    swap_to_previous,
    update_config,
)
from berthd.cluster.scheduler import Request, parse_constraints
from berthd.cluster.secrets import secret_guards
from berthd.cluster.tag_follow import FollowSpec, resolve_template
from berthd.common.containers import ContainerConfig, from_dict
from berthd.common.containers import validate as validate_config
from berthd.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from berthd.common.security.admission import admit
from berthd.common.security.principal import Principal, current_principal
from berthd.common.state.containers import (
    CONTAINERS,
    INGRESS_LABEL,
    STATUSES,
    ContainerStatus,
    DesiredContainer,
    op_delete_desired,
    op_put_desired,
    replica_name,
)
from berthd.common.state.family import Versioned, known_fields
from berthd.common.state.nodes import NODES
from berthd.common.store import Compare, Entry, Op, Store, prefix_end

SERVICES = "cluster/services/"
SERVICE_NAMES = "cluster/service-names/"

# Where a service's last rolling update is (UpdateState in the proto); "" = never updated.
UPDATING = "updating"
COMPLETED = "completed"
PAUSED = "paused"

# The actor of the controller's own decisions (replicas placed, moved, retried; update states).
CONTROLLER = "service:cluster"
ATTEMPTS = 12
# Replicas one removal transaction deletes: each compares its record and deletes it, its
# assignment key, its name and its status, and its node's allocation is compared and written
# (5 writes at most); with the service and its name, 24 stay under etcd's --max-txn-ops (128)
# whatever nodes they are on.
REMOVE_BATCH = 24
# Swarm's service name grammar: a DNS label, so `<name>.<slot>` stays a valid container name.
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")


def service_key(service_id: str) -> str:
    return SERVICES + service_id


def service_name_key(name: str) -> str:
    return SERVICE_NAMES + name


@dataclass
class ServiceRecord:
    id: str
    name: str
    template: ContainerConfig
    replicas: int
    cpu_millis: int = 0
    memory_bytes: int = 0
    constraints: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    parallelism: int = 1
    delay_seconds: float = 0.0
    monitor_seconds: float = DEFAULT_MONITOR_SECONDS
    version: int = 1
    update_state: str = ""
    update_message: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # Who admitted the host access the template needs ("" when it needs none); replicas carry it.
    host_access_by: str = ""
    # The principal who last changed the record (CONTROLLER for update states).
    changed_by: str = ""
    # Ports published on every node through the routing mesh (EndpointSpec.ports).
    ports: list[PublishedPort] = field(default_factory=list)
    # The rest of UpdateConfig, and the rollback's (berthd.cluster.rollout).
    update_order: str = STOP_FIRST
    failure_action: str = PAUSE
    max_failure_ratio: float = 0.0
    rollback_config: RolloutConfig = field(default_factory=RolloutConfig)
    # The spec the last update replaced (its JSON fields), and the versions that ran it.
    previous: dict[str, Any] | None = None
    previous_versions: list[int] = field(default_factory=list)
    # Older versions whose replicas run the current spec (restored by a rollback).
    spec_versions: list[int] = field(default_factory=list)
    # Ids of the replicas that failed in the current rollout (the failure ratio's count).
    update_failures: list[str] = field(default_factory=list)
    # The tag the service follows (berthd.cluster.tag_follow); the template then names a digest.
    follow: FollowSpec | None = None

    def to_json(self) -> bytes:
        data = asdict(self)
        data["template"] = json.loads(self.template.to_json())
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ServiceRecord:
        data: dict[str, Any] = json.loads(raw)
        data["template"] = from_dict(data["template"])
        data["ports"] = [PublishedPort(**p) for p in data.get("ports") or []]
        data["rollback_config"] = RolloutConfig.from_dict(data.get("rollback_config"))
        follow = data.get("follow")
        data["follow"] = FollowSpec(**known_fields(FollowSpec, follow)) if follow else None
        # Fields a newer writer added are ignored; ones an older writer lacked take defaults.
        return cls(**known_fields(cls, data))

    def to_spec_json(self) -> dict[str, Any]:
        """The spec fields as stored (what `previous` keeps)."""
        data: dict[str, Any] = json.loads(self.to_json())
        return {k: v for k, v in data.items() if k not in NOT_SPEC}

    def apply_spec_json(self, spec: dict[str, Any]) -> None:
        """Take every spec field from `spec` (a `to_spec_json`)."""
        other = ServiceRecord.from_json(json.dumps({**json.loads(self.to_json()), **spec}))
        for f in dataclasses.fields(self):
            if f.name not in NOT_SPEC:
                setattr(self, f.name, getattr(other, f.name))

    def request(self) -> Request:
        # A zero request means the template's limits, as for RunContainer.
        return Request(
            cpu_millis=self.cpu_millis or self.template.cpu_millis,
            memory_bytes=self.memory_bytes or self.template.memory_bytes,
            constraints=parse_constraints(self.constraints),
        )

    def replica(self, slot: int, node: str, beside: bool = False) -> DesiredContainer:
        """A new replica for `slot` on `node`, running the current spec; `beside`: started
        next to the slot's old replica (start-first), under a name of its own."""
        container_id = secrets.token_hex(32)
        name = replica_name(self.name, slot, container_id[:12] if beside else "")
        request = self.request()
        config = dataclasses.replace(copy.deepcopy(self.template), name=name)
        if self.ports:
            # Every node's routing mesh learns the replica's ports from its status.
            config.labels[INGRESS_LABEL] = ingress_label(self.ports)
        return DesiredContainer(
            id=container_id,
            name=name,
            node=node,
            config=config,
            cpu_millis=request.cpu_millis,
            memory_bytes=request.memory_bytes,
            constraints=list(self.constraints),
            service=self.id,
            slot=slot,
            service_version=self.version,
            host_access_by=self.host_access_by,
            changed_by=CONTROLLER,
        )


def validate_rollout(config: RolloutConfig, where: str) -> None:
    """InvalidArgument for an update or rollback config no rollout could follow."""
    problem = ""
    if config.parallelism < 1:
        problem = f"parallelism must be at least 1, got {config.parallelism}"
    elif config.delay_seconds < 0 or config.monitor_seconds < 0:
        problem = "delay and monitor cannot be negative"
    elif not 0 <= config.max_failure_ratio <= 1:
        problem = f"max failure ratio must be between 0 and 1, got {config.max_failure_ratio}"
    elif config.order not in ORDERS or config.failure_action not in FAILURE_ACTIONS:
        problem = f"unknown order {config.order!r} or failure action {config.failure_action!r}"
    if problem:
        raise InvalidArgument(f"{where}: {problem}", reason="INVALID_SPEC", field=where)


def validate(record: ServiceRecord) -> None:
    """InvalidArgument for anything a replica could never be made of."""
    if not _NAME_RE.match(record.name):
        raise InvalidArgument(
            f'invalid service name "{record.name}": use letters, digits, "_" and "-" '
            "(starting with a letter or digit, at most 63 characters)",
            reason="INVALID_SPEC",
            field="spec.name",
        )
    if record.replicas < 0:
        raise InvalidArgument(
            f"replica count cannot be negative, got {record.replicas}",
            reason="INVALID_SPEC",
            field="spec.replicas",
        )
    validate_rollout(update_config(record), "spec.update_config")
    validate_rollout(record.rollback_config, "spec.rollback_config")
    template = dataclasses.replace(copy.deepcopy(record.template), name=f"{record.name}.1")
    validate_config(template, field="spec.template")
    try:
        check_published(record.ports)
    except InvalidPort as exc:
        raise InvalidArgument(
            exc.message, reason="INVALID_SPEC", field="spec.endpoint_spec.ports"
        ) from None
    if record.ports and template.network_mode in ("none", "host"):
        raise InvalidArgument(
            "published ports need a network: the template's network mode "
            f"{template.network_mode} has none (use --network NAME)",
            reason="INVALID_SPEC",
            field="spec.template.network",
        )
    record.request()  # constraints and requests


def resolve_service(ref: str, services: Iterable[ServiceRecord]) -> ServiceRecord:
    """A service by full id, name, or unique id prefix (like containers)."""
    if not ref:
        raise InvalidArgument("a service id, id prefix or name is required")
    services = list(services)
    for match in (lambda s: s.id == ref, lambda s: s.name == ref):
        found = [s for s in services if match(s)]
        if found:
            return found[0]
    prefixed = [s for s in services if s.id.startswith(ref)]
    if len(prefixed) > 1:
        raise InvalidArgument(
            f'service id prefix "{ref}" is ambiguous',
            reason="AMBIGUOUS_ID",
            metadata={"prefix": ref, "matches": len(prefixed)},
        )
    if not prefixed:
        raise NotFound(
            f"no such service: {ref}",
            reason="SERVICE_NOT_FOUND",
            metadata={"service": ref},
            resource=("service", ref),
        )
    return prefixed[0]


def running_count(record: ServiceRecord, views: Iterable[ContainerView]) -> int:
    """Replicas known to run: a node that is down cannot say so."""
    return sum(
        1 for v in views if v.desired.service == record.id and v.state == "running" and v.node_ready
    )


# Cluster state and the replica transaction -------------------------------------------------


@dataclass
class ClusterState:
    """One read of everything the controller decides on, with the revisions its transaction
    compares (so a decision made on a stale read is never written)."""

    nodes: dict[str, ClusterNode]
    containers: dict[str, DesiredContainer]
    revisions: dict[str, int]  # container id or service id -> mod revision of its record
    statuses: dict[str, ContainerStatus]
    services: dict[str, ServiceRecord]
    allocations: dict[str, Entry]
    # Service id -> ids of its replicas, when the reader keeps that index (the controller's
    # view); None: found by a scan of `containers`.
    by_service: dict[str, set[str]] | None = None

    def replica_ids(self, service_id: str) -> Iterable[str]:
        if self.by_service is not None:
            return self.by_service.get(service_id, ())
        return [c.id for c in self.containers.values() if c.service == service_id]

    def views(self) -> list[ContainerView]:
        ready = {node_id for node_id, node in self.nodes.items() if node.ready}
        return join_status(self.containers.values(), self.statuses, ready)


async def commit(
    store: Store,
    state: ClusterState,
    adds: Sequence[DesiredContainer] = (),
    removes: Sequence[DesiredContainer] = (),
    compares: Sequence[Compare] = (),
    ops: Sequence[Op] = (),
) -> bool:
    """Add and remove container records in one transaction, moving their reservations between
    node allocations. False when anything read in `state` changed meanwhile."""
    checks, writes = commit_ops(store, state, adds, removes, compares, ops)
    ok, _ = await store.txn(checks, writes)
    return bool(ok)


def commit_ops(
    store: Store,
    state: ClusterState,
    adds: Sequence[DesiredContainer] = (),
    removes: Sequence[DesiredContainer] = (),
    compares: Sequence[Compare] = (),
    ops: Sequence[Op] = (),
) -> tuple[list[Compare], list[Op]]:
    """The compares and writes of `commit`, for a caller that runs the transaction itself."""
    deltas: dict[str, list[int]] = {}
    for sign, containers in ((1, adds), (-1, removes)):
        for c in containers:
            delta = deltas.setdefault(c.node, [0, 0, 0])
            delta[0] += sign * c.cpu_millis
            delta[1] += sign * c.memory_bytes
            delta[2] += sign
    added_names = {c.name: c.id for c in adds}
    removed_names = {c.name for c in removes}
    checks = list(compares)
    writes = list(ops)
    for node, (cpu, memory, count) in deltas.items():
        entry = state.allocations.get(node)
        checks.append(store.unchanged(allocation_key(node), entry.mod_revision if entry else 0))
        current = entry.json() if entry else None
        writes.append(
            store.op_put(allocation_key(node), allocation_after(current, cpu, memory, count))
        )
    # Adds before removes: watchers see a moved container arrive on its new node before it
    # leaves the old one (the events: rescheduled, then the drained node's drain completed).
    for c in adds:
        checks.append(CONTAINERS.absent(store, c.id))
        if c.name not in removed_names:
            checks.append(store.absent(name_key(c.name)))
        writes += op_put_desired(store, c)
        writes.append(store.op_put(name_key(c.name), c.id.encode()))
    for c in removes:
        checks.append(CONTAINERS.unchanged(store, c.id, state.revisions.get(c.id, 0)))
        writes += op_delete_desired(store, c)
        node = state.nodes.get(c.node)
        if node is None or not node.ready:
            # No agent will remove it (nor its status); one that comes back removes the
            # unassigned container itself.
            writes.append(STATUSES.op_delete(store, c.id))
    for name in removed_names - added_names.keys():
        writes.append(store.op_delete(name_key(name)))
    return checks, writes


# The core the servicer calls ------------------------------------------------------------------


class ServiceCore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def _records(self) -> list[tuple[ServiceRecord, int]]:
        entries = await self.store.list(SERVICES)
        return [(ServiceRecord.from_json(e.value), e.mod_revision) for e in entries]

    async def _find(self, ref: str) -> tuple[ServiceRecord, int]:
        """A service by full id, name or unique id prefix (as `resolve_service`), read by key:
        its record and its name claim, never the whole family."""
        if not ref:
            raise InvalidArgument("a service id, id prefix or name is required")
        by_id, claim = await asyncio.gather(
            self.store.get(service_key(ref)), self.store.get(service_name_key(ref))
        )
        if by_id is None and claim is not None:
            # The claim is written and deleted with the record, in one transaction.
            by_id = await self.store.get(service_key(claim.value.decode()))
        if by_id is not None:
            return ServiceRecord.from_json(by_id.value), by_id.mod_revision
        # An id prefix: two keys tell a unique one from an ambiguous one.
        page = await self.store.range(service_key(ref), prefix_end(service_key(ref)), limit=2)
        if len(page.entries) > 1:
            raise InvalidArgument(
                f'service id prefix "{ref}" is ambiguous',
                reason="AMBIGUOUS_ID",
                metadata={"prefix": ref, "matches": await self.store.count(service_key(ref))},
            )
        records = [(ServiceRecord.from_json(e.value), e.mod_revision) for e in page.entries]
        found = resolve_service(ref, [r for r, _ in records])  # NotFound when none
        return next((r, rev) for r, rev in records if r.id == found.id)

    async def _replica_records(self, record: ServiceRecord) -> list[Versioned[DesiredContainer]]:
        """The service's replicas, found by their name claims (`<service>.<slot>`, written and
        deleted with each replica's record): an index of the service's replicas that the
        placement transaction already keeps, so reading them costs what the service holds, not
        what the cluster holds."""
        claims = await self.store.list(name_key(f"{record.name}."))
        found = await asyncio.gather(
            *(CONTAINERS.read(self.store, e.value.decode()) for e in claims)
        )
        return [v for v in found if v is not None and v.record.service == record.id]

    async def _replica_state(self, record: ServiceRecord) -> ClusterState:
        """What removing the service's replicas compares and writes: their records and their
        nodes' allocations and readiness, read by key."""
        found = await self._replica_records(record)
        node_ids = sorted({v.record.node for v in found})
        allocations, registered = await asyncio.gather(
            asyncio.gather(*(self.store.get(allocation_key(n)) for n in node_ids)),
            asyncio.gather(*(NODES.get(self.store, n) for n in node_ids)),
        )
        entries = {n: e for n, e in zip(node_ids, allocations, strict=True) if e is not None}
        nodes = build_nodes(
            {n: r for n, r in zip(node_ids, registered, strict=True) if r is not None},
            {n: e.json() for n, e in entries.items()},
            {},
            (v.record for v in found),
        )
        return ClusterState(
            nodes,
            {v.record.id: v.record for v in found},
            {v.record.id: v.mod_revision for v in found},
            {},
            {record.id: record},
            entries,
        )

    async def _replicas(self, record: ServiceRecord) -> list[ContainerView]:
        """The service's replicas with their statuses and whether their nodes are ready."""
        desired = [v.record for v in await self._replica_records(record)]
        node_ids = sorted({d.node for d in desired if d.node})
        statuses, nodes = await asyncio.gather(
            asyncio.gather(*(STATUSES.get(self.store, d.id) for d in desired)),
            asyncio.gather(*(NODES.get(self.store, n) for n in node_ids)),
        )
        ready = {n for n, node in zip(node_ids, nodes, strict=True) if node is not None}
        found = {d.id: s for d, s in zip(desired, statuses, strict=True) if s is not None}
        return join_status(desired, found, ready)

    async def create(
        self, record: ServiceRecord, principal: Principal | None = None
    ) -> ServiceRecord:
        """PermissionDenied (HOST_ACCESS_DENIED) when the template needs host access the
        principal (default: the request's) lacks; nothing is written then."""
        record.template = copy.deepcopy(record.template)
        await resolve_template(self.store, record)
        # Swarm restarts failed tasks; a replica that exits is restarted by its node.
        if record.template.restart_policy == "no":
            record.template.restart_policy = "always"
        validate(record)
        principal = principal or current_principal()
        record.host_access_by = admit(record.template, principal, "spec.template")
        record.changed_by = principal.name
        record.id = secrets.token_hex(32)
        record.created_at = record.updated_at = time.time()
        # NotFound for a secret that does not exist; the commit fails if one goes meanwhile.
        guards = await secret_guards(self.store, [record.template], "spec.template.secrets")
        guards += await network_guards(self.store, [record.template], "spec.template.network")
        # PORT_ALLOCATED for a port another service or a container holds.
        claims, claim_ops = await self._claim_ports(record)
        ok, _ = await self.store.txn(
            [self.store.absent(service_name_key(record.name)), *guards, *claims],
            [
                self.store.op_put(service_key(record.id), record.to_json()),
                self.store.op_put(service_name_key(record.name), record.id.encode()),
                *claim_ops,
            ],
        )
        if not ok:
            raise AlreadyExists(
                f'the service name "{record.name}" is already in use',
                reason="NAME_IN_USE",
                metadata={"name": record.name},
                resource=("service", record.name),
            )
        return record

    async def _claim_ports(self, record: ServiceRecord) -> tuple[list[Compare], list[Op]]:
        """The claims of the service's published ports (berthd.cluster.ports)."""
        if not record.ports:
            return [], []
        entries, _ = await self.store.snapshot(ALLOCATIONS)
        allocations = [e.json() for e in entries]
        return await claim_ports(self.store, record.id, record.ports, allocations)

    async def list(self) -> list[tuple[ServiceRecord, int]]:
        """Services in name order, each with its running replica count."""
        records = sorted((r for r, _ in await self._records()), key=lambda r: r.name)
        replicas = await asyncio.gather(*(self._replicas(r) for r in records))
        return [(r, running_count(r, views)) for r, views in zip(records, replicas, strict=True)]

    async def inspect(self, ref: str) -> tuple[ServiceRecord, int]:
        record, _ = await self._find(ref)
        return record, running_count(record, await self._replicas(record))

    async def ps(self, ref: str, include_stopped: bool = False) -> list[ContainerView]:
        record, _ = await self._find(ref)
        views = await self._replicas(record)
        if not include_stopped:
            views = [v for v in views if v.active]
        return sorted(views, key=lambda v: (v.desired.slot, -v.desired.scheduled_at))

    async def _change(self, ref: str, change: Any, expected_version: int = 0) -> ServiceRecord:
        """Apply `change(record)` with a compare on the record's revision; retried on races."""
        for _ in range(ATTEMPTS):
            record, revision = await self._find(ref)
            if expected_version and record.version != expected_version:
                raise FailedPrecondition(
                    f"service {record.name} is at version {record.version}, not "
                    f"{expected_version}: it changed meanwhile; inspect it and try again",
                    reason="VERSION_MISMATCH",
                    metadata={
                        "service_id": record.id,
                        "version": record.version,
                        "expected_version": expected_version,
                    },
                )
            change(record)
            validate(record)
            guards = await secret_guards(self.store, [record.template], "spec.template.secrets")
            guards += await network_guards(self.store, [record.template], "spec.template.network")
            claims, claim_ops = await self._claim_ports(record)
            claim_ops += await release_ports(self.store, record.id, keep=record.ports)
            record.updated_at = time.time()
            ok, _ = await self.store.txn(
                [self.store.unchanged(service_key(record.id), revision), *guards, *claims],
                [self.store.op_put(service_key(record.id), record.to_json()), *claim_ops],
            )
            if ok:
                return record
        raise Aborted(f"service {ref} is changing concurrently; try again")

    async def scale(
        self, ref: str, replicas: int, principal: Principal | None = None
    ) -> ServiceRecord:
        actor = (principal or current_principal()).name

        def change(record: ServiceRecord) -> None:
            record.replicas = replicas
            record.changed_by = actor

        return await self._change(ref, change)

    async def update(
        self,
        ref: str,
        spec: ServiceRecord,
        expected_version: int = 0,
        principal: Principal | None = None,
    ) -> ServiceRecord:
        """Replace the spec (not the name), bump the version: the controller rolls replicas.
        The new template is admitted as at create (the stamp is the updater's)."""
        principal = principal or current_principal()
        spec = copy.deepcopy(spec)
        await resolve_template(self.store, spec)
        stamp = admit(spec.template, principal, "spec.template")

        def change(record: ServiceRecord) -> None:
            if spec.name and spec.name != record.name:
                raise InvalidArgument(
                    f'a service cannot be renamed ("{record.name}" to "{spec.name}")'
                )
            remember_previous(record)
            for f in dataclasses.fields(ServiceRecord):
                if f.name not in NOT_SPEC:
                    setattr(record, f.name, copy.deepcopy(getattr(spec, f.name)))
            if record.template.restart_policy == "no":
                record.template.restart_policy = "always"
            record.host_access_by, record.changed_by = stamp, principal.name
            record.version += 1
            record.update_state, record.update_message = UPDATING, ""

        return await self._change(ref, change, expected_version)

    async def rollback(
        self,
        ref: str,
        message: str = "manually requested rollback",
        expected_version: int = 0,
        actor: str = "",
    ) -> ServiceRecord:
        """Return to the previous spec (Swarm's rollback: the two specs swap); the controller
        rolls the replicas of the failed version back with the rollback config."""
        actor = actor or current_principal().name

        def change(record: ServiceRecord) -> None:
            swap_to_previous(record, message)
            record.changed_by = actor

        return await self._change(ref, change, expected_version)

    async def remove(self, ref: str, principal: Principal | None = None) -> None:
        """Delete the service and its name with its first REMOVE_BATCH replicas in one
        transaction, then the other replicas REMOVE_BATCH at a time (etcd refuses bigger
        transactions); the controller would remove what is left of a removed service too. The
        record is first rewritten naming the remover (`changed_by`): a deletion carries no
        value, and the SERVICE_REMOVED event takes its actor from the record it last saw."""
        actor = (principal or current_principal()).name
        for _ in range(ATTEMPTS):
            record, revision = await self._find(ref)
            if record.changed_by != actor:
                record.changed_by = actor
                await self.store.txn(
                    [self.store.unchanged(service_key(record.id), revision)],
                    [self.store.op_put(service_key(record.id), record.to_json())],
                )
                continue  # read again: the delete compares the new revision
            state = await self._replica_state(record)
            replicas = sorted(state.containers.values(), key=lambda c: c.slot)
            ok = await commit(
                self.store,
                state,
                removes=replicas[:REMOVE_BATCH],
                compares=[self.store.unchanged(service_key(record.id), revision)],
                ops=[
                    self.store.op_delete(service_key(record.id)),
                    self.store.op_delete(service_name_key(record.name)),
                    *await release_ports(self.store, record.id),
                ],
            )
            if ok:
                if len(replicas) > REMOVE_BATCH:
                    await self._remove_replicas(record)
                return
        raise Aborted(f"service {ref} is changing concurrently; try again")

    async def _remove_replicas(self, record: ServiceRecord) -> None:
        """Remove a removed service's replicas, REMOVE_BATCH per transaction, each comparing
        what it read; a batch the controller changed meanwhile is read again. After ATTEMPTS
        refusals in a row the rest is left to the controller (it removes the replicas of a
        removed service)."""
        refused = 0
        while refused < ATTEMPTS:
            state = await self._replica_state(record)
            replicas = sorted(state.containers.values(), key=lambda c: c.slot)
            if not replicas:
                return
            if await commit(self.store, state, removes=replicas[:REMOVE_BATCH]):
                refused = 0
            else:
                refused += 1
