"""Tables for the registry's enums (berth.registry.v1)."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import webhook_pb2

# Harbor's and Docker Hub's words; the zero value means "leave it" in an update, so it has no
# name.
VISIBILITIES = EnumTable(
    pb.Visibility, {pb.VISIBILITY_PRIVATE: "private", pb.VISIBILITY_PUBLIC: "public"}
)

# Distribution's action names.
WEBHOOK_EVENTS = EnumTable(
    webhook_pb2.WebhookEvent,
    {webhook_pb2.WEBHOOK_EVENT_PUSH: "push", webhook_pb2.WEBHOOK_EVENT_DELETE: "delete"},
)
DELIVERY_STATUSES = EnumTable(
    webhook_pb2.WebhookDeliveryStatus,
    {
        webhook_pb2.WEBHOOK_DELIVERY_STATUS_PENDING: "pending",
        webhook_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED: "delivered",
        webhook_pb2.WEBHOOK_DELIVERY_STATUS_FAILED: "failed",
    },
)
TABLES = (VISIBILITIES, WEBHOOK_EVENTS, DELIVERY_STATUSES)
