"""The build cache: one etcd record per executed step, keyed by a hash chain.

A step's key is the sha256 of a JSON array naming everything its result depends on: the key
before it (for a stage's first step, the base image's manifest digest, "scratch", or the last
key of the stage it is FROM), the normalized instruction, the build args it can see, and for
COPY/ADD what it copies (the sources' content digest, or the key of the stage `--from` names).
Since each key contains the one before, a change invalidates that step and every later one,
never the earlier ones.

    build-cache/<key>   {"instruction", "layer" (descriptor or null), "diff_id", "history",
                         "created_at", "last_used", "uses", "image"}

Records are content keyed by the hash of their inputs, so two builders writing the same key
write equivalent results and a plain put is enough (no race to guard). Refreshing `last_used`
and `uses` is best effort: a compare-and-swap on the record's revision that gives up when
another build refreshed it first. `image` is the untagged image of the state after the step
that the builder pushed to the cache repository (to run a RUN on, or to keep a stage's layers
referenced); pruning the record deletes it, so the registry's garbage collection can free the
layers no record holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from berthd.common.errors import BerthError
from berthd.common.oci.manifest import Descriptor
from berthd.common.store import Entry, Store
from berthd.image.catalog import BUILD_CACHE_REPOSITORY

log = logging.getLogger("berthd.builder.cache")

PREFIX = "build-cache/"
# Where the builder keeps layers and intermediate images (the catalog's prune leaves it alone).
CACHE_REPOSITORY = BUILD_CACHE_REPOSITORY
# Every key starts from this version, so a change in how steps are executed invalidates older
# records at once.
KEY_VERSION = "berth-build-cache-v1"
SCRATCH = "scratch"


def step_key(
    parent: str,
    cache_text: str,
    used_args: Iterable[tuple[str, str]] = (),
    sources: str = "",
    source_parent: str = "",
) -> str:
    """The cache key (sha256 hex) of a step after `parent`. `sources` is a COPY/ADD's content
    digest, `source_parent` the key (or image digest) its `--from` names."""
    doc: list[Any] = [KEY_VERSION, parent, cache_text, sorted([k, v] for k, v in used_args)]
    if sources or source_parent:
        doc += [sources, source_parent]
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CacheRecord:
    """What one step produced: the layer it added (None for none) and its history entry
    (`created`, `created_by`, `comment`, `empty_layer`), kept so a cached rebuild writes the
    same config and so the same image digest."""

    key: str
    instruction: str
    layer: Descriptor | None
    diff_id: str
    history: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    uses: int = 1
    image: str = ""

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["key"]
        doc["layer"] = self.layer.to_dict() if self.layer else None
        return doc

    @classmethod
    def from_entry(cls, entry: Entry) -> CacheRecord:
        doc = entry.json()
        layer = doc.get("layer")
        return cls(
            key=entry.key[len(PREFIX) :],
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


@dataclass(frozen=True)
class PruneResult:
    deleted: list[CacheRecord]
    bytes_freed: int  # compressed bytes of layers no remaining record holds


# Deletes an intermediate image (a manifest digest in the cache repository).
DeleteImage = Callable[[str], Awaitable[None]]


class BuildCache:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, key: str) -> tuple[CacheRecord, int] | None:
        """The record and its etcd revision (for touch), or None."""
        entry = await self.store.get(PREFIX + key)
        record = _readable(entry) if entry is not None else None
        return None if record is None else (record, entry.mod_revision)

    async def put(self, record: CacheRecord) -> None:
        await self.store.put_json(PREFIX + record.key, record.to_json())

    async def touch(self, record: CacheRecord, revision: int) -> None:
        """A cache hit: count the use. Skipped if the record changed since it was read."""
        used = replace(record, last_used=time.time(), uses=record.uses + 1)
        key = PREFIX + record.key
        await self.store.txn(
            [self.store.unchanged(key, revision)], [self.store.op_put(key, used.to_json())]
        )

    async def set_image(self, key: str, digest: str) -> None:
        """Remember the intermediate image pushed for the state after step `key`."""
        found = await self.get(key)
        if found is not None and found[0].image != digest:
            await self.put(replace(found[0], image=digest))

    async def list(self) -> list[CacheRecord]:
        """Every record, most recently used first."""
        records = [r async for _, r in self._entries()]
        records.sort(key=lambda r: r.last_used, reverse=True)
        return records

    async def _entries(self) -> AsyncIterator[tuple[Entry, CacheRecord]]:
        async for entry in self.store.iterate(PREFIX):
            record = _readable(entry)
            if record is not None:
                yield entry, record

    async def prune(
        self, unused_for: float | None, delete_image: DeleteImage, now: float | None = None
    ) -> PruneResult:
        """Delete records unused for `unused_for` seconds (None or 0: all) and the intermediate
        images they hold. A record used again meanwhile survives (compare on its revision)."""
        cutoff = (now or time.time()) - (unused_for or 0)
        entries = [pair async for pair in self._entries()]
        deleted: list[CacheRecord] = []
        kept: list[CacheRecord] = []
        for entry, record in entries:
            doomed = not unused_for or record.last_used <= cutoff
            if doomed:
                ok, _ = await self.store.txn(
                    [self.store.unchanged(entry.key, entry.mod_revision)],
                    [self.store.op_delete(entry.key)],
                )
                doomed = ok
            (deleted if doomed else kept).append(record)
        for record in deleted:
            if record.image:
                await delete_image(record.image)
        return PruneResult(deleted, freed_bytes(deleted, kept))


def _readable(entry: Entry) -> CacheRecord | None:
    try:
        return CacheRecord.from_entry(entry)
    except (ValueError, TypeError, KeyError, BerthError) as exc:
        log.warning("ignoring unreadable build cache record %s: %s", entry.key, exc)
        return None


def freed_bytes(deleted: Iterable[CacheRecord], kept: Iterable[CacheRecord]) -> int:
    """Bytes of the distinct layers the deleted records held and no kept record holds."""
    held = {r.layer.digest for r in kept if r.layer}
    gone = {r.layer.digest: r.layer.size for r in deleted if r.layer and r.layer.digest not in held}
    return sum(gone.values())
