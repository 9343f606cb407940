"""Outgoing webhooks: records, the event envelope, signatures, backoff and the queue's ops.

Keys (relative to the store prefix; `<seq>` is `<created_at ns, 20 digits>-<event id>`, so a
webhook's queue and log sort oldest first):

    registry/webhooks/hooks/<id>          {"url", "events", "repository_pattern", "has_secret",
                                           "created_at", "created_by"}
    registry/webhooks/secrets/<id>        {"secret"}: apart, so no listing ever reads it
    registry/webhooks/queue/<id>/<seq>    a pending delivery: {"event", "created_at",
                                           "attempts", "last_status_code", "last_error",
                                           "last_attempt_at", "next_attempt_at"}
    registry/webhooks/claims/<id>/<seq>   {"instance"}, bound to the sending instance's lease
    registry/webhooks/log/<id>/<seq>      a finished delivery: the pending fields and "status"
                                          (`delivered` or `failed`); the last LOG_KEEP kept

A push or delete writes one queue key per matching webhook in the transaction that commits
it (metadata.RepoWrite), after reading the webhooks in the same attempt and comparing that
nothing under `hooks/` changed since: a webhook added before the commit gets the event.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from berthd.common.errors import InvalidArgument, NotFound
from berthd.common.security.principal import current_principal
from berthd.common.store import Entry, Store

PREFIX = "registry/webhooks/"
HOOKS = PREFIX + "hooks/"
SECRETS = PREFIX + "secrets/"
QUEUE = PREFIX + "queue/"
CLAIMS = PREFIX + "claims/"
LOG = PREFIX + "log/"

PUSH = "push"
DELETE = "delete"
EVENTS = (PUSH, DELETE)

CONTENT_TYPE = "application/vnd.docker.distribution.events.v1+json"
SIGNATURE_HEADER = "X-Berth-Signature-256"
# Finished deliveries kept per webhook (Harbor keeps a similar window).
LOG_KEEP = 50
MAX_URL = 2048
MAX_SECRET = 256


def webhook_invalid(message: str, field_name: str) -> InvalidArgument:
    return InvalidArgument(message, reason="WEBHOOK_INVALID", field=field_name)


def webhook_not_found(webhook_id: str) -> NotFound:
    return NotFound(
        f"no such webhook: {webhook_id}",
        reason="WEBHOOK_NOT_FOUND",
        metadata={"webhook_id": webhook_id},
        resource=("webhook", webhook_id),
    )


# --- pure parts: matching, envelope, signature, backoff ---------------------------------------


def matches(pattern: str, repository: str) -> bool:
    """Whether a repository name matches a webhook's glob (empty: every repository). `*`
    crosses `/` (fnmatch's rule), so `team/*` covers `team/a/b` as a token's `--repo` does."""
    return not pattern or fnmatch.fnmatchcase(repository, pattern)


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: GitHub's `X-Hub-Signature-256` scheme."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: compare in constant time."""
    return hmac.compare_digest(sign(secret, body), header)


def backoff(attempts: int, first: float, cap: float) -> float:
    """Seconds to wait after `attempts` failed attempts: doubling from `first`, at most `cap`."""
    return min(cap, first * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class Target:
    """What an event is about: Distribution's `target`."""

    repository: str
    digest: str = ""
    media_type: str = ""
    size: int = 0
    tag: str = ""
    url: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"repository": self.repository}
        if self.digest:
            data["digest"] = self.digest
        if self.media_type:
            data |= {"mediaType": self.media_type, "size": self.size, "length": self.size}
        if self.tag:
            data["tag"] = self.tag
        if self.url:
            data["url"] = self.url
        return data


def make_event(
    action: str, target: Target, *, source: dict[str, str], now: float | None = None
) -> dict[str, Any]:
    """One event of Distribution's notification envelope (docs: notifications.md)."""
    now = time.time() if now is None else now
    actor = current_principal().name
    return {
        "id": str(uuid.uuid4()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        + f".{int(now % 1 * 1e6):06d}Z",
        "action": action,
        "target": target.to_json(),
        "request": {"method": "PUT" if action == PUSH else "DELETE"},
        "actor": {"name": "" if actor == "anonymous" else actor},
        "source": source,
    }


def envelope(event: dict[str, Any]) -> bytes:
    return json.dumps({"events": [event]}, separators=(",", ":")).encode()


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    events: tuple[str, ...]
    repository_pattern: str = ""
    has_secret: bool = False
    created_at: float = 0.0
    created_by: str = ""

    def wants(self, action: str, repository: str) -> bool:
        return action in self.events and matches(self.repository_pattern, repository)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "events": list(self.events),
            "repository_pattern": self.repository_pattern,
            "has_secret": self.has_secret,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }

    @classmethod
    def from_entry(cls, entry: Entry) -> Webhook:
        data = entry.json()
        return cls(
            id=entry.key[len(HOOKS) :],
            url=data["url"],
            events=tuple(data["events"]),
            repository_pattern=data.get("repository_pattern", ""),
            has_secret=bool(data.get("has_secret")),
            created_at=float(data.get("created_at", 0)),
            created_by=data.get("created_by", ""),
        )


@dataclass
class Delivery:
    """A pending (queue) or finished (log) delivery of one event to one webhook."""

    webhook_id: str
    seq: str
    event: dict[str, Any]
    created_at: float
    attempts: int = 0
    last_status_code: int = 0
    last_error: str = ""
    last_attempt_at: float = 0.0
    next_attempt_at: float = 0.0
    status: str = "pending"  # pending | delivered | failed
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def queue_key(self) -> str:
        return f"{QUEUE}{self.webhook_id}/{self.seq}"

    @property
    def claim_key(self) -> str:
        return f"{CLAIMS}{self.webhook_id}/{self.seq}"

    @property
    def log_key(self) -> str:
        return f"{LOG}{self.webhook_id}/{self.seq}"

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "created_at": self.created_at,
            "attempts": self.attempts,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "last_attempt_at": self.last_attempt_at,
            "next_attempt_at": self.next_attempt_at,
            "status": self.status,
        }

    @classmethod
    def from_entry(cls, entry: Entry, family: str) -> Delivery:
        webhook_id, _, seq = entry.key[len(family) :].partition("/")
        data = entry.json()
        return cls(
            webhook_id=webhook_id,
            seq=seq,
            event=data["event"],
            created_at=float(data["created_at"]),
            attempts=int(data.get("attempts", 0)),
            last_status_code=int(data.get("last_status_code", 0)),
            last_error=data.get("last_error", ""),
            last_attempt_at=float(data.get("last_attempt_at", 0)),
            next_attempt_at=float(data.get("next_attempt_at", 0)),
            status=data.get("status", "pending"),
        )


