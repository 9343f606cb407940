"""The builder service's own Prometheus figures (per-RPC figures come from the common interceptor).

berth_builder_builds_total{outcome}     builds by outcome: "ok", "failed" (a RUN step
                                        exited non-zero), "error" (anything else)
berth_builder_steps_total{result}       steps by result: "cached" or "executed"
berth_builder_build_seconds             duration of whole builds, context received to
                                        image written
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUILDS = Counter(
    "berth_builder_builds_total", "Builds by outcome (ok, failed, error).", ["outcome"]
)
STEPS = Counter(
    "berth_builder_steps_total",
    "Build steps by result: taken from the cache, or executed.",
    ["result"],
)
BUILD_SECONDS = Histogram(
    "berth_builder_build_seconds",
    "Duration of whole builds.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
