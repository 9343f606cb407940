"""Admission of host-level power (berthd.common.security.admission): which parts of a spec are
host access, who may ask for them, the stamp the cluster's records carry, and the node's own
check of that stamp."""

from __future__ import annotations

import json

import grpc
import pytest

from berth.error_details import Violation
from berth.types.v1 import container_pb2 as pb
from berthd.cluster.controller import MOVE, Action, Plan, realize
from berthd.cluster.core import ClusterNode
from berthd.cluster.services import CONTROLLER, ClusterState, ServiceRecord
from berthd.common.containers import ContainerConfig, MountSpec, to_spec
from berthd.common.errors import InvalidArgument, PermissionDenied
from berthd.common.security.admission import (
    BIND_MOUNT,
    CAPABILITY,
    HOST_ACCESS_DENIED,
    HOST_NETWORK,
    NEW_PRIVILEGES,
    SECCOMP_PROFILE,
    SECCOMP_UNCONFINED,
    admit,
    host_access,
)
from berthd.common.security.permissions import Role, permissions_of
from berthd.common.security.principal import Principal, from_certificate
from berthd.common.state.containers import DesiredContainer
from berthd.common.state.nodes import NodeRecord
from berthd.node.converge import CreateFailure, check_admitted

ADMIN = from_certificate("user:admin")
DEVELOPER = Principal("user:dev", permissions_of([Role.DEVELOPER]), via="token")
OPERATOR = Principal("user:ops", permissions_of([Role.OPERATOR]), via="token")
PROFILE = '{"defaultAction": "SCMP_ACT_ALLOW"}'


def config(**options) -> ContainerConfig:
    return ContainerConfig("busybox", command=["true"], **options)


def kinds(spec: ContainerConfig | pb.ContainerSpec) -> list[tuple[str, str]]:
    return [(r.kind, r.subject) for r in host_access(spec)]


def test_a_default_spec_needs_no_host_access() -> None:
    assert host_access(config()) == []
    assert host_access(pb.ContainerSpec(image="busybox")) == []
    # Confining it further, or asking for what every container has, is no host access either.
    quiet = config(
        cap_drop=["ALL"],
        cap_add=["CHOWN"],
        security_opt=["no-new-privileges=true", "no-new-privileges"],
        userns="host",
        network_mode="none",
        read_only_rootfs=True,
        mounts=[MountSpec("data", "/data")],  # a named volume: the node's own storage
    )
    assert host_access(quiet) == []
    # A default capability dropped and added back is the default set.
    assert host_access(config(cap_drop=["NET_RAW"], cap_add=["net_raw"])) == []
    assert admit(config(), DEVELOPER) == ""
    # A remapped user namespace is less power, not more: a developer may ask for it.
    remapped = config(userns="remap")
    assert host_access(remapped) == []
    assert host_access(pb.ContainerSpec(image="busybox", userns="remap")) == []
    assert admit(remapped, DEVELOPER) == ""


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"mounts": [MountSpec("/", "/host")]}, [(BIND_MOUNT, "mount//")]),
        (
            {"mounts": [MountSpec("/etc", "/e", True), MountSpec("v", "/v")]},
            [(BIND_MOUNT, "mount//etc")],
        ),
        ({"network_mode": "host"}, [(HOST_NETWORK, "network/host")]),
        ({"cap_add": ["SYS_ADMIN"]}, [(CAPABILITY, "capability/CAP_SYS_ADMIN")]),
        (
            {"cap_add": ["cap_net_admin", "CHOWN", "SYS_PTRACE"]},
            [(CAPABILITY, "capability/CAP_NET_ADMIN"), (CAPABILITY, "capability/CAP_SYS_PTRACE")],
        ),
        ({"cap_add": ["ALL"]}, [(CAPABILITY, "capability/ALL")]),
        ({"security_opt": ["seccomp=unconfined"]}, [(SECCOMP_UNCONFINED, "security_opt/seccomp")]),
        ({"security_opt": ["seccomp:unconfined"]}, [(SECCOMP_UNCONFINED, "security_opt/seccomp")]),
        ({"security_opt": [f"seccomp={PROFILE}"]}, [(SECCOMP_PROFILE, "security_opt/seccomp")]),
        (
            {"security_opt": ["no-new-privileges=false"]},
            [(NEW_PRIVILEGES, "security_opt/no-new-privileges")],
        ),
    ],
)
def test_each_kind_of_host_access(options: dict, expected: list[tuple[str, str]]) -> None:
    assert kinds(config(**options)) == expected
    # The same from the proto the RPCs carry.
    assert kinds(to_spec(config(**options))) == expected


