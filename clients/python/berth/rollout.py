"""Rollout settings (UpdateConfig) as Docker's `--update-*` and `--rollback-*` flags set them:
only the fields given change."""

from __future__ import annotations

from dataclasses import dataclass

from berth.cluster.v1 import cluster_pb2 as pb
from berth.enums.cluster import FAILURE_ACTIONS, UPDATE_ORDERS


@dataclass(frozen=True)
class RolloutChanges:
    """The fields of an UpdateConfig to set; None leaves one as it is."""

    parallelism: int | None = None
    delay_ns: int | None = None
    monitor_ns: int | None = None
    order: str | None = None  # stop-first, start-first
    failure_action: str | None = None  # pause, continue, rollback
    max_failure_ratio: float | None = None

    def apply(self, config: pb.UpdateConfig) -> None:
        if self.parallelism is not None:
            config.parallelism = self.parallelism
        if self.delay_ns is not None:
            config.delay.FromNanoseconds(self.delay_ns)
        if self.monitor_ns is not None:
            config.monitor.FromNanoseconds(self.monitor_ns)
        if self.order is not None:
            config.order = UPDATE_ORDERS.value(self.order)
        if self.failure_action is not None:
            config.failure_action = FAILURE_ACTIONS.value(self.failure_action)
        if self.max_failure_ratio is not None:
            config.max_failure_ratio = self.max_failure_ratio
