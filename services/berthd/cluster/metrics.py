"""Prometheus metrics of the cluster service (per-RPC figures come from the interceptor)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SCHEDULING_SECONDS = Histogram(
    "berth_cluster_scheduling_seconds",
    "Time to place containers and record the placement in etcd, per placement transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PLACEMENTS = Counter(
    "berth_cluster_placements_total",
    "Container placements by outcome (placed, unschedulable, conflict).",
    ["outcome"],
)
NODES = Gauge("berth_cluster_nodes", "Nodes known to the cluster, by state.", ["state"])
RESCHEDULES = Counter(
    "berth_cluster_reschedules_total",
    "Containers moved to another node, by reason (node_lost, node_drained).",
    ["reason"],
)
LEADER = Gauge(
    "berth_cluster_leader", "1 while this instance holds the controller election, else 0."
)
CONTROLLER_PASSES = Counter(
    "berth_cluster_controller_passes_total",
    "Controller passes that had something to reconcile (services or containers marked dirty).",
)
CONTROLLER_LISTINGS = Counter(
    "berth_cluster_controller_listings_total",
    "Full listings of the controller's view: at leadership, after a lost or compacted watch.",
)
CONTROLLER_CONFLICTS = Counter(
    "berth_cluster_controller_conflicts_total",
    "Controller transactions refused by etcd (a record changed meanwhile, or the fence).",
)
