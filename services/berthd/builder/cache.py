"""The build cache: one etcd record per executed step, keyed by a hash chain.

A step's key is the sha256 of a JSON array naming everything its result depends on: the key
before it (for a stage's first step, the base image's manifest digest, "scratch", or the last
key of the stage it is FROM), the normalized instruction, the build args it can see, and for
COPY/ADD what it copies (the sources' content digest, or the key of the stage `--from` names).
Since each key contains the one before, a change invalidates that step and every later one,
never the earlier ones.

    build-cache/<key>   CacheRecord (berthd.common.state.build_cache): {"instruction", "layer"
                        (descriptor or null), "diff_id", "history", "created_at",
                        "last_used", "uses", "image"}

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
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

# CACHE_REPOSITORY: where the builder keeps layers and intermediate images (the image
# service's prune leaves it alone); the builder's modules name it from here.
from berth.builder.v1.builder_pb2 import ListCacheRequest
from berthd.common.pages import bad_token, decode_token, encode_token, page_size
from berthd.common.state.build_cache import BUILD_CACHE, CacheRecord
from berthd.common.state.build_cache import CACHE_REPOSITORY as CACHE_REPOSITORY
from berthd.common.state.family import Versioned
from berthd.common.store import Store

# The scope of ListCache's page tokens (it has no filters).
LIST_CACHE = "builder.ListCache"
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
        found = await BUILD_CACHE.read(self.store, key)
        return None if found is None else (found.record, found.mod_revision)

    async def put(self, record: CacheRecord) -> None:
        await BUILD_CACHE.put(self.store, record.key, record)

    async def touch(self, record: CacheRecord, revision: int) -> None:
        """A cache hit: count the use. Skipped if the record changed since it was read."""
        used = replace(record, last_used=time.time(), uses=record.uses + 1)
        await self.store.txn(
            [BUILD_CACHE.unchanged(self.store, record.key, revision)],
            [BUILD_CACHE.op_put(self.store, record.key, used)],
        )

    async def set_image(self, key: str, digest: str) -> None:
        """Remember the intermediate image pushed for the state after step `key`."""
        found = await self.get(key)
        if found is not None and found[0].image != digest:
            await self.put(replace(found[0], image=digest))

    async def list(self) -> list[CacheRecord]:
        """Every record, most recently used first (then by key)."""
        records = [found.record for found in await BUILD_CACHE.list(self.store)]
        records.sort(key=lambda r: (-r.last_used, r.key))
        return records

    async def prune(
        self, unused_for: float | None, delete_image: DeleteImage, now: float | None = None
    ) -> PruneResult:
        """Delete records unused for `unused_for` seconds (None or 0: all) and the intermediate
        images they hold. A record used again meanwhile survives (compare on its revision)."""
        cutoff = (now or time.time()) - (unused_for or 0)
        entries: list[Versioned[CacheRecord]] = await BUILD_CACHE.list(self.store)
        deleted: list[CacheRecord] = []
        kept: list[CacheRecord] = []
        for found in entries:
            record = found.record
            doomed = not unused_for or record.last_used <= cutoff
            if doomed:
                ok, _ = await self.store.txn(
                    [BUILD_CACHE.unchanged(self.store, found.id, found.mod_revision)],
                    [BUILD_CACHE.op_delete(self.store, found.id)],
                )
                doomed = ok
            (deleted if doomed else kept).append(record)
        for record in deleted:
            if record.image:
                await delete_image(record.image)
        return PruneResult(deleted, freed_bytes(deleted, kept))


def freed_bytes(deleted: Iterable[CacheRecord], kept: Iterable[CacheRecord]) -> int:
    """Bytes of the distinct layers the deleted records held and no kept record holds."""
    held = {r.layer.digest for r in kept if r.layer}
    gone = {r.layer.digest: r.layer.size for r in deleted if r.layer and r.layer.digest not in held}
    return sum(gone.values())


def cache_page(
    records: list[CacheRecord], request: ListCacheRequest
) -> tuple[list[CacheRecord], str]:
    """One page of `records` (as `list` orders them) and the token of the next ("" after the
    last). Not an offset (berthd.common.pages): the token is the position of the page's last
    record, (last used, key), so a record a build uses meanwhile moves to the front and is
    not listed twice, nor another skipped."""
    size = page_size(request.page_size)
    start = 0
    position = decode_token(request.page_token, LIST_CACHE)
    if position is not None:
        last_used, key = _position(position)
        start = next(
            (
                i
                for i, r in enumerate(records)
                if r.last_used < last_used or (r.last_used == last_used and r.key > key)
            ),
            len(records),
        )
    page = records[start : start + size]
    more = start + size < len(records)
    return page, encode_token(LIST_CACHE, page[-1].last_used, page[-1].key) if more and page else ""


def _position(position: list[object]) -> tuple[float, str]:
    """(last used, key) of the previous page's last record."""
    match position:
        case [int() | float() as last_used, str() as key]:
            return float(last_used), key
    raise bad_token()
