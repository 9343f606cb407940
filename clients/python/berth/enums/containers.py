"""Tables for the container enums shared by the node and the cluster (berth.types.v1)."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.types.v1 import container_pb2 as pb

# As `docker ps` shows them.
CONTAINER_STATES = EnumTable(
    pb.ContainerState,
    {
        pb.CONTAINER_STATE_CREATED: "created",
        pb.CONTAINER_STATE_RUNNING: "running",
        pb.CONTAINER_STATE_EXITED: "exited",
        pb.CONTAINER_STATE_RESTARTING: "restarting",
        pb.CONTAINER_STATE_CREATE_FAILED: "create_failed",
    },
)
# Docker's --restart values.
RESTART_POLICIES = EnumTable(
    pb.RestartPolicyName,
    {
        pb.RESTART_POLICY_NAME_NO: "no",
        pb.RESTART_POLICY_NAME_ON_FAILURE: "on-failure",
        pb.RESTART_POLICY_NAME_ALWAYS: "always",
    },
    unspecified="no",
)
# Docker's --network values.
NETWORK_MODES = EnumTable(
    pb.NetworkMode,
    # "network": a berth network, named in ContainerSpec.network (the model's network_mode
    # then holds the network's name itself, as Docker's HostConfig.NetworkMode does).
    {
        pb.NETWORK_MODE_NONE: "none",
        pb.NETWORK_MODE_HOST: "host",
        pb.NETWORK_MODE_NETWORK: "network",
    },
    unspecified="none",
)
# Docker's port protocols (`-p 80/udp`).
PORT_PROTOCOLS = EnumTable(
    pb.PortProtocol,
    {pb.PORT_PROTOCOL_TCP: "tcp", pb.PORT_PROTOCOL_UDP: "udp"},
    unspecified="tcp",
)
LOG_STREAMS = EnumTable(
    pb.LogStream, {pb.LOG_STREAM_STDOUT: "stdout", pb.LOG_STREAM_STDERR: "stderr"}
)

# Docker's State.Health.Status values ("" when the container has no health check).
HEALTH_STATUSES = EnumTable(
    pb.HealthStatus,
    {
        pb.HEALTH_STATUS_STARTING: "starting",
        pb.HEALTH_STATUS_HEALTHY: "healthy",
        pb.HEALTH_STATUS_UNHEALTHY: "unhealthy",
    },
)

TABLES = (
    CONTAINER_STATES,
    RESTART_POLICIES,
    NETWORK_MODES,
    PORT_PROTOCOLS,
    LOG_STREAMS,
    HEALTH_STATUSES,
)
