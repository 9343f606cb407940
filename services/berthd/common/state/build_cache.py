"""The builder's step cache (docs/etcd.md; how keys are computed: berthd.builder.cache).

    build-cache/<key>   CacheRecord: what one build step produced. Written and pruned by the
                        builder only. Content keyed by the hash of the step's inputs, so two
                        builders writing one key write equivalent records (a plain put);
                        refreshing `last_used`/`uses` and pruning compare the revision.

A record's `image` names an untagged image in CACHE_REPOSITORY, the registry repository the
builder keeps its layers and intermediate images in; the image service's prune leaves that
repository alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from berthd.common.oci.manifest import Descriptor
from berthd.common.state.family import Family
from berthd.common.store import encode

CACHE_REPOSITORY = "berth/build-cache"


@dataclass(frozen=True)
class CacheRecord:
    """What one step produced: the layer it added (None for none) and its history entry
    (`created`, `created_by`, `comment`, `empty_layer`), kept so a cached rebuild writes the
    same config and so the same image digest. `key` is the record's key (not in the value)."""

    key: str
    instruction: str
    layer: Descriptor | None
    diff_id: str
    history: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    uses: int = 1
    image: str = ""

    def encode(self) -> bytes:
        doc = asdict(self)
        del doc["key"]
        doc["layer"] = self.layer.to_dict() if self.layer else None
        return encode(doc)

    @classmethod
    def decode(cls, key: str, raw: bytes | str) -> CacheRecord:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("a build cache record is a JSON object")
        layer = doc.get("layer")
        return cls(
            key=key,
            instruction=str(doc.get("instruction", "")),
            layer=Descriptor.from_dict(layer, "layer") if layer else None,
            diff_id=str(doc.get("diff_id", "")),
            history=dict(doc.get("history") or {}),
            created_at=float(doc.get("created_at", 0.0)),
            last_used=float(doc.get("last_used", 0.0)),
            uses=int(doc.get("uses", 0)),
            image=str(doc.get("image", "")),
        )

    @property
    def size(self) -> int:
        return self.layer.size if self.layer else 0


BUILD_CACHE: Family[CacheRecord] = Family("build cache", "build-cache/", CacheRecord.decode)
