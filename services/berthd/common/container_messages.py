"""ContainerStatus messages (berth.types.v1), for every servicer that reports containers.

The node and the cluster report the same ContainerStatus; the conversion lives here so that
neither service imports the other. A ContainerSpec is converted by the container model itself
(`berth.containers.to_spec`/`from_spec`, through `berthd.common.containers`). State names come
from the client package's table (berth.enums.containers), the one the CLI uses.
"""

from __future__ import annotations

from berth.enums.containers import CONTAINER_STATES, HEALTH_STATUSES, PORT_PROTOCOLS
from berth.types.v1 import container_pb2 as pb
from berthd.common.messages import enum_name, timestamp


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
    failure_reason: str = "",
    failure_message: str = "",
    network: dict | None = None,
    health: dict | None = None,
) -> pb.ContainerStatus:
    """A ContainerStatus from a node's record of a container (times in seconds since the
    epoch). An unknown or empty state is sent as UNSPECIFIED: not created yet. The failure is
    set only when there is one (a reason or a message)."""
    failure = None
    if failure_reason or failure_message:
        failure = pb.ContainerFailure(
            reason=failure_reason or "CREATE_FAILED", message=failure_message
        )
    return pb.ContainerStatus(
        state=CONTAINER_STATES.value(state, pb.CONTAINER_STATE_UNSPECIFIED),
        pid=pid,
        exit_code=exit_code,
        oom_killed=oom_killed,
        created_at=timestamp(created_at),
        started_at=timestamp(started_at),
        finished_at=timestamp(finished_at),
        restart_count=restart_count,
        failure=failure,
        network_settings=network_settings(network),
        health=container_health(health),
    )


def container_health(health: dict | None) -> pb.ContainerHealth | None:
    """A running container's health (the node's berthd.node.health.Health as JSON), None when
    it has no health check."""
    if not health or not health.get("status"):
        return None
    return pb.ContainerHealth(
        status=HEALTH_STATUSES.value(str(health["status"]), pb.HEALTH_STATUS_UNSPECIFIED),
        failing_streak=int(health.get("failing_streak") or 0),
        log=[
            pb.HealthProbeResult(
                started_at=timestamp(entry.get("start")),
                ended_at=timestamp(entry.get("end")),
                exit_code=int(entry.get("exit_code", 0)),
                output=str(entry.get("output", "")).encode(),
            )
            for entry in health.get("log") or []
        ],
    )


def network_settings(network: dict | None) -> pb.NetworkSettings | None:
    """A running container's place on its network (the node's attachment: network name and
    id, ip_address, prefix_length, gateway, mac_address), None when it has none."""
    if not network:
        return None
    return pb.NetworkSettings(
        network=str(network.get("network", "")),
        network_id=str(network.get("network_id", "")),
        ip_address=str(network.get("ip_address", "")),
        ip_prefix_length=int(network.get("prefix_length", 0) or 0),
        gateway=str(network.get("gateway", "")),
        mac_address=str(network.get("mac_address", "")),
        ports=[
            pb.PortBinding(
                host_ip=str(p.get("host_ip", "")),
                host_port=int(p.get("host_port", 0)),
                container_port=int(p.get("container_port", 0)),
                protocol=PORT_PROTOCOLS.value(str(p.get("protocol", "tcp")), 0),
            )
            for p in network.get("ports") or []
        ],
    )


def state_filter(value: int, field: str = "state") -> str:
    """A ListContainers state filter as a state name; "" (no filter) for UNSPECIFIED;
    INVALID_ARGUMENT naming `field` for a value without a name."""
    return enum_name(CONTAINER_STATES, value, field)
