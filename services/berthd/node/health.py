"""Health checks on the node: Docker's probe state machine and the timer that runs the probes.

`Health` is the state (Docker's State.Health): `starting` until a probe passes, `healthy` on a
probe that exits 0, `unhealthy` after `retries` failures in a row; a failure inside the start
period does not count while the container is still starting. It keeps the last 5 results with
the first 4 KiB of their output, as Docker does.

`HealthMonitor` is one task per running container that has a health check (none for the
others, so an idle node without health checks still does no periodic work): it sleeps
`interval`, runs one probe through the `probe` function it was given (an exec in the
container), feeds the result to the state and calls `changed` only when the status changes,
so etcd is written once per change, not once per probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from berth.health import (
    HEALTHY,
    MAX_LOG_ENTRIES,
    MAX_OUTPUT,
    SECOND,
    STARTING,
    UNHEALTHY,
    HealthConfig,
)

log = logging.getLogger("berthd.node.health")

# Exit code of a probe that timed out or could not run (Docker's -1).
PROBE_FAILED = -1


@dataclass
class ProbeResult:
    """One probe (a State.Health.Log entry): times in seconds since the epoch."""

    start: float
    end: float
    exit_code: int
    output: str


@dataclass
class Health:
    """A container's health: the status, the failures in a row and the last results."""

    status: str = STARTING
    failing_streak: int = 0
    log: list[ProbeResult] = field(default_factory=list)

    def record(self, result: ProbeResult, config: HealthConfig, started_at: float) -> bool:
        """Apply one probe's result; True when the status changed."""
        before = self.status
        self.log = [*self.log, result][-MAX_LOG_ENTRIES:]
        if result.exit_code == 0:
            self.failing_streak = 0
            self.status = HEALTHY
        elif (
            self.status == STARTING
            and config.start_period
            and result.start - started_at < config.start_period / SECOND
        ):
            pass  # a failure during the start period does not count (Docker's rule)
        else:
            self.failing_streak += 1
            if self.failing_streak >= config.retries:
                self.status = UNHEALTHY
        return self.status != before

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Health | None:
        if not isinstance(data, dict) or data.get("status") not in (STARTING, HEALTHY, UNHEALTHY):
            return None
        entries = [
            ProbeResult(
                float(e.get("start", 0)),
                float(e.get("end", 0)),
                int(e.get("exit_code", 0)),
                str(e.get("output", "")),
            )
            for e in data.get("log") or []
            if isinstance(e, dict)
        ]
        return cls(data["status"], int(data.get("failing_streak") or 0), entries)


def truncate(output: bytes) -> str:
    """The first 4 KiB of a probe's output, as text."""
    return output[:MAX_OUTPUT].decode(errors="replace")


# Runs the probe's argv in the container within a timeout (seconds): (exit code, output).
Probe = Callable[[list[str], float], Awaitable[tuple[int, bytes]]]


class HealthMonitor:
    """The probe timer of one running container (started with it, cancelled when it stops)."""

    def __init__(
        self,
        config: HealthConfig,
        health: Health,
        started_at: float,
        probe: Probe,
        changed: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.health = health
        self.started_at = started_at
        self._probe = probe
        self._changed = changed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def probe_once(self) -> bool:
        """Run one probe and record it; True when the status changed."""
        timeout = self.config.timeout / SECOND
        start = time.time()
        try:
            code, output = await self._probe(self.config.argv(), timeout)
        except TimeoutError:
            code, output = PROBE_FAILED, f"Health check exceeded timeout ({timeout:g}s)".encode()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the exec could not run: a failed probe, as Docker counts it
            code, output = PROBE_FAILED, str(exc).encode()
        result = ProbeResult(start, time.time(), code, truncate(output))
        return self.health.record(result, self.config, self.started_at)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval / SECOND)
            try:
                if await self.probe_once():
                    await self._changed()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health probe failed")
