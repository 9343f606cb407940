"""Docker's health check flags, for `run`, `service create` and `service update`."""

from __future__ import annotations

import argparse

from berth.errors import BerthClientError
from berth.health import CMD_SHELL, NONE, HealthConfig, parse_duration

DURATION_FLAGS = ("interval", "timeout", "start_period")


def duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_health_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--health-cmd", metavar="CMD", help="command to run to check health (run by /bin/sh)")
    add("--health-interval", type=duration, metavar="DURATION", help="time between checks (30s)")
    add("--health-timeout", type=duration, metavar="DURATION", help="time a check may take (30s)")
    add(
        "--health-start-period",
        type=duration,
        metavar="DURATION",
        help="time to start before failures count (0s)",
    )
    add(
        "--health-retries",
        type=int,
        metavar="N",
        help="consecutive failures needed to report unhealthy (3)",
    )
    add("--no-healthcheck", action="store_true", help="disable the image's HEALTHCHECK")


def given(args: argparse.Namespace) -> bool:
    """Whether any --health-* flag was given."""
    return args.health_cmd is not None or any(
        getattr(args, f"health_{name}") is not None for name in (*DURATION_FLAGS, "retries")
    )


def health_check(args: argparse.Namespace) -> HealthConfig | None:
    """The health check of the flags; None when none was given (the image's then holds)."""
    if args.no_healthcheck:
        if given(args):
            # Docker's words.
            raise BerthClientError(
                "--no-healthcheck conflicts with --health-* options", "INVALID_ARGUMENT"
            )
        return HealthConfig(test=[NONE])
    if not given(args):
        return None
    return HealthConfig(
        test=[CMD_SHELL, args.health_cmd] if args.health_cmd else [],
        interval=args.health_interval or 0,
        timeout=args.health_timeout or 0,
        start_period=args.health_start_period or 0,
        retries=args.health_retries or 0,
    )
