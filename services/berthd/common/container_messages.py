"""ContainerConfig <-> berth.types.v1 messages, for every servicer that speaks of containers.

The node and the cluster take the same ContainerSpec and report the same ContainerStatus; the
conversions live here so that neither service imports the other. Enum names come from the
client package's tables (berth.enums.containers), the same ones the CLI uses.
"""

from __future__ import annotations

from berth.enums import EnumTable
from berth.enums.containers import CONTAINER_STATES, NETWORK_MODES, RESTART_POLICIES
from berth.types.v1 import container_pb2 as pb
from berthd.common.containers import ContainerConfig, MountSpec
from berthd.common.errors import InvalidArgument
from berthd.common.messages import timestamp


def _name(table: EnumTable, value: int, what: str) -> str:
    try:
        return table.name(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown {what} {value}: expected one of {', '.join(table.names)}"
        ) from None


def config_from_spec(spec: pb.ContainerSpec) -> ContainerConfig:
    """The spec as plain data, not yet validated (ContainerConfig.validate does that)."""
    res = spec.resources
    return ContainerConfig(
        image=spec.image,
        name=spec.name,
        entrypoint=list(spec.entrypoint),
        command=list(spec.command),
        env=list(spec.env),
        working_dir=spec.working_dir,
        user=spec.user,
        hostname=spec.hostname,
        labels=dict(spec.labels),
        mounts=[MountSpec(m.source, m.target, m.read_only) for m in spec.mounts],
        read_only_rootfs=spec.read_only_rootfs,
        memory_bytes=res.memory_bytes,
        cpu_millis=res.cpu_millis,
        cpu_shares=res.cpu_shares,
        pids_limit=res.pids_limit,
        restart_policy=_name(RESTART_POLICIES, spec.restart_policy.name, "restart policy"),
        restart_max_retries=spec.restart_policy.max_retries,
        network_mode=_name(NETWORK_MODES, spec.network_mode, "network mode"),
    )


def spec_from_config(config: ContainerConfig) -> pb.ContainerSpec:
    return pb.ContainerSpec(
        image=config.image,
        name=config.name,
        entrypoint=config.entrypoint,
        command=config.command,
        env=config.env,
        working_dir=config.working_dir,
        user=config.user,
        hostname=config.hostname,
        labels=config.labels,
        mounts=[
            pb.Mount(source=m.source, target=m.target, read_only=m.read_only) for m in config.mounts
        ],
        read_only_rootfs=config.read_only_rootfs,
        resources=pb.Resources(
            memory_bytes=config.memory_bytes,
            cpu_millis=config.cpu_millis,
            cpu_shares=config.cpu_shares,
            pids_limit=config.pids_limit,
        ),
        restart_policy=pb.RestartPolicy(
            name=RESTART_POLICIES.value(config.restart_policy),
            max_retries=config.restart_max_retries,
        ),
        network_mode=NETWORK_MODES.value(config.network_mode),
    )


def container_status(
    state: str,
    *,
    pid: int = 0,
    exit_code: int = 0,
    oom_killed: bool = False,
    created_at: float | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
    restart_count: int = 0,
    error: str = "",
) -> pb.ContainerStatus:
    """A ContainerStatus from a node's record of a container (times in seconds since the
    epoch). An unknown or empty state is sent as UNSPECIFIED: not created yet."""
    return pb.ContainerStatus(
        state=CONTAINER_STATES.value(state, pb.CONTAINER_STATE_UNSPECIFIED),
        pid=pid,
        exit_code=exit_code,
        oom_killed=oom_killed,
        created_at=timestamp(created_at),
        started_at=timestamp(started_at),
        finished_at=timestamp(finished_at),
        restart_count=restart_count,
        error=error,
    )


def state_filter(value: int) -> str:
    """A ListContainers state filter as a state name; "" (no filter) for UNSPECIFIED."""
    return CONTAINER_STATES.name(value, "")
