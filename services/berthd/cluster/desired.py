"""The cluster's desired state in etcd: the contract between the cluster service and node agents.

The cluster service writes one record per container it placed; each node agent watches the
records assigned to it and converges (pull, create, start, stop, remove), reporting what it
observes under `containers/<id>/status`. Keys, relative to the store prefix:

    cluster/containers/<id>             DesiredContainer (JSON)
    cluster/allocations/<node id>       {"cpu_millis", "memory_bytes", "containers"}: what the
                                        node's placed containers reserve; updated in the same
                                        transaction as a placement, so two concurrent runs can
                                        never overbook a node
    cluster/availability/<node id>      {"availability": "active" | "cordoned" | "drained"}
    cluster/node-layers/<node id>       {layer digest: compressed bytes}: the layers the node
                                        holds, written by its agent after pulls and removals,
                                        for image locality in placement
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from berthd.node.spec import ContainerConfig

CONTAINERS = "cluster/containers/"
ALLOCATIONS = "cluster/allocations/"
AVAILABILITY = "cluster/availability/"
NODE_LAYERS = "cluster/node-layers/"

RUNNING = "running"
STOPPED = "stopped"
# Label every cluster-managed container carries on its node, so an agent that comes back
# after being declared dead knows which of its containers the cluster may have moved.
MANAGED_LABEL = "berth.cluster.managed"


def container_key(container_id: str) -> str:
    return CONTAINERS + container_id


def status_key(container_id: str) -> str:
    return f"containers/{container_id}/status"


@dataclass
class DesiredContainer:
    id: str
    name: str
    node: str
    config: ContainerConfig
    desired: str = RUNNING
    cpu_millis: int = 0
    memory_bytes: int = 0
    constraints: list[str] = field(default_factory=list)
    service: str = ""
    slot: int = 0
    scheduled_at: float = field(default_factory=time.time)
    # Version of its service's spec the replica runs (rolling updates replace older ones).
    service_version: int = 0
    # The node it was moved from when its node was lost or drained (CONTAINER_RESCHEDULED).
    previous_node: str = ""

    def to_json(self) -> bytes:
        data = asdict(self)
        data["config"] = json.loads(self.config.to_json())
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> DesiredContainer:
        data: dict[str, Any] = json.loads(raw)
        data["config"] = ContainerConfig.from_json(json.dumps(data["config"]))
        return cls(**data)
