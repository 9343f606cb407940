"""Rollouts: the update and rollback configs, the previous spec, and the failure rule.

A service record keeps the spec it replaced (`previous`, Swarm's PreviousSpec) so that a
rollback, asked for (`UpdateService(rollback=true)`) or decided by the controller once too many
new replicas failed (failure_action rollback), swaps the two and rolls the replicas back with
`rollback_config`. A rollback bumps the version like any change, but the replicas still on the
restored spec's versions (`spec_versions`) are not replaced: only the failed version's are.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from berthd.common.errors import FailedPrecondition

if TYPE_CHECKING:
    from berthd.cluster.services import ServiceRecord

# UpdateConfig.order and failure_action, as Docker's flags spell them.
STOP_FIRST = "stop-first"
START_FIRST = "start-first"
PAUSE = "pause"
CONTINUE = "continue"
ROLLBACK = "rollback"
ORDERS = (STOP_FIRST, START_FIRST)
FAILURE_ACTIONS = (PAUSE, CONTINUE, ROLLBACK)

# Update states (UpdateState in the proto) that belong to a rollback.
ROLLBACK_STARTED = "rollback_started"
ROLLBACK_COMPLETED = "rollback_completed"
ROLLBACK_PAUSED = "rollback_paused"

DEFAULT_MONITOR_SECONDS = 5.0

# Record fields that are not part of the spec: a rollback swaps every other one.
NOT_SPEC = frozenset(
    {
        "id",
        "name",
        "version",
        "update_state",
        "update_message",
        "created_at",
        "updated_at",
        "changed_by",
        "previous",
        "previous_versions",
        "spec_versions",
        "update_failures",
    }
)


@dataclass
class RolloutConfig:
    """How replicas roll to a spec (UpdateConfig): the update's, or the rollback's."""

    parallelism: int = 1
    delay_seconds: float = 0.0
    monitor_seconds: float = DEFAULT_MONITOR_SECONDS
    order: str = STOP_FIRST
    failure_action: str = PAUSE
    max_failure_ratio: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RolloutConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


def update_config(record: ServiceRecord) -> RolloutConfig:
    return RolloutConfig(
        parallelism=record.parallelism,
        delay_seconds=record.delay_seconds,
        monitor_seconds=record.monitor_seconds,
        order=record.update_order,
        failure_action=record.failure_action,
        max_failure_ratio=record.max_failure_ratio,
    )


def rolling_back(record: ServiceRecord) -> bool:
    return record.update_state in (ROLLBACK_STARTED, ROLLBACK_PAUSED, ROLLBACK_COMPLETED)


def active_config(record: ServiceRecord) -> RolloutConfig:
    """The config the current rollout uses: the rollback's while rolling back (Swarm's)."""
    return record.rollback_config if rolling_back(record) else update_config(record)


def current_version(record: ServiceRecord, service_version: int) -> bool:
    """A replica of this version runs the current spec (a rollback restores older ones)."""
    return service_version >= record.version or service_version in record.spec_versions


def remember_previous(record: ServiceRecord) -> None:
    """Before an update replaces the spec: keep it, and the versions that ran it."""
    record.previous = record.to_spec_json()
    record.previous_versions = [record.version, *record.spec_versions]
    record.spec_versions = []
    record.update_failures = []


def swap_to_previous(record: ServiceRecord, message: str) -> None:
    """Make the previous spec the spec and the spec the previous one (Swarm's rollback), with
    state ROLLBACK_STARTED; FailedPrecondition when there is no previous spec."""
    if record.previous is None:
        raise FailedPrecondition(
            f"service {record.name} has no previous spec to roll back to",
            reason="NO_PREVIOUS_SPEC",
            metadata={"service_id": record.id},
        )
    restored, restored_versions = record.previous, record.previous_versions
    record.previous = record.to_spec_json()
    record.previous_versions = [record.version, *record.spec_versions]
    record.apply_spec_json(restored)
    record.spec_versions = list(restored_versions)
    record.version += 1
    record.update_failures = []
    record.update_state, record.update_message = ROLLBACK_STARTED, message


def too_many_failures(failures: int, replicas: int, max_ratio: float) -> bool:
    """Swarm's rule: the action applies once failures / replicas updated exceeds the ratio."""
    return failures / max(replicas, 1) > max_ratio
