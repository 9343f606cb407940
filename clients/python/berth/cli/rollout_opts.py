"""Docker's `--update-*` and `--rollback-*` flags, for `service create` and `service update`."""

from __future__ import annotations

import argparse

from berth.cli.health_opts import duration
from berth.errors import BerthClientError
from berth.rollout import RolloutChanges

# Docker's help words; the prefix is update or rollback.
FLAGS = (
    ("parallelism", int, "N", "maximum number of replicas {verb} at once (1)"),
    ("delay", duration, "DURATION", "delay between {what} batches (0s)"),
    ("monitor", duration, "DURATION", "how long to watch each replica for failure (5s)"),
    ("order", str, "ORDER", "{what} order: start-first or stop-first (stop-first)"),
    ("failure-action", str, "ACTION", "action on {what} failure: {actions} (pause)"),
    ("max-failure-ratio", float, "RATIO", "failure rate to tolerate during the {what} (0)"),
)
CHOICES = {
    "order": ("stop-first", "start-first"),
    "failure-action": ("pause", "continue", "rollback"),
}


def add_rollout_options(parser: argparse.ArgumentParser) -> None:
    for prefix, verb in (("update", "updated"), ("rollback", "rolled back")):
        for name, kind, metavar, help_text in FLAGS:
            choices = CHOICES.get(name)
            if prefix == "rollback" and name == "failure-action":
                choices = ("pause", "continue")  # a rollback does not roll back (Docker's)
            parser.add_argument(
                f"--{prefix}-{name}",
                type=kind,
                choices=choices,
                metavar=metavar,
                help=help_text.format(verb=verb, what=prefix, actions=", ".join(choices or ())),
            )


def rollout_changes(args: argparse.Namespace, prefix: str) -> RolloutChanges | None:
    """The `--PREFIX-*` flags given, or None when none was."""
    values = {name: getattr(args, f"{prefix}_{name.replace('-', '_')}") for name, *_ in FLAGS}
    if all(v is None for v in values.values()):
        return None
    parallelism = values["parallelism"]
    if parallelism is not None and parallelism < 1:
        # Docker's 0 means all at once: berth keeps at least one replica serving.
        raise BerthClientError(
            f"--{prefix}-parallelism must be at least 1, got {parallelism}", "INVALID_ARGUMENT"
        )
    return RolloutChanges(
        parallelism=parallelism,
        delay_ns=values["delay"],
        monitor_ns=values["monitor"],
        order=values["order"],
        failure_action=values["failure-action"],
        max_failure_ratio=values["max-failure-ratio"],
    )
