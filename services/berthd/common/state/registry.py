"""The registry's names as other services read them: tag and manifest keys, read-side decoding,
and the names-changed marker (docs/etcd.md). Keys, relative to the store prefix:

    registry/manifests/<repo>@<digest>   {"media_type", "size", "references", "created_at"}
                                         (and "subject", "artifact_type" for a manifest
                                         with a subject: the referrers API)
    registry/names-changed               {"changed_at"}: put last in every registry
                                         transaction that writes or deletes a tag or a
                                         manifest record
    registry/repos/<repo>                (the registry's own; not read here)
    registry/tags/<repo>@<tag>           {"digest", "pushed_at"}

The registry is the only writer (berthd.registry.metadata builds its keys here). The image
service keeps the catalog's names in memory from one listing and a watch of the range from
`registry/manifests/` to the end of `registry/tags/` (`NAMES_START`, `NAMES_END`), which holds
the marker. The marker makes that view exact at the cost of one point read: its mod revision
is the revision of the latest change to any name, so a view that has applied the watch up to
it holds every change committed before the read (berthd.image.names). A repository name never
contains `@`, so `<repo>@` is an exact prefix of one repository's children.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from berthd.common.store import Op, Store, encode, prefix_end

REPOS = "registry/repos/"
TAGS = "registry/tags/"
MANIFESTS = "registry/manifests/"
LINKS = "registry/links/"
NAMES_CHANGED = "registry/names-changed"

# The watched range: manifests, the marker, repositories and tags (not the blob links, which
# change with every blob pushed and name nothing).
NAMES_START = MANIFESTS
NAMES_END = prefix_end(TAGS)
assert NAMES_START < NAMES_CHANGED < NAMES_END


def tag_key(repo: str, tag: str) -> str:
    return f"{TAGS}{repo}@{tag}"


def manifest_key(repo: str, digest: str) -> str:
    return f"{MANIFESTS}{repo}@{digest}"


def split_child_key(key: str, kind_prefix: str) -> tuple[str, str]:
    """`registry/tags/a/b@v1` -> ("a/b", "v1")."""
    repo, _, child = key[len(kind_prefix) :].rpartition("@")
    return repo, child


def op_names_changed(store: Store) -> Op:
    """The marker's put: the last op of a transaction that writes or deletes a tag or a
    manifest record (last, so a watcher that sees it has seen the whole transaction)."""
    return store.op_put(NAMES_CHANGED, encode({"changed_at": time.time()}))


@dataclass(frozen=True)
class NameChange:
    """A tag or manifest key's new value, as a reader needs it. `value` is the digest a tag
    names, or the digests a manifest references (config first, then layers; an index's
    children); None for a delete, or for a damaged record (read as absent)."""

    kind: str  # "tag" | "manifest"
    repository: str
    name: str  # the tag, or the manifest's digest
    value: str | tuple[str, ...] | None


def name_change(key: str, value: bytes | None) -> NameChange | None:
    """A put (value) or delete (None) of `key` as a NameChange; None for keys other than tags
    and manifests (the marker, repositories)."""
    if key.startswith(TAGS):
        repo, tag = split_child_key(key, TAGS)
        return NameChange("tag", repo, tag, None if value is None else _tag_digest(value))
    if key.startswith(MANIFESTS):
        repo, digest = split_child_key(key, MANIFESTS)
        references = None if value is None else _manifest_references(value)
        return NameChange("manifest", repo, digest, references)
    return None


def _tag_digest(value: bytes) -> str | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    digest = data.get("digest") if isinstance(data, dict) else None
    return digest if isinstance(digest, str) and digest else None


def _manifest_references(value: bytes) -> tuple[str, ...] | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    references = data.get("references") if isinstance(data, dict) else None
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        return None
    return tuple(references)