def new_delivery(webhook_id: str, event: dict[str, Any], now: float) -> Delivery:
    seq = f"{int(now * 1e9):020d}-{event['id']}"
    return Delivery(webhook_id, seq, event, created_at=now, next_attempt_at=now)


# --- the store side ------------------------------------------------------------------------------


def check_spec(url: str, events: list[str], pattern: str, secret: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL:
        raise webhook_invalid(
            f'invalid webhook URL "{url}": expected http:// or https://HOST[:PORT]/PATH, '
            f"at most {MAX_URL} characters",
            "url",
        )
    if not events or any(e not in EVENTS for e in events):
        raise webhook_invalid(
            f"invalid webhook events {','.join(events) or '(none)'}: expected one or more of "
            + ", ".join(EVENTS),
            "events",
        )
    if len(pattern) > 255 or any(c.isspace() for c in pattern):
        raise webhook_invalid(
            f'invalid repository pattern "{pattern}": a glob of at most 255 characters '
            "without spaces",
            "repository_pattern",
        )
    if len(secret.encode()) > MAX_SECRET:
        raise webhook_invalid(f"webhook secret is longer than {MAX_SECRET} bytes", "secret")


class Webhooks:
    """The webhooks' records in etcd and the ops a commit adds to queue its events."""

    def __init__(self, store: Store, source: dict[str, str], http_url: str = "") -> None:
        self.store = store
        # Distribution's `source`: this instance (`addr`, `instanceID`).
        self.source = source
        self.http_url = http_url

    async def create(self, url: str, events: list[str], pattern: str, secret: str) -> Webhook:
        check_spec(url, events, pattern, secret)
        hook = Webhook(
            id=secrets.token_hex(6),
            url=url,
            events=tuple(e for e in EVENTS if e in events),
            repository_pattern=pattern,
            has_secret=bool(secret),
            created_at=time.time(),
            created_by=current_principal().name,
        )
        ops = [self.store.op_put(HOOKS + hook.id, hook.to_json())]
        if secret:
            ops.append(self.store.op_put(SECRETS + hook.id, {"secret": secret}))
        # Record and secret together: never a signed webhook without its key.
        await self.store.txn([self.store.absent(HOOKS + hook.id)], ops)
        return hook

    async def list(self) -> list[Webhook]:
        hooks = [Webhook.from_entry(e) async for e in self.store.iterate(HOOKS)]
        return sorted(hooks, key=lambda h: h.created_at)

    async def find(self, id_or_prefix: str) -> Webhook:
        if not id_or_prefix:
            raise webhook_invalid("name a webhook by its id", "webhook_id")
        found = [h for h in await self.list() if h.id.startswith(id_or_prefix)]
        if len(found) != 1:
            if found:
                raise webhook_invalid(
                    f"webhook id prefix {id_or_prefix} is ambiguous: "
                    + ", ".join(h.id for h in found),
                    "webhook_id",
                )
            raise webhook_not_found(id_or_prefix)
        return found[0]

    async def delete(self, id_or_prefix: str) -> Webhook:
        hook = await self.find(id_or_prefix)
        await self.store.txn(
            [],
            [
                self.store.op_delete(HOOKS + hook.id),
                self.store.op_delete(SECRETS + hook.id),
            ],
        )
        # The queue, claims and log go after the record: the sender drops a delivery whose
        # webhook is gone, so what a commit queued meanwhile is never sent.
        for family in (QUEUE, CLAIMS, LOG):
            await self.store.delete_prefix(f"{family}{hook.id}/")
        return hook

    async def secret(self, webhook_id: str) -> str:
        data = await self.store.get_json(SECRETS + webhook_id)
        return data.get("secret", "") if isinstance(data, dict) else ""

    async def deliveries(self, id_or_prefix: str) -> list[Delivery]:
        """Pending ones oldest first, then finished ones newest first."""
        hook = await self.find(id_or_prefix)
        pending = [Delivery.from_entry(e, QUEUE) async for e in self.store.iterate(queue_of(hook))]
        done = [Delivery.from_entry(e, LOG) async for e in self.store.iterate(f"{LOG}{hook.id}/")]
        return pending + done[::-1]

    def queue_ops(self, action: str, target: Target) -> QueueOps:
        """What a commit adds to its transaction (see the module docstring)."""

        async def add(ops: list[Any], compares: list[Any]) -> None:
            hooks, revision = await self.store.snapshot(HOOKS)
            compares.append(self.store.unchanged_since(HOOKS, revision))
            wanted = [Webhook.from_entry(e) for e in hooks]
            wanted = [h for h in wanted if h.wants(action, target.repository)]
            if not wanted:
                return
            now = time.time()
            event = make_event(action, self._with_url(target), source=self.source, now=now)
            for hook in wanted:
                delivery = new_delivery(hook.id, event, now)
                ops.append(self.store.op_put(delivery.queue_key, delivery.to_json()))

        return add

    def _with_url(self, target: Target) -> Target:
        if not self.http_url or not target.digest:
            return target
        url = f"{self.http_url}/v2/{target.repository}/manifests/{target.digest}"
        return Target(
            target.repository, target.digest, target.media_type, target.size, target.tag, url
        )


def queue_of(hook: Webhook) -> str:
    return f"{QUEUE}{hook.id}/"


# Adds the ops (and compares) that queue an event to a commit's transaction.
QueueOps = Callable[[list[Any], list[Any]], Awaitable[None]]
