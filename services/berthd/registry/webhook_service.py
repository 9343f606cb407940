"""gRPC servicer for berth.registry.v1.WebhookService: converts messages and calls
berthd.registry.webhooks, nothing more."""

from __future__ import annotations

import grpc

from berth.enums.registry import DELIVERY_STATUSES, WEBHOOK_EVENTS
from berth.registry.v1 import webhook_pb2 as pb
from berth.registry.v1 import webhook_pb2_grpc
from berthd.common.messages import timestamp
from berthd.registry.webhooks import Delivery, Webhook, Webhooks, webhook_invalid

Context = grpc.aio.ServicerContext


def webhook(hook: Webhook) -> pb.Webhook:
    return pb.Webhook(
        webhook_id=hook.id,
        url=hook.url,
        events=[WEBHOOK_EVENTS.value(e) for e in hook.events],
        repository_pattern=hook.repository_pattern,
        has_secret=hook.has_secret,
        created_at=timestamp(hook.created_at),
        created_by=hook.created_by,
    )


def delivery(d: Delivery) -> pb.WebhookDelivery:
    target = d.event.get("target", {})
    return pb.WebhookDelivery(
        event_id=d.event.get("id", ""),
        action=d.event.get("action", ""),
        repository=target.get("repository", ""),
        tag=target.get("tag", ""),
        digest=target.get("digest", ""),
        status=DELIVERY_STATUSES.value(d.status),
        attempts=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        created_at=timestamp(d.created_at),
        last_attempt_at=timestamp(d.last_attempt_at or None),
        next_attempt_at=timestamp(d.next_attempt_at if d.status == "pending" else None),
    )


def event_names(values: list[int]) -> list[str]:
    try:
        return [WEBHOOK_EVENTS.name(v) for v in values]
    except ValueError:
        raise webhook_invalid(
            f"invalid webhook events: expected {', '.join(WEBHOOK_EVENTS.names)}", "events"
        ) from None


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        hook = await self.webhooks.create(
            request.url,
            event_names(list(request.events)),
            request.repository_pattern,
            request.secret,
        )
        return pb.CreateWebhookResponse(webhook=webhook(hook))

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        return pb.ListWebhooksResponse(webhooks=[webhook(h) for h in await self.webhooks.list()])

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        return pb.DeleteWebhookResponse(
            webhook=webhook(await self.webhooks.delete(request.webhook_id))
        )

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        found = await self.webhooks.deliveries(request.webhook_id)
        return pb.ListWebhookDeliveriesResponse(deliveries=[delivery(d) for d in found])
