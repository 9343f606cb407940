"""berthd.common.container_messages: ContainerConfig <-> berth.types.v1, for node and cluster."""

from __future__ import annotations

import pytest

from berth.types.v1 import container_pb2 as pb
from berthd.common.container_messages import (
    config_from_spec,
    container_status,
    spec_from_config,
    state_filter,
)
from berthd.common.containers import ContainerConfig, MountSpec
from berthd.common.errors import InvalidArgument


def test_a_config_round_trips_through_its_spec() -> None:
    config = ContainerConfig(
        image="busybox",
        name="web",
        entrypoint=[""],
        command=["sh", "-c", "true"],
        env=["A=1"],
        working_dir="/srv",
        user="1000:1000",
        hostname="web",
        labels={"tier": "front"},
        mounts=[MountSpec("/data", "/data", True), MountSpec("cache", "/cache")],
        read_only_rootfs=True,
        memory_bytes=64 << 20,
        cpu_millis=500,
        cpu_shares=512,
        pids_limit=100,
        restart_policy="on-failure",
        restart_max_retries=3,
        network_mode="host",
    )
    spec = spec_from_config(config)
    assert spec.restart_policy.name == pb.RESTART_POLICY_NAME_ON_FAILURE
    assert spec.network_mode == pb.NETWORK_MODE_HOST
    assert config_from_spec(spec) == config


def test_unset_policies_read_as_docker_defaults() -> None:
    config = config_from_spec(pb.ContainerSpec(image="busybox"))
    assert (config.restart_policy, config.network_mode) == ("no", "none")
    config.validate()


def test_an_unknown_enum_value_is_invalid_argument() -> None:
    spec = pb.ContainerSpec(image="busybox", network_mode=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="unknown network mode 7: expected one of none"):
        config_from_spec(spec)
    spec = pb.ContainerSpec(image="busybox")
    spec.restart_policy.name = 9  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="unknown restart policy 9"):
        config_from_spec(spec)


def test_container_status() -> None:
    status = container_status("exited", exit_code=3, started_at=1.5, finished_at=None)
    assert status.state == pb.CONTAINER_STATE_EXITED
    assert status.exit_code == 3
    assert status.started_at.ToNanoseconds() == 1_500_000_000
    assert not status.HasField("finished_at")
    assert container_status("").state == pb.CONTAINER_STATE_UNSPECIFIED  # not created yet
    assert state_filter(pb.CONTAINER_STATE_RUNNING) == "running"
    assert state_filter(pb.CONTAINER_STATE_UNSPECIFIED) == ""  # no filter