def test_every_reason_of_one_spec_in_field_order() -> None:
    spec = config(
        mounts=[MountSpec("/", "/host"), MountSpec("/var/run", "/run/host", True)],
        network_mode="host",
        cap_add=["SYS_ADMIN"],
        security_opt=["seccomp=unconfined", "no-new-privileges=false"],
    )
    reasons = host_access(spec)
    assert [r.kind for r in reasons] == [
        BIND_MOUNT,
        BIND_MOUNT,
        HOST_NETWORK,
        CAPABILITY,
        SECCOMP_UNCONFINED,
        NEW_PRIVILEGES,
    ]
    assert reasons[0].description == "bind mount of host path / at /host"


def test_a_spec_that_cannot_be_read_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unknown capability") as bad:
        host_access(config(cap_add=["NOT_A_CAP"]), field="spec.template")
    assert bad.value.reason == "INVALID_SPEC"
    assert bad.value.details.field_violations[0][0] == "spec.template"


def test_only_host_access_holders_are_admitted_and_the_stamp_names_them() -> None:
    spec = config(mounts=[MountSpec("/", "/host")], network_mode="host")
    assert admit(spec, ADMIN) == "user:admin"
    # berth's cluster passes admitted specs on; the builder and a node hold no host access.
    assert admit(spec, from_certificate("service:cluster")) == "service:cluster"
    for principal in (DEVELOPER, OPERATOR, from_certificate("service:builder")):
        with pytest.raises(PermissionDenied) as refused:
            admit(spec, principal)
        error = refused.value
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == HOST_ACCESS_DENIED
        assert error.details.violations == (
            Violation(BIND_MOUNT, "mount//", "bind mount of host path / at /host"),
            Violation(HOST_NETWORK, "network/host", "the host network"),
        )
        assert str(error) == (
            f"{principal.name} may not give a container host access (bind mount of host "
            "path / at /host, the host network): it needs the host:access permission "
            "(admins by default)"
        )
        assert error.details.metadata["permission"] == "host:access"


def desired(spec: ContainerConfig, stamp: str = "") -> DesiredContainer:
    return DesiredContainer("c" * 64, "box", "n1", spec, host_access_by=stamp)


def test_a_node_refuses_an_unstamped_host_access_record() -> None:
    check_admitted(desired(config()))  # nothing to admit
    check_admitted(desired(config(network_mode="host"), "user:admin"))
    with pytest.raises(CreateFailure) as refused:
        check_admitted(desired(config(mounts=[MountSpec("/", "/host")])))
    assert refused.value.reason == HOST_ACCESS_DENIED
    assert "bind mount of host path / at /host" in refused.value.message


def test_records_written_before_admission_still_decode() -> None:
    record = desired(config(network_mode="host"), "user:admin")
    record.changed_by = "user:admin"
    data = json.loads(record.encode())
    assert (data["host_access_by"], data["changed_by"]) == ("user:admin", "user:admin")
    old = {k: v for k, v in data.items() if k not in ("host_access_by", "changed_by")}
    decoded = DesiredContainer.decode(json.dumps(old))
    assert (decoded.host_access_by, decoded.changed_by) == ("", "")
    newer = {**data, "some_future_field": 1}
    assert DesiredContainer.decode(json.dumps(newer)).host_access_by == "user:admin"
    service = ServiceRecord("s" * 64, "web", config(), 1, host_access_by="user:admin")
    raw = json.loads(service.to_json())
    del raw["host_access_by"], raw["changed_by"]
    assert ServiceRecord.from_json(json.dumps(raw)).host_access_by == ""
    raw["some_future_field"] = 1
    assert ServiceRecord.from_json(json.dumps(raw)).name == "web"


def test_replicas_carry_the_services_stamp_and_moves_keep_it() -> None:
    record = ServiceRecord(
        "s" * 64, "web", config(network_mode="host"), 1, host_access_by="user:admin"
    )
    replica = record.replica(1, "n1")
    assert (replica.host_access_by, replica.changed_by) == ("user:admin", CONTROLLER)
    check_admitted(replica)
    # A standalone container moved off a lost node keeps its stamp; the controller moved it.
    lost = desired(config(network_mode="host", restart_policy="always"), "user:admin")
    lost.changed_by = "user:admin"
    nodes = {
        "n1": ClusterNode("n1", NodeRecord("n1"), ready=False),
        "n2": ClusterNode("n2", NodeRecord("n2", cpus=4, memory_bytes=1 << 30), ready=True),
    }
    state = ClusterState(nodes, {lost.id: lost}, {lost.id: 1}, {}, {}, {})
    plan = Plan([Action(MOVE, container=lost.id, reason="node n1 lost")])
    ((moved, _),) = realize(plan, state, 1000.0).moved
    assert (moved.node, moved.host_access_by, moved.changed_by) == (
        "n2",
        "user:admin",
        CONTROLLER,
    )
