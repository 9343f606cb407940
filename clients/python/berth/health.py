"""Health checks: Docker's HealthConfig as plain data, its proto and its merge with the image's.

A HealthConfig is what `--health-cmd ...` or an image's `HEALTHCHECK` says (the image config's
`Healthcheck`, Docker's JSON names, durations in nanoseconds). Zero durations and retries mean
"not set": `effective` fills them from the image's, then from Docker's defaults, as dockerd
merges a container's health config over its image's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from berth.errors import InvalidArgumentError
from berth.reference import quoted
from berth.types.v1 import container_pb2 as pb

NONE = "NONE"
CMD = "CMD"
CMD_SHELL = "CMD-SHELL"
SECOND = 1_000_000_000
# Docker's defaults (moby container/health.go) and floor for durations.
DEFAULT_INTERVAL = 30 * SECOND
DEFAULT_TIMEOUT = 30 * SECOND
DEFAULT_RETRIES = 3
MIN_DURATION = 1_000_000  # 1ms
# Docker keeps the last 5 probes and the first 4 KiB of each one's output.
MAX_LOG_ENTRIES = 5
MAX_OUTPUT = 4096
# State.Health.Status values.
STARTING = "starting"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


class InvalidHealthCheck(InvalidArgumentError):
    """A health config Docker would refuse; `field` is its ContainerSpec path."""

    def __init__(self, message: str, field: str = "health_check") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class HealthConfig:
    """Docker's HealthConfig; durations in nanoseconds, 0 meaning the image's or the default."""

    test: list[str] = field(default_factory=list)
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    retries: int = 0

    @property
    def disabled(self) -> bool:
        return self.test[:1] == [NONE]

    def validate(self) -> None:
        if not isinstance(self.test, list) or not all(isinstance(t, str) for t in self.test):
            raise InvalidHealthCheck("health check test must be a list of strings")
        if self.test and self.test[0] not in (NONE, CMD, CMD_SHELL):
            raise InvalidHealthCheck(
                f"health check test {quoted(self.test[0])}: expected CMD, CMD-SHELL or NONE",
                "health_check.test",
            )
        if self.test[:1] in ([CMD], [CMD_SHELL]) and not any(self.test[1:]):
            raise InvalidHealthCheck("health check command is empty", "health_check.test")
        for name in ("interval", "timeout", "start_period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidHealthCheck(f"health check {name} must be an integer of nanoseconds")
            # Docker's words (`docker run --health-interval 1us`).
            if value < 0:
                raise InvalidHealthCheck(
                    f"--health-{name.replace('_', '-')} cannot be negative",
                    f"health_check.{name}",
                )
            if 0 < value < MIN_DURATION:
                raise InvalidHealthCheck(
                    f"--health-{name.replace('_', '-')} cannot be less than 1ms",
                    f"health_check.{name}",
                )
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise InvalidHealthCheck("health check retries must be an integer")
        if self.retries < 0:
            raise InvalidHealthCheck("--health-retries cannot be negative", "health_check.retries")

    def argv(self) -> list[str]:
        """The probe's command line: CMD's arguments, or CMD-SHELL's command under /bin/sh."""
        if self.test[:1] == [CMD_SHELL]:
            return ["/bin/sh", "-c", " ".join(self.test[1:])]
        return list(self.test[1:])

    def to_image(self) -> dict[str, Any]:
        """As the image config's `Healthcheck` (Docker's names, zero values left out)."""
        out: dict[str, Any] = {"Test": list(self.test)}
        for key, value in (
            ("Interval", self.interval),
            ("Timeout", self.timeout),
            ("StartPeriod", self.start_period),
            ("Retries", self.retries),
        ):
            if value:
                out[key] = value
        return out


def from_image(obj: object) -> HealthConfig | None:
    """The image config's `Healthcheck`, or None when it has none (or a malformed one)."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("Test"), list):
        return None

    def number(key: str) -> int:
        value = obj.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return HealthConfig(
        test=[str(t) for t in obj["Test"]],
        interval=number("Interval"),
        timeout=number("Timeout"),
        start_period=number("StartPeriod"),
        retries=number("Retries"),
    )


def effective(container: HealthConfig | None, image: HealthConfig | None) -> HealthConfig | None:
    """What the node runs: the container's fields over the image's over Docker's defaults;
    None when neither has a test, or the test is NONE."""
    base = image or HealthConfig()
    own = container or HealthConfig()
    result = HealthConfig(
        test=own.test or base.test,
        interval=own.interval or base.interval or DEFAULT_INTERVAL,
        timeout=own.timeout or base.timeout or DEFAULT_TIMEOUT,
        start_period=own.start_period or base.start_period,
        retries=own.retries or base.retries or DEFAULT_RETRIES,
    )
    if not result.test or result.disabled:
        return None
    return result


def merge(current: HealthConfig, change: HealthConfig) -> HealthConfig:
    """`service update --health-*`: the fields `change` sets over `current`'s; a NONE test
    (`--no-healthcheck`) replaces the whole check."""
    if change.disabled:
        return HealthConfig(test=[NONE])
    test = change.test or ([] if current.disabled else current.test)
    return HealthConfig(
        test=test,
        interval=change.interval or current.interval,
        timeout=change.timeout or current.timeout,
        start_period=change.start_period or current.start_period,
        retries=change.retries or current.retries,
    )


def from_dict(obj: object) -> HealthConfig | None:
    """A config from its JSON record (ContainerConfig.to_json's `health_check`)."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise InvalidHealthCheck(f"health_check must be an object, got {quoted(obj)}")
    known = {"test", "interval", "timeout", "start_period", "retries"}
    return HealthConfig(**{k: v for k, v in obj.items() if k in known})


def to_proto(config: HealthConfig) -> pb.HealthCheck:
    message = pb.HealthCheck(test=config.test, retries=config.retries)
    for name in ("interval", "timeout", "start_period"):
        value = getattr(config, name)
        if value:
            getattr(message, name).FromNanoseconds(value)
    return message


def from_proto(message: pb.HealthCheck) -> HealthConfig:
    return HealthConfig(
        test=list(message.test),
        interval=message.interval.ToNanoseconds(),
        timeout=message.timeout.ToNanoseconds(),
        start_period=message.start_period.ToNanoseconds(),
        retries=message.retries,
    )


_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": SECOND,
    "m": 60 * SECOND,
    "h": 3600 * SECOND,
}


def parse_duration(text: str) -> int:
    """A Go duration (`30s`, `1m30s`, `500ms`, `0`), as Docker's flags take it, in
    nanoseconds; ValueError with Go's words for anything else."""
    if text == "0":
        return 0
    total, pos = Decimal(0), 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        total += Decimal(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError('time: invalid duration ""')
    return int(total)
