"""Node agents as the rest of the cluster sees them (docs/etcd.md). Keys, relative to the store
prefix:

    nodes/<id>                  NodeRecord, bound to the agent's lease: the node is ready
                                exactly while the key exists. Written by the node agent (its
                                server bootstrap registers it with its endpoint); read by the
                                cluster (nodes, placement, where to reach a container).
    cluster/node-layers/<id>    NodeLayers: the layers the node holds, written by its agent
                                after every pull and image removal (not lease-bound: a node
                                that comes back still holds them). Read by the cluster (image
                                locality in placement) and the image service (which hosts hold
                                an image).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from berthd.common.state.family import Family, known_fields
from berthd.common.store import encode


@dataclass(frozen=True)
class NodeRecord:
    """What a node agent registers about itself."""

    id: str
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    cpus: int = 0
    memory_bytes: int = 0
    version: str = ""
    runtime_version: str = ""

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str, id: str = "") -> NodeRecord:
        """`id`: the id in the record's key, for a record that does not name itself."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a node record is a JSON object")
        record = cls(**{"id": id, **known_fields(cls, data)})
        return cls(
            id=str(record.id),
            address=str(record.address or ""),
            labels={str(k): str(v) for k, v in (record.labels or {}).items()},
            cpus=int(record.cpus or 0),
            memory_bytes=int(record.memory_bytes or 0),
            version=str(record.version or ""),
            runtime_version=str(record.runtime_version or ""),
        )


@dataclass(frozen=True)
class NodeLayers:
    """Layer digest -> compressed bytes of every layer a node holds. Stored as that plain
    JSON object."""

    layers: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return encode(self.layers)

    @classmethod
    def decode(cls, raw: bytes | str) -> NodeLayers:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a node's layers are a JSON object")
        return cls({str(digest): int(size) for digest, size in data.items()})


NODES: Family[NodeRecord] = Family("node", "nodes/", lambda id, raw: NodeRecord.decode(raw, id))
NODE_LAYERS: Family[NodeLayers] = Family(
    "node layers", "cluster/node-layers/", lambda _id, raw: NodeLayers.decode(raw)
)
