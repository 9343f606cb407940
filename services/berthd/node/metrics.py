"""The node agent's own Prometheus figures (per-RPC figures come from the common interceptor)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONTAINERS = Gauge("berth_node_containers", "Containers on this node, by state.", ["state"])
START_SECONDS = Histogram(
    "berth_node_container_start_seconds",
    "Time from a start request until the container's process runs.",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
PULLED_BYTES = Counter("berth_node_pulled_bytes_total", "Layer bytes downloaded from the registry.")
LAYER_CACHE = Counter(
    "berth_node_layer_cache_total",
    "Layers needed by a pull, by whether the node already had them (hit) or not (miss).",
    ["result"],
)
CONTAINER_CPU = Gauge(
    "berth_node_container_cpu_seconds",
    "CPU time a running container has used, from its cgroup.",
    ["container", "name"],
)
CONTAINER_MEMORY = Gauge(
    "berth_node_container_memory_bytes",
    "Memory a running container uses, from its cgroup.",
    ["container", "name"],
)
RESTARTS = Counter("berth_node_container_restarts_total", "Restarts done by restart policies.")
