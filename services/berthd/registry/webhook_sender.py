"""The webhook sender: each registry instance runs one; together they POST every queued
delivery at least once.

A delivery is claimed before it is sent: a transaction creates its claim key, bound to this
instance's lease, only while the queue entry is unchanged and no claim exists, so among several
instances one sends it. The outcome is written in one transaction compared on the queue entry
(a delivery whose webhook was removed meanwhile is dropped): a 2xx moves it to the log; a
failure rewrites it with its next attempt's time (exponential backoff, capped), or, past the
maximum age, moves it to the log as failed. A claim dies with its instance's lease, so a
delivery an instance was sending when it died is sent again by another (or by it, restarted):
at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp

from berthd.common.errors import BerthError
from berthd.common.store import Entry
from berthd.registry.webhooks import (
    CONTENT_TYPE,
    LOG,
    LOG_KEEP,
    QUEUE,
    SIGNATURE_HEADER,
    Delivery,
    Webhook,
    Webhooks,
    backoff,
    envelope,
    sign,
)

log = logging.getLogger("berthd.registry.webhooks")

# How long an idle sender sleeps between scans when no watch event wakes it first (a missed
# event, an etcd reconnect): the queue is read again at least this often.
IDLE_SCAN_SECONDS = 5.0


@dataclass(frozen=True)
class SendPolicy:
    """Retry policy (flags of `berthd registry`)."""

    first_retry: float = 1.0
    max_retry: float = 300.0
    max_age: float = 86400.0
    timeout: float = 10.0


class Sender:
    def __init__(self, webhooks: Webhooks, instance: str, policy: SendPolicy) -> None:
        self.webhooks = webhooks
        self.store = webhooks.store
        self.instance = instance
        self.policy = policy
        # The instance's lease (run_server's on_lease): claims are bound to it.
        self.lease_id = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def on_lease(self, lease_id: int) -> None:
        self.lease_id = lease_id
        self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": "berth-registry"})
        self._tasks = [
            asyncio.create_task(self._run(), name="webhook sender"),
            asyncio.create_task(self._watch(), name="webhook queue watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _watch(self) -> None:
        """Wake the sender when a delivery is queued (on any instance)."""
        while True:
            try:
                async for event in self.store.watch_prefix(QUEUE):
                    if event.kind == "put":
                        self._wake.set()
            except BerthError as exc:  # etcd away: the idle scan covers the gap
                log.warning("webhook queue watch broke: %s", exc)
                await asyncio.sleep(1)

    async def _run(self) -> None:
        while True:
            wait = IDLE_SCAN_SECONDS
            try:
                wait = await self.round()
            except BerthError as exc:
                log.warning("webhook round failed: %s", exc)
            except Exception:
                log.exception("webhook round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, wait)):
                    await self._wake.wait()

    async def round(self) -> float:
        """Claim and send every due delivery; returns the seconds until the next one is due."""
        if not self.lease_id:
            return IDLE_SCAN_SECONDS
        hooks = {h.id: h for h in await self.webhooks.list()}
        now = time.time()
        next_due = now + IDLE_SCAN_SECONDS
        sends = []
        async for entry in self.store.iterate(QUEUE):
            delivery = Delivery.from_entry(entry, QUEUE)
            hook = hooks.get(delivery.webhook_id)
            if hook is None:
                # Queued by a commit that raced the webhook's removal.
                await self.store.txn(
                    [self.store.unchanged(entry.key, entry.mod_revision)],
                    [self.store.op_delete(entry.key)],
                )
                continue
            if delivery.next_attempt_at > now:
                next_due = min(next_due, delivery.next_attempt_at)
                continue
            if await self._claim(delivery, entry):
                sends.append(self._send(hook, delivery, entry))
        await asyncio.gather(*sends)
        return next_due - time.time() if not sends else 0.0

    async def _claim(self, delivery: Delivery, entry: Entry) -> bool:
        ok, _ = await self.store.txn(
            [
                self.store.unchanged(entry.key, entry.mod_revision),
                self.store.absent(delivery.claim_key),
            ],
            [
                self.store.op_put(
                    delivery.claim_key, {"instance": self.instance}, lease=self.lease_id
                )
            ],
        )
        return ok

    async def _send(self, hook: Webhook, delivery: Delivery, entry: Entry) -> None:
        body = envelope(delivery.event)
        headers = {"Content-Type": CONTENT_TYPE}
        if hook.has_secret:
            headers[SIGNATURE_HEADER] = sign(await self.webhooks.secret(hook.id), body)
        delivery.last_attempt_at = time.time()
        delivery.attempts += 1
        status, error = await self._post(hook.url, body, headers)
        delivery.last_status_code, delivery.last_error = status, error
        if not error:
            delivery.status = "delivered"
        elif delivery.last_attempt_at - delivery.created_at >= self.policy.max_age:
            delivery.status = "failed"
        else:
            wait = backoff(delivery.attempts, self.policy.first_retry, self.policy.max_retry)
            delivery.next_attempt_at = delivery.last_attempt_at + wait
        log.info(
            "webhook %s event %s attempt %d: %s",
            hook.id,
            delivery.event["id"],
            delivery.attempts,
            error or f"delivered ({status})",
        )
        await self._record(delivery, entry)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        """(HTTP status, error): error is empty for a 2xx; status 0 when no answer came."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self.policy.timeout):
                async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        return response.status, ""
                    return response.status, f"HTTP {response.status} {response.reason or ''}"
        except TimeoutError:
            return 0, f"no answer within {self.policy.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return 0, str(exc) or type(exc).__name__

    async def _record(self, delivery: Delivery, entry: Entry) -> None:
        """The attempt's outcome, and the claim let go, in one transaction that fails when the
        queue entry is gone (its webhook removed)."""
        done = delivery.status != "pending"
        ops = [self.store.op_delete(delivery.claim_key)]
        if done:
            ops += [
                self.store.op_delete(entry.key),
                self.store.op_put(delivery.log_key, delivery.to_json()),
            ]
        else:
            ops.append(self.store.op_put(entry.key, delivery.to_json()))
        ok, _ = await self.store.txn([self.store.unchanged(entry.key, entry.mod_revision)], ops)
        if not ok:
            await self.store.delete(delivery.claim_key)
        elif done:
            await self._trim(delivery.webhook_id)

    async def _trim(self, webhook_id: str) -> None:
        """Keep the last LOG_KEEP finished deliveries of a webhook."""
        keys = await self.store.list(f"{LOG}{webhook_id}/", keys_only=True)
        for old in keys[: max(0, len(keys) - LOG_KEEP)]:
            await self.store.delete(old.key)
