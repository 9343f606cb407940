"""The authorization table covers every RPC berth serves, names only fields that exist, and
gives each role and identity what the security model says (docs/api.md, issue "Security")."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from berth.builder.v1 import builder_pb2
from berth.cluster.v1 import cluster_pb2
from berth.image.v1 import image_pb2
from berth.node.v1 import node_pb2
from berth.registry.v1 import registry_pb2
from berthd.common.security.permissions import (
    IDENTITIES,
    METHODS,
    REPOSITORY_PERMISSIONS,
    ROLES,
    UPLOAD,
    Permission,
    Role,
    permissions_of,
    rule_for,
)

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def berth_proto_modules() -> list[ModuleType]:
    """The generated module of every .proto file in protos/: a new file is walked too."""
    modules = []
    for path in sorted(PROTOS.rglob("*.proto")):
        name = str(path.relative_to(PROTOS).with_suffix("")).replace("/", ".")
        modules.append(importlib.import_module(f"{name}_pb2"))
    return modules


def served_methods() -> Iterator[MethodDescriptor]:
    for module in [*berth_proto_modules(), health_pb2]:
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def test_the_walk_sees_every_service() -> None:
    services = {m.containing_service.full_name for m in served_methods()}
    for module in (builder_pb2, cluster_pb2, image_pb2, node_pb2, registry_pb2):
        assert set(module.DESCRIPTOR.services_by_name) <= {s.rpartition(".")[2] for s in services}
    assert "berth.cluster.v1.AccessService" in services


def full_name(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def test_every_rpc_of_every_service_has_a_rule() -> None:
    names = {full_name(m) for m in served_methods()}
    # Reflection is served under v1alpha and (the same servicer) v1.
    for service in reflection_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            names.add(full_name(method))
            names.add(full_name(method).replace(".v1alpha.", ".v1."))
    assert len(names) > 80
    assert sorted(n for n in names if rule_for(n) is None) == []
    # And no rule for a call nobody serves (a renamed RPC must take its rule along).
    assert sorted(set(METHODS) - names) == []


def test_repository_fields_exist_in_their_requests() -> None:
    for method in served_methods():
        rule = METHODS[full_name(method)]
        if rule.repository and rule.repository != UPLOAD:
            message = method.input_type
            for part in rule.repository.split("."):
                assert part in message.fields_by_name, full_name(method)
                message = message.fields_by_name[part].message_type or message
        if rule.repository:
            assert rule.repository_permission in REPOSITORY_PERMISSIONS, full_name(method)


def test_only_health_whoami_and_joining_are_public_and_reflection_needs_a_credential() -> None:
    public = sorted(n for n, r in METHODS.items() if r.permission == Permission.PUBLIC)
    assert public == [
        "/berth.cluster.v1.AccessService/GetIdentity",
        # The join token in the request is the credential of a node without a certificate.
        "/berth.cluster.v1.JoinService/JoinNode",
        *(f"/grpc.health.v1.Health/{m}" for m in ("Check", "List", "Watch")),
    ]
    assert rule_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").permission != (
        Permission.PUBLIC
    )
    assert rule_for("/no.Such/Method") is None


@pytest.mark.parametrize("name", sorted(n for n, r in METHODS.items() if r.mutates))
def test_a_reader_may_call_no_mutating_rpc(name: str) -> None:
    if name == "/berth.cluster.v1.JoinService/JoinNode":
        return  # checked against its join token, not a role
    assert METHODS[name].permission not in ROLES[Role.READER]


def test_roles_and_identities() -> None:
    developer = permissions_of([Role.DEVELOPER])
    assert Permission.HOST_ACCESS not in developer  # no bind-mounting / or --network host
    assert Permission.NODE_AGENT not in developer  # no containers behind the cluster's back
    assert Permission.TOKEN_MANAGE not in permissions_of([Role.OPERATOR])
    assert permissions_of([Role.ADMIN]) == frozenset(Permission)
    assert ROLES[Role.READER] < developer
    node = IDENTITIES["node"]
    # A node's certificate cannot create tokens, remove nodes or drive other nodes.
    assert {Permission.TOKEN_MANAGE, Permission.NODE_MANAGE, Permission.NODE_AGENT}.isdisjoint(node)
    assert Permission.CONTAINER_WRITE not in node
    # Only services and admins reach a node agent.
    may_drive_nodes = sorted(k for k, p in IDENTITIES.items() if Permission.NODE_AGENT in p)
    # The builder runs RUN steps on a node; the image service exports a committed layer.
    assert may_drive_nodes == ["service:builder", "service:cluster", "service:image"]


def test_the_roles_table_in_the_docs_is_the_code() -> None:
    """docs/security.md's role table, read back, gives ROLES: the docs cannot drift."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    header = "| permission | what | admin | operator | developer | reader |"
    rows = docs[docs.index(header) :].split("\n\n", 1)[0].splitlines()[2:]
    roles = [Role.ADMIN, Role.OPERATOR, Role.DEVELOPER, Role.READER]
    documented: dict[Role, set[Permission]] = {role: set() for role in roles}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        permission = Permission(cells[0].strip("`"))
        for role, cell in zip(roles, cells[2:], strict=True):
            if cell == "✓":
                documented[role].add(permission)
    assert {role: frozenset(p) for role, p in documented.items()} == {r: ROLES[r] for r in roles}
    assert {Permission(r.strip("|").split("|")[0].strip().strip("`")) for r in rows} == set(
        Permission
    )
