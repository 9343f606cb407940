"""Typed client for the registry's WebhookService: add, list and remove webhooks, and read
their deliveries. A webhook's secret goes in once and never comes back out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from berth.client.base import GrpcClient
from berth.client.containers import time_of
from berth.enums.registry import DELIVERY_STATUSES, WEBHOOK_EVENTS
from berth.registry.v1 import webhook_pb2 as pb
from berth.registry.v1 import webhook_pb2_grpc


@dataclass(frozen=True)
class WebhookInfo:
    """A webhook without its secret."""

    id: str
    url: str
    events: list[str]
    repository_pattern: str
    has_secret: bool
    created_at: datetime | None
    created_by: str


@dataclass(frozen=True)
class DeliveryInfo:
    event_id: str
    action: str
    repository: str
    tag: str
    digest: str
    status: str
    attempts: int
    last_status_code: int
    last_error: str
    created_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None


def webhook_info(w: Any) -> WebhookInfo:
    return WebhookInfo(
        id=w.webhook_id,
        url=w.url,
        events=[WEBHOOK_EVENTS.name(e) for e in w.events],
        repository_pattern=w.repository_pattern,
        has_secret=w.has_secret,
        created_at=time_of(w, "created_at"),
        created_by=w.created_by,
    )


def delivery_info(d: Any) -> DeliveryInfo:
    return DeliveryInfo(
        event_id=d.event_id,
        action=d.action,
        repository=d.repository,
        tag=d.tag,
        digest=d.digest,
        status=DELIVERY_STATUSES.name(d.status, "unknown"),
        attempts=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        created_at=time_of(d, "created_at"),
        last_attempt_at=time_of(d, "last_attempt_at"),
        next_attempt_at=time_of(d, "next_attempt_at"),
    )


class WebhookClient(GrpcClient):
    SERVICE = "registry"
    OPTION = "--registry or BERTH_REGISTRY"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = webhook_pb2_grpc.WebhookServiceStub(self._channel)

    def create(
        self, url: str, events: list[str], repository_pattern: str = "", secret: str = ""
    ) -> WebhookInfo:
        request = pb.CreateWebhookRequest(
            url=url,
            events=[WEBHOOK_EVENTS.value(e) for e in events],
            repository_pattern=repository_pattern,
            secret=secret,
        )
        return webhook_info(self._call(self._stub.CreateWebhook, request).webhook)

    def list(self) -> list[WebhookInfo]:
        response = self._call(self._stub.ListWebhooks, pb.ListWebhooksRequest())
        return [webhook_info(w) for w in response.webhooks]

    def remove(self, webhook_id: str) -> WebhookInfo:
        request = pb.DeleteWebhookRequest(webhook_id=webhook_id)
        return webhook_info(self._call(self._stub.DeleteWebhook, request).webhook)

    def deliveries(self, webhook_id: str) -> list[DeliveryInfo]:
        """Queued deliveries oldest first, then the last finished ones newest first."""
        request = pb.ListWebhookDeliveriesRequest(webhook_id=webhook_id)
        response = self._call(self._stub.ListWebhookDeliveries, request)
        return [delivery_info(d) for d in response.deliveries]
