"""One family of records in etcd: `<prefix><id><suffix>` keys holding one typed record each.

Every state module declares its families with this class, so each one has one key builder
(`key`), one parser of its keys (`id_of`), reads by key (`get`, `read`, `get_at`), whole-family
reads for the readers that need every record (`list`, `snapshot`), and a watch that sees only
its own family (`watch`). Transactions use `op_put`, `op_delete`, `unchanged` and `absent`.

Values that do not decode (a newer or broken writer) are logged and skipped by every read
and watch here, so one bad record never stops a reader.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from berthd.common.errors import BerthError
from berthd.common.store import Compare, Entry, Op, Store, WatchEvent

log = logging.getLogger("berthd.state")

# What a record that does not decode raises.
DECODE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, BerthError)


class Record(Protocol):
    def encode(self) -> bytes: ...


R = TypeVar("R", bound=Record)


def known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` without the keys `cls` (a dataclass) has no field for: a record written by a
    newer service still decodes."""
    names = _field_names(cls)
    return {k: v for k, v in data.items() if k in names}


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class Versioned(Generic[R]):
    """A record with the mod revision it was read at, for `unchanged` compares."""

    id: str
    record: R
    mod_revision: int


@dataclass(frozen=True)
class Change(Generic[R]):
    """One watch event of a family: a put (with the new record) or a delete (record None)."""

    kind: Literal["put", "delete"]
    id: str
    record: R | None


class Family(Generic[R]):
    """Records under `prefix`, one per id, optionally followed by `suffix`
    (`containers/<id>/status`). `decode(id, raw)` turns a stored value into the record."""

    def __init__(
        self, name: str, prefix: str, decode: Callable[[str, bytes], R], suffix: str = ""
    ) -> None:
        assert prefix.endswith("/") and (not suffix or suffix.startswith("/"))
        self.name = name
        self.prefix = prefix
        self.suffix = suffix
        self._decode = decode

    def __repr__(self) -> str:
        return f"Family({self.prefix}<id>{self.suffix})"

    # Keys ---------------------------------------------------------------------------------

    def key(self, id: str) -> str:
        """The key of record `id`, relative to the store prefix."""
        if not id or (self.suffix and "/" in id):
            raise ValueError(f"invalid {self.name} id {id!r}")
        return f"{self.prefix}{id}{self.suffix}"

    def id_of(self, key: str) -> str | None:
        """The id in `key` if it is a key of this family, else None."""
        if not key.startswith(self.prefix) or not key.endswith(self.suffix):
            return None
        id = key[len(self.prefix) : len(key) - len(self.suffix)]
        if not id or (self.suffix and "/" in id):
            return None
        return id

    def decode(self, id: str, raw: bytes) -> R:
        return self._decode(id, raw)

    def _readable(self, id: str, raw: bytes) -> R | None:
        try:
            return self._decode(id, raw)
        except DECODE_ERRORS as exc:
            log.warning("ignoring unreadable %s record %s: %s", self.name, self.key(id), exc)
            return None

    def versioned(self, entry: Entry) -> Versioned[R] | None:
        """A stored entry of this family as a record with its revision; None for another
        family's key or a value that does not decode (logged)."""
        return self._versioned(entry)

    def _versioned(self, entry: Entry) -> Versioned[R] | None:
        id = self.id_of(entry.key)
        if id is None:
            return None
        record = self._readable(id, entry.value)
        return None if record is None else Versioned(id, record, entry.mod_revision)

    # Reads --------------------------------------------------------------------------------

    async def get(self, store: Store, id: str) -> R | None:
        """Record `id`, or None when it does not exist (or does not decode)."""
        found = await self.read(store, id)
        return found.record if found else None

    async def read(self, store: Store, id: str) -> Versioned[R] | None:
        """Record `id` with its mod revision, or None."""
        entry = await store.get(self.key(id))
        return self._versioned(entry) if entry is not None else None

    async def get_at(self, store: Store, id: str) -> tuple[R | None, int]:
        """Record `id` (or None) and the store revision it was read at: `watch(store,
        revision + 1, id)` then misses nothing and repeats nothing."""
        entries, revision = await store.snapshot(self.key(id))
        for entry in entries:
            found = self._versioned(entry)
            if found is not None and found.id == id:
                return found.record, revision
        return None, revision

    async def list(self, store: Store, id_prefix: str = "") -> list[Versioned[R]]:
        """Every record (whose id starts with `id_prefix`), in key order."""
        found = []
        async for entry in store.iterate(self.prefix + id_prefix):
            versioned = self._versioned(entry)
            if versioned is not None:
                found.append(versioned)
        return found

    async def records(self, store: Store, id_prefix: str = "") -> dict[str, R]:
        """{id: record} of every record (whose id starts with `id_prefix`)."""
        return {v.id: v.record for v in await self.list(store, id_prefix)}

    async def snapshot(self, store: Store) -> tuple[list[Versioned[R]], int]:
        """Every record and the store revision they were read at, in one read."""
        entries, revision = await store.snapshot(self.prefix)
        found = [v for v in map(self._versioned, entries) if v is not None]
        return found, revision

    # Watches ------------------------------------------------------------------------------

    def change(self, event: WatchEvent) -> Change[R] | None:
        """`event` as a change of this family; None for another family's key or a put whose
        value does not decode. For callers that watch several families in one stream."""
        id = self.id_of(event.key)
        if id is None:
            return None
        if event.kind == "delete":
            return Change("delete", id, None)
        record = self._readable(id, event.value)
        return None if record is None else Change("put", id, record)

    async def watch(
        self, store: Store, start_revision: int | None = None, id: str | None = None
    ) -> AsyncIterator[Change[R]]:
        """Changes of this family (of record `id` only, when given) from `start_revision`.
        RevisionCompacted when etcd no longer keeps that revision (at the start, or later for
        a watch that fell behind): the caller reads again (`snapshot`, `get_at`) and watches
        on from the revision of that read."""
        watched = self.key(id) if id is not None else self.prefix
        async for event in store.watch_prefix(watched, start_revision):
            change = self.change(event)
            if change is not None and (id is None or change.id == id):
                yield change

    # Writes (by the family's owner only) and transactions ---------------------------------

    async def put(self, store: Store, id: str, record: R, lease: int | None = None) -> None:
        await store.put(self.key(id), record.encode(), lease)

    async def delete(self, store: Store, id: str) -> bool:
        return await store.delete(self.key(id))

    def op_put(self, store: Store, id: str, record: R, lease: int | None = None) -> Op:
        return store.op_put(self.key(id), record.encode(), lease)

    def op_delete(self, store: Store, id: str) -> Op:
        return store.op_delete(self.key(id))

    def unchanged(self, store: Store, id: str, mod_revision: int) -> Compare:
        """Record `id` still has this mod revision (0: it still does not exist)."""
        return store.unchanged(self.key(id), mod_revision)

    def absent(self, store: Store, id: str) -> Compare:
        return store.absent(self.key(id))

    def value_is(self, store: Store, id: str, record: R) -> Compare:
        """Record `id` is still exactly `record` as it was written (encodings are stable)."""
        return store.value_is(self.key(id), record.encode())
