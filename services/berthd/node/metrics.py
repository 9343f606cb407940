"""The node agent's own Prometheus figures (per-RPC figures come from the common interceptor)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from berthd.node import cgroups

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
RESTARTS = Counter("berth_node_container_restarts_total", "Restarts done by restart policies.")
MONITOR_WAKEUPS = Counter(
    "berth_node_monitor_wakeups_total",
    "Times the exit monitor woke up: a conmon exited, or the safety sweep ran.",
)
EXIT_CHECKS = Counter(
    "berth_node_exit_checks_total", "Exit files the exit monitor read (each running container's)."
)
EXIT_WATCHES = Gauge(
    "berth_node_exit_watches", "Running containers whose conmon the agent watches (one pidfd each)."
)

# (id, name, cgroups path) of each running container.
Running = Callable[[], Iterable[tuple[str, str, str]]]


class ContainerUsage(Collector):
    """CPU and memory of each running container, read from its cgroup when /metrics is
    scraped: a node nobody scrapes reads no cgroup files at all."""

    def __init__(self) -> None:
        self.sources: list[Running] = []

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "berth_node_container_cpu_seconds",
                "CPU time a running container has used, from its cgroup.",
                labels=["container", "name"],
            ),
            GaugeMetricFamily(
                "berth_node_container_memory_bytes",
                "Memory a running container uses, from its cgroup.",
                labels=["container", "name"],
            ),
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cpu, memory = self._families()
        # Runs in the metrics server's thread: `list` takes each source's containers at once.
        for source in list(self.sources):
            for container_id, name, path in list(source()):
                sample = cgroups.read_stats(path)
                if sample is None:  # exited meanwhile
                    continue
                labels = [container_id[:12], name]
                cpu.add_metric(labels, sample.cpu_nanos / 1e9)
                memory.add_metric(labels, sample.memory_bytes)
        yield cpu
        yield memory


CONTAINER_USAGE = ContainerUsage()
REGISTRY.register(CONTAINER_USAGE)
