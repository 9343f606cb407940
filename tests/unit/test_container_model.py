"""berth.containers: the one container model, its proto conversion and its JSON record, and the
server's face of it (berthd.common.containers), which refuses with the same words."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from berth.containers import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    ContainerConfig,
    InvalidContainerConfig,
    MountSpec,
    SecretReference,
    SecurityOptions,
    capabilities,
    from_spec,
    security_options,
    to_spec,
)
from berth.types.v1 import container_pb2 as pb
from berthd.common import containers as server
from berthd.common.errors import InvalidArgument

FULL = ContainerConfig(
    "registry.example/team/app:1.2",
    name="web.1",
    entrypoint=[""],
    command=["sh", "-c", "echo héllo"],
    env=["A=1", "EMPTY="],
    working_dir="/srv",
    user="1000:1000",
    hostname="web-1",
    labels={"tier": "front", "é": "ü"},
    mounts=[MountSpec("/data", "/data", True), MountSpec("cache", "/cache")],
    read_only_rootfs=True,
    memory_bytes=64 << 20,
    cpu_millis=500,
    cpu_shares=512,
    pids_limit=100,
    restart_policy="on-failure",
    restart_max_retries=3,
    network_mode="host",
    tty=True,
    stdin_open=True,
    cap_add=["NET_ADMIN"],
    cap_drop=["cap_mknod"],
    security_opt=["seccomp=unconfined", "no-new-privileges=false"],
    userns="host",
    secrets=[SecretReference("db-pass"), SecretReference("tls.key", "key.pem", 0o400, 70, 70)],
)
# What berthd.common.containers wrote before the model moved to the client package: etcd
# records (cluster/containers/<id>, cluster/services/<id>) and every node's container.json.
FULL_JSON = (
    '{"image":"registry.example/team/app:1.2","name":"web.1","entrypoint":[""],'
    '"command":["sh","-c","echo héllo"],"env":["A=1","EMPTY="],"working_dir":"/srv",'
    '"user":"1000:1000","hostname":"web-1","labels":{"tier":"front","é":"ü"},'
    '"mounts":[{"source":"/data","target":"/data","read_only":true},'
    '{"source":"cache","target":"/cache","read_only":false}],"read_only_rootfs":true,'
    '"memory_bytes":67108864,"cpu_millis":500,"cpu_shares":512,"pids_limit":100,'
    '"restart_policy":"on-failure","restart_max_retries":3,"network_mode":"host",'
    '"tty":true,"stdin_open":true,'  # added with interactive containers
    # added with the security options
    '"cap_add":["NET_ADMIN"],"cap_drop":["cap_mknod"],'
    '"security_opt":["seccomp=unconfined","no-new-privileges=false"],"userns":"host",'
    # added with secrets
    '"secrets":[{"name":"db-pass","target":"","mode":0,"uid":0,"gid":0},'
    '{"name":"tls.key","target":"key.pem","mode":256,"uid":70,"gid":70}],'
    # added with names on networks, then with published ports
    '"network_aliases":[],"ports":[]}'
)
DEFAULT_JSON = (
    '{"image":"busybox","name":"","entrypoint":[],"command":[],"env":[],"working_dir":"",'
    '"user":"","hostname":"","labels":{},"mounts":[],"read_only_rootfs":false,'
    '"memory_bytes":0,"cpu_millis":0,"cpu_shares":0,"pids_limit":0,"restart_policy":"no",'
    '"restart_max_retries":0,"network_mode":"none","tty":false,"stdin_open":false,'
    '"cap_add":[],"cap_drop":[],"security_opt":[],"userns":"","secrets":[],'
    '"network_aliases":[],"ports":[]}'
)


# --- the proto --------------------------------------------------------------------------------


def test_a_config_round_trips_through_its_spec() -> None:
    spec = to_spec(FULL)
    assert spec.restart_policy.name == pb.RESTART_POLICY_NAME_ON_FAILURE
    assert spec.network_mode == pb.NETWORK_MODE_HOST
    assert (spec.tty, spec.stdin_open) == (True, True)
    assert [(m.source, m.target, m.read_only) for m in spec.mounts] == [
        ("/data", "/data", True),
        ("cache", "/cache", False),
    ]
    assert spec.resources.memory_bytes == 64 << 20
    assert from_spec(spec) == FULL
    assert to_spec(from_spec(spec)) == spec
    # The server's face converts the same way.
    assert server.from_spec(server.to_spec(FULL)) == FULL


def test_unset_policies_read_as_docker_defaults() -> None:
    config = from_spec(pb.ContainerSpec(image="busybox"))
    assert config == ContainerConfig("busybox")
    assert (config.restart_policy, config.network_mode) == ("no", "none")
    config.validate()
    spec = to_spec(config)
    assert spec.restart_policy.name == pb.RESTART_POLICY_NAME_NO
    assert spec.network_mode == pb.NETWORK_MODE_NONE


def test_an_unknown_enum_value_is_refused_by_client_and_server() -> None:
    spec = pb.ContainerSpec(image="busybox", network_mode=7)  # type: ignore[arg-type]
    message = "unknown network mode 7: expected one of none, host, network"
    with pytest.raises(InvalidContainerConfig) as client_error:
        from_spec(spec)
    assert (client_error.value.message, client_error.value.code) == (message, "INVALID_ARGUMENT")
    with pytest.raises(InvalidArgument) as server_error:
        server.from_spec(spec)
    assert str(server_error.value) == message
    spec = pb.ContainerSpec(image="busybox")
    spec.restart_policy.name = 9  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="unknown restart policy 9"):
        server.from_spec(spec)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"restart_policy": "sometimes"}, 'invalid restart policy "sometimes": expected one of'),
        ({"network_mode": "bridge"}, 'unsupported network mode "bridge": expected none, host'),
    ],
)
def test_to_spec_refuses_a_policy_name_it_has_no_value_for(
    fields: dict[str, Any], message: str
) -> None:
    config = ContainerConfig("busybox", **fields)
    with pytest.raises(InvalidContainerConfig, match=message):
        to_spec(config)
    with pytest.raises(InvalidArgument, match=message):
        server.to_spec(config)


# --- the JSON record --------------------------------------------------------------------------


def test_the_record_keeps_its_shape() -> None:
    assert FULL.to_json() == FULL_JSON
    assert ContainerConfig("busybox").to_json() == DEFAULT_JSON
    assert ContainerConfig.from_json(FULL_JSON) == FULL
    assert ContainerConfig.from_json(FULL_JSON.encode()) == FULL
    assert server.from_json(DEFAULT_JSON) == ContainerConfig("busybox")


def test_records_of_older_and_newer_agents_load() -> None:
    # A newer agent's extra fields are ignored; fields an older one did not write default.
    newer = json.loads(FULL_JSON) | {"future_field": 1}
    assert ContainerConfig.from_json(json.dumps(newer)) == FULL
    older = {"image": "busybox", "command": ["true"], "mounts": [{"target": "/x", "source": "vol"}]}
    assert server.from_json(json.dumps(older)) == ContainerConfig(
        "busybox", command=["true"], mounts=[MountSpec("vol", "/x")]
    )


def test_json_round_trip() -> None:
    cfg = ContainerConfig(
        "img",
        name="web",
        entrypoint=[""],
        command=["run"],
        labels={"team": "a"},
        mounts=[MountSpec("/srv", "/data", read_only=True)],
        memory_bytes=64 * 1024 * 1024,
        restart_policy="always",
    )
    assert ContainerConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"name": "web"}', 'no "image"'),
        ('{"image": "i", "env": "A=1"}', "env must be a list of strings"),
        ('{"image": "i", "memory_bytes": "1g"}', "memory_bytes must be an integer"),
        ('{"image": "i", "mounts": [{"source": "/s"}]}', r"mounts\[0\]"),
        ('{"image": "i", "labels": {"a": 1}}', "labels"),
    ],
)
def test_from_json_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidContainerConfig, match=message) as client_error:
        ContainerConfig.from_json(text)
    with pytest.raises(InvalidArgument) as server_error:
        server.from_json(text)
    assert str(server_error.value) == client_error.value.message


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image": ""}, "image is required"),
        ({"name": "a"}, "invalid container name"),
        ({"name": "-web"}, "invalid container name"),
        ({"name": "we b"}, "invalid container name"),
        ({"env": ["NOVALUE"]}, "expected KEY=VALUE"),
        ({"env": ["=x"]}, "expected KEY=VALUE"),
        ({"working_dir": "rel"}, "absolute path"),
        ({"hostname": "-bad"}, "invalid hostname"),
        ({"hostname": "a" * 64}, "invalid hostname"),
        ({"hostname": "under_score"}, "invalid hostname"),
        ({"mounts": [MountSpec("/src", "data")]}, "target must be an absolute path"),
        ({"mounts": [MountSpec("/src", "/")]}, "target cannot be '/'"),
        ({"mounts": [MountSpec("/src", "/a/../")]}, "'..'"),
        ({"mounts": [MountSpec("/s", "/x"), MountSpec("/t", "/x/")]}, "duplicate mount point"),
        ({"mounts": [MountSpec("bad name", "/x")]}, "volume name"),
        ({"mounts": [("/s", "/x", False)]}, "mounts must be a list of mounts"),
        ({"memory_bytes": 1024}, "minimum is 6 MiB"),
        ({"memory_bytes": -1}, "must not be negative"),
        ({"cpu_millis": -500}, "must not be negative"),
        ({"cpu_millis": 5}, "at least 10"),
        ({"cpu_shares": 1}, "cpu_shares"),
        ({"pids_limit": True}, "must be an integer"),
        ({"restart_policy": "sometimes"}, "invalid restart policy"),
        ({"restart_policy": "always", "restart_max_retries": 3}, "maximum retry count"),
        ({"network_mode": "bridge"}, "unsupported network mode"),
        ({"user": "a:b:c"}, "invalid user"),
        ({"command": ["a\x00b"]}, "NUL"),
    ],
)
def test_client_and_server_refuse_with_the_same_message(
    fields: dict[str, Any], message: str
) -> None:
    cfg = ContainerConfig(**{"image": "img", **fields})
    with pytest.raises(InvalidContainerConfig, match=message) as client_error:
        cfg.validate()
    assert client_error.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument) as server_error:
        server.validate(cfg)
    assert str(server_error.value) == client_error.value.message


def test_messages_are_kept_exactly() -> None:
    """Values are JSON-quoted, so a message is one line; runs of spaces in them stay."""
    cfg = ContainerConfig("img", name="a  b")
    with pytest.raises(InvalidContainerConfig) as error:
        cfg.validate()
    assert error.value.message == (
        'invalid container name "a  b": only [a-zA-Z0-9][a-zA-Z0-9_.-]+ is allowed'
    )
    assert str(error.value) == error.value.message


def test_valid_config_passes() -> None:
    config = ContainerConfig(
        "registry/app:1",
        name="web.1_a-b",
        env=["A=1", "EMPTY="],
        hostname="web-1.example",
        mounts=[MountSpec("/srv", "/data", True), MountSpec("vol_1", "/cache")],
        memory_bytes=6 * 1024 * 1024,
        cpu_millis=10,
        restart_policy="on-failure",
        restart_max_retries=3,
        network_mode="host",
    )
    config.validate()
    server.validate(config)
    FULL.validate()


def test_the_servers_checks_raise_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match='invalid user "a:b:c": expected user'):
        server.check_user("a:b:c")
    with pytest.raises(InvalidArgument, match='invalid hostname "-x"'):
        server.check_hostname("-x")
    server.check_user("1000:1000")
    server.check_hostname("web-1")


# --- capabilities and security options ---------------------------------------------------------


def caps(**fields: Any) -> list[str]:
    return capabilities(ContainerConfig("busybox", **fields))


def test_capabilities_follow_dockers_rules() -> None:
    assert caps() == list(DEFAULT_CAPABILITIES)
    assert caps(cap_add=["sys_admin", "CAP_NET_ADMIN", "SYS_ADMIN"]) == [
        *DEFAULT_CAPABILITIES,
        "CAP_SYS_ADMIN",
        "CAP_NET_ADMIN",
    ]
    assert caps(cap_drop=["net_raw", "CAP_CHOWN"]) == [
        c for c in DEFAULT_CAPABILITIES if c not in ("CAP_NET_RAW", "CAP_CHOWN")
    ]
    assert caps(cap_drop=["ALL"]) == []
    assert caps(cap_drop=["all"], cap_add=["NET_BIND_SERVICE"]) == ["CAP_NET_BIND_SERVICE"]
    assert caps(cap_add=["ALL"]) == list(ALL_CAPABILITIES)
    assert caps(cap_add=["ALL"], cap_drop=["SYS_ADMIN"]) == [
        c for c in ALL_CAPABILITIES if c != "CAP_SYS_ADMIN"
    ]
    # Added and dropped: added, as in moby.
    assert "CAP_SYS_TIME" in caps(cap_add=["SYS_TIME"], cap_drop=["SYS_TIME"])
    assert len(ALL_CAPABILITIES) == 41


def opts(*security_opt: str) -> SecurityOptions:
    return security_options(ContainerConfig("busybox", security_opt=list(security_opt)))


def test_security_options_read_dockers_syntax() -> None:
    assert opts() == SecurityOptions("default", True)
    assert opts("seccomp=unconfined") == SecurityOptions("unconfined", True)
    assert opts("seccomp:unconfined", "no-new-privileges:false").no_new_privileges is False
    assert opts("no-new-privileges").no_new_privileges is True
    assert opts("no-new-privileges=false", "no-new-privileges=true").no_new_privileges is True
    profile = '{"defaultAction": "SCMP_ACT_ALLOW"}'
    assert opts(f"seccomp={profile}").seccomp == profile


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cap_add": ["FLY"]}, 'unknown capability "FLY": expected a name such as NET_ADMIN'),
        ({"cap_drop": ["CAP_"]}, 'unknown capability "CAP_"'),
        ({"cap_add": "NET_ADMIN"}, "cap_add must be a list of strings"),
        ({"security_opt": ["apparmor=unconfined"]}, 'unsupported security option "apparmor='),
        ({"security_opt": ["no-new-privileges=maybe"]}, "no-new-privileges takes true or false"),
        ({"security_opt": ["seccomp=/etc/profile.json"]}, "seccomp takes unconfined or a"),
        ({"security_opt": ["seccomp={nope"]}, "invalid seccomp profile in security option"),
        ({"security_opt": ['seccomp={"syscalls": []}']}, "with a defaultAction"),
        ({"userns": "private"}, 'unsupported user namespace mode "private": host (the default)'),
        (
            {"userns": "remap", "network_mode": "host"},
            "user namespace mode remap cannot share the host's network namespace",
        ),
    ],
)
def test_bad_security_options_are_refused(fields: dict[str, Any], message: str) -> None:
    config = ContainerConfig("busybox", **fields)
    with pytest.raises(InvalidContainerConfig, match=re.escape(message)):
        config.validate()
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        server.validate(config)


# --- secrets ----------------------------------------------------------------------------------


def test_a_secret_reference_defaults_to_its_name_and_0444() -> None:
    assert (SecretReference("db").file_name, SecretReference("db").file_mode) == ("db", 0o444)
    named = SecretReference("db", "pw", 0o400)
    assert (named.file_name, named.file_mode) == ("pw", 0o400)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"secrets": [SecretReference("-db")]}, 'invalid secret name "-db": use letters'),
        ({"secrets": [SecretReference("a" * 65)]}, "at most 64 characters"),
        ({"secrets": [SecretReference("")]}, "a secret name is required"),
        ({"secrets": [SecretReference("db", "a/b")]}, 'invalid target "a/b": expected a file'),
        ({"secrets": [SecretReference("db", "..")]}, 'invalid target ".."'),
        (
            {"secrets": [SecretReference("db"), SecretReference("pw", "db")]},
            'duplicate secret target "/run/secrets/db"',
        ),
        ({"secrets": [SecretReference("db", mode=0o1777)]}, "mode 0o1777 is invalid"),
        ({"secrets": [SecretReference("db", uid=-1)]}, 'secret "db" uid must not be negative'),
        (
            {"secrets": [SecretReference("db")], "mounts": [MountSpec("/x", "/run/secrets")]},
            'mount target "/run/secrets" conflicts with the container\'s secrets',
        ),
        ({"secrets": ["db"]}, "secrets must be a list of secret references"),
    ],
)
def test_bad_secret_references_are_refused(fields: dict[str, Any], message: str) -> None:
    config = ContainerConfig("busybox", **fields)
    with pytest.raises(InvalidContainerConfig, match=re.escape(message)):
        config.validate()
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        server.validate(config)
