"""Tables for the cluster's enums (berth.cluster.v1)."""

from __future__ import annotations

from berth.cluster.v1 import cluster_pb2 as pb
from berth.enums import EnumTable

NODE_STATES = EnumTable(
    pb.NodeState, {pb.NODE_STATE_READY: "ready", pb.NODE_STATE_NOT_READY: "down"}
)
AVAILABILITIES = EnumTable(
    pb.NodeAvailability,
    {
        pb.NODE_AVAILABILITY_ACTIVE: "active",
        pb.NODE_AVAILABILITY_CORDONED: "cordoned",
        pb.NODE_AVAILABILITY_DRAINED: "drained",
    },
)
DESIRED_STATES = EnumTable(
    pb.DesiredState, {pb.DESIRED_STATE_RUNNING: "running", pb.DESIRED_STATE_STOPPED: "stopped"}
)
UPDATE_STATES = EnumTable(
    pb.UpdateState,
    {
        pb.UPDATE_STATE_UPDATING: "updating",
        pb.UPDATE_STATE_COMPLETED: "completed",
        pb.UPDATE_STATE_PAUSED: "paused",
        pb.UPDATE_STATE_ROLLBACK_STARTED: "rollback_started",
        pb.UPDATE_STATE_ROLLBACK_COMPLETED: "rollback_completed",
        pb.UPDATE_STATE_ROLLBACK_PAUSED: "rollback_paused",
    },
)
UPDATE_ORDERS = EnumTable(
    pb.UpdateOrder,
    {pb.UPDATE_ORDER_STOP_FIRST: "stop-first", pb.UPDATE_ORDER_START_FIRST: "start-first"},
)
FAILURE_ACTIONS = EnumTable(
    pb.UpdateFailureAction,
    {
        pb.UPDATE_FAILURE_ACTION_PAUSE: "pause",
        pb.UPDATE_FAILURE_ACTION_CONTINUE: "continue",
        pb.UPDATE_FAILURE_ACTION_ROLLBACK: "rollback",
    },
)
ENDPOINT_KINDS = EnumTable(
    pb.EndpointKind,
    {
        pb.ENDPOINT_KIND_REGISTRY: "registry",
        pb.ENDPOINT_KIND_IMAGE: "image",
        pb.ENDPOINT_KIND_BUILDER: "builder",
        pb.ENDPOINT_KIND_NODE: "node",
        pb.ENDPOINT_KIND_CLUSTER: "cluster",
    },
)
# What `berth events --filter type=...` takes.
EVENT_TYPES = EnumTable(
    pb.EventType,
    {
        pb.EVENT_TYPE_NODE_JOINED: "node_joined",
        pb.EVENT_TYPE_NODE_LOST: "node_lost",
        pb.EVENT_TYPE_CONTAINER_SCHEDULED: "container_scheduled",
        pb.EVENT_TYPE_CONTAINER_STARTED: "container_started",
        pb.EVENT_TYPE_CONTAINER_DIED: "container_died",
        pb.EVENT_TYPE_CONTAINER_RESCHEDULED: "container_rescheduled",
        pb.EVENT_TYPE_SERVICE_SCALED: "service_scaled",
        pb.EVENT_TYPE_CONTAINER_CREATE_FAILED: "container_create_failed",
        pb.EVENT_TYPE_NODE_AVAILABILITY_CHANGED: "node_availability_changed",
        pb.EVENT_TYPE_NODE_DRAIN_COMPLETED: "node_drain_completed",
        pb.EVENT_TYPE_SERVICE_CREATED: "service_created",
        pb.EVENT_TYPE_SERVICE_UPDATE_STARTED: "service_update_started",
        pb.EVENT_TYPE_SERVICE_UPDATE_COMPLETED: "service_update_completed",
        pb.EVENT_TYPE_SERVICE_UPDATE_PAUSED: "service_update_paused",
        pb.EVENT_TYPE_SERVICE_REMOVED: "service_removed",
        pb.EVENT_TYPE_CONTAINER_HEALTH_STATUS: "health_status",
        pb.EVENT_TYPE_SERVICE_ROLLBACK_STARTED: "service_rollback_started",
        pb.EVENT_TYPE_SERVICE_ROLLBACK_COMPLETED: "service_rollback_completed",
        pb.EVENT_TYPE_SERVICE_ROLLBACK_PAUSED: "service_rollback_paused",
        pb.EVENT_TYPE_SERVICE_FOLLOW: "service_follow",
    },
)

TABLES = (
    NODE_STATES,
    AVAILABILITIES,
    DESIRED_STATES,
    UPDATE_STATES,
    UPDATE_ORDERS,
    FAILURE_ACTIONS,
    ENDPOINT_KINDS,
    EVENT_TYPES,
)
