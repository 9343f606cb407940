"""Validation at the front door: what a node would refuse is refused where a request comes in,
as INVALID_ARGUMENT naming the field (reason INVALID_SPEC for a spec, UNKNOWN_ENUM_VALUE for an
enum filter), with one rule shared by the cluster, the node and the client package."""

from __future__ import annotations

import pytest

from berth.containers import ContainerConfig, MountSpec
from berth.enums.cluster import EVENT_TYPES
from berth.reference import parse_container_image
from berth.types.v1 import container_pb2 as pb
from berthd.common.container_messages import state_filter
from berthd.common.containers import from_spec, validate
from berthd.common.errors import InvalidArgument
from berthd.common.messages import UNKNOWN_ENUM_VALUE, enum_name, enum_names
from berthd.node.layers import parse_image_ref

DIGEST = "sha256:" + "a" * 64


def refused(call) -> tuple[str, list[str], str]:
    with pytest.raises(InvalidArgument) as caught:
        call()
    details = caught.value.details
    return details.reason, [name for name, _ in details.field_violations], str(caught.value)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (pb.ContainerSpec(image="a", network_mode=99), "network_mode"),
        (
            pb.ContainerSpec(image="a", restart_policy=pb.RestartPolicy(name=7)),
            "restart_policy.name",
        ),
    ],
)
def test_an_unknown_enum_value_in_a_spec_names_its_field(spec: pb.ContainerSpec, field: str):
    reason, fields, message = refused(lambda: from_spec(spec))
    assert (reason, fields) == ("INVALID_SPEC", [f"spec.{field}"])
    assert message.startswith("unknown ") and "expected one of" in message
    # Under the field the spec came in (a service's template).
    _, fields, _ = refused(lambda: from_spec(spec, "spec.template"))
    assert fields == [f"spec.template.{field}"]


@pytest.mark.parametrize(
    ("image", "words"),
    [
        ("::::", 'invalid image "::::": invalid repository name ""'),
        ("", "image is required"),
        ("Upper/case", 'invalid image "Upper/case": invalid repository name'),
        ("host:5000/app", 'invalid image "host:5000/app": invalid repository name'),
        ("app:bad:tag", 'invalid image "app:bad:tag": invalid tag'),
        ("app@sha256:12", 'invalid image "app@sha256:12": invalid digest'),
    ],
)
def test_an_image_no_node_can_pull_is_refused_with_its_field(image: str, words: str) -> None:
    config = ContainerConfig(image=image)
    reason, fields, message = refused(lambda: validate(config))
    assert (reason, fields) == ("INVALID_SPEC", ["spec.image"])
    assert message.startswith(words), message
    # The node refuses the same name when it pulls.
    with pytest.raises(InvalidArgument):
        parse_image_ref(image)


@pytest.mark.parametrize(
    "image",
    ["busybox", "test/busybox:1", "a.b/c:1", "localhost/x", f"app@{DIGEST}", DIGEST, "abc123"],
)
def test_every_image_a_node_takes_passes_the_front_door(image: str) -> None:
    validate(ContainerConfig(image=image))
    assert str(parse_container_image(image)) == str(parse_image_ref(image))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (ContainerConfig(image="a", name="-x"), "name"),
        (ContainerConfig(image="a", env=["NOEQUALS"]), "env"),
        (ContainerConfig(image="a", working_dir="rel"), "working_dir"),
        (ContainerConfig(image="a", memory_bytes=1), "resources.memory_bytes"),
        (ContainerConfig(image="a", pids_limit=-1), "resources.pids_limit"),
        (ContainerConfig(image="a", restart_max_retries=2), "restart_policy.max_retries"),
        (ContainerConfig(image="a", cap_drop=["NOPE"]), "cap_drop"),
        (ContainerConfig(image="a", security_opt=["seccomp"]), "security_opt"),
        (ContainerConfig(image="a", mounts=[MountSpec("/h", "rel")]), "mounts"),
        (ContainerConfig(image="a", userns="other"), "userns"),
    ],
)
def test_each_refused_field_is_named(config: ContainerConfig, field: str) -> None:
    reason, fields, _ = refused(lambda: validate(config))
    assert (reason, fields) == ("INVALID_SPEC", [f"spec.{field}"])


def test_an_unknown_enum_value_in_a_request_is_invalid_argument_naming_the_field() -> None:
    assert state_filter(0) == ""
    assert state_filter(pb.CONTAINER_STATE_RUNNING) == "running"
    reason, fields, message = refused(lambda: state_filter(99))
    assert (reason, fields) == (UNKNOWN_ENUM_VALUE, ["state"])
    assert message == (
        "unknown state 99: expected one of created, running, exited, restarting, create_failed"
    )
    assert enum_name(EVENT_TYPES, 0, "types") == ""
    assert enum_names(EVENT_TYPES, [0, 1], "types") == [EVENT_TYPES.name(1)]
    reason, fields, _ = refused(lambda: enum_names(EVENT_TYPES, [1, 99], "types"))
    assert (reason, fields) == (UNKNOWN_ENUM_VALUE, ["types[1]"])
