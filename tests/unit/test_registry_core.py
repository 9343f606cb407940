"""Pure parts of the registry core: search ranking, page tokens, etcd key layout, flags."""

from __future__ import annotations

import argparse
import hashlib
from bisect import bisect_left

import pytest

from berthd.common.config import add_flag, env_name, split_host_port
from berthd.common.errors import Aborted, InvalidArgument, NotFound
from berthd.common.pages import encode_token
from berthd.common.store import Entry, Page, RevisionCompacted, Store, encode, prefix_end
from berthd.registry.core import Registry, rank_repositories
from berthd.registry.metadata import (
    TAGS,
    ListedManifest,
    Metadata,
    RepoRecord,
    manifest_key,
    repo_key,
    split_child_key,
    tag_key,
)


def repo(name: str, description: str = "", **labels: str) -> RepoRecord:
    return RepoRecord(name, 0.0, 0.0, description, labels)


def test_search_ranks_name_prefix_then_name_then_description_then_labels() -> None:
    records = [
        repo("z/uses-redis-client", "talks to redis"),
        repo("db/redis"),
        repo("cache/store", "a Redis-compatible store"),
        repo("tools/misc", team="redis-ops"),
        repo("web/nginx"),
    ]
    ranked = rank_repositories(records, "Redis", {})
    assert [r.name for _, r in ranked] == [
        "db/redis",
        "z/uses-redis-client",
        "cache/store",
        "tools/misc",
    ]
    assert [rank for rank, _ in ranked] == [0, 1, 2, 3]


def test_search_label_filter() -> None:
    records = [repo(f"r/{n}", os="linux" if n % 2 else "windows") for n in range(10)]
    found = rank_repositories(records, "", {"os": "linux"})
    assert [r.name for _, r in found] == ["r/1", "r/3", "r/5", "r/7", "r/9"]


class ReposOnly:
    """Metadata with repositories and nothing else, for search."""

    def __init__(self, records: list[RepoRecord]) -> None:
        self.records = records

    async def all_repos(self) -> list[RepoRecord]:
        return [
            RepoRecord(r.name, 0.0, 0.0, r.description, dict(r.labels), 1) for r in self.records
        ]


async def test_search_pages_and_its_tokens_belong_to_their_filters() -> None:
    records = [repo(f"r/{n}", os="linux" if n % 2 else "windows") for n in range(10)]
    registry = Registry(None, ReposOnly(records))  # type: ignore[arg-type]
    page, token = await registry.search("", {"os": "linux"}, 2, "")
    names = [r.name for r in page]
    while token:
        page, token = await registry.search("", {"os": "linux"}, 2, token)
        names += [r.name for r in page]
    assert names == ["r/1", "r/3", "r/5", "r/7", "r/9"]
    everything, token = await registry.search("", {}, 0, "")
    assert len(everything) == 10 and token == ""
    _, token = await registry.search("r", {}, 3, "")
    with pytest.raises(InvalidArgument, match="page_token") as failed:
        await registry.search("x", {}, 3, token)
    assert failed.value.reason == "INVALID_PAGE_TOKEN"
    assert failed.value.details.field_violations[0][0] == "page_token"


def test_child_keys_are_unambiguous_for_nested_repositories() -> None:
    assert tag_key("a/b", "v1") == f"{TAGS}a/b@v1"
    assert split_child_key(tag_key("a/b", "v1"), TAGS) == ("a/b", "v1")
    # `a@` is not a prefix of `a/b@...`: one repository's tags never include a nested one's.
    assert not tag_key("a/b", "v1").startswith(f"{TAGS}a@")


def test_flags_take_defaults_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("--data-dir", "registry") == "BERTH_REGISTRY_DATA_DIR"
    monkeypatch.setenv("BERTH_LEASE_TTL", "42")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--lease-ttl", default=10, type=int, help="ttl")
    assert parser.parse_args([]).lease_ttl == 42
    assert parser.parse_args(["--lease-ttl", "7"]).lease_ttl == 7
    assert split_host_port("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="host:port"):
        split_host_port("nohost")


class VersionedStore:
    """In-memory stand-in for `Store.range`: keeps every revision, like etcd's MVCC, so
    reads at an old revision see that moment, and compacting drops the old ones."""

    # The real batching over `range`.
    iterate_range = Store.iterate_range

    def __init__(self) -> None:
        self.versions: dict[int, dict[str, bytes]] = {1: {}}
        self.compacted = 0
        self.revisions_read: list[int] = []

    @property
    def revision(self) -> int:
        return max(self.versions)

    def put(self, key: str, value: object) -> None:
        self.versions[self.revision + 1] = {**self.versions[self.revision], key: encode(value)}

    def delete(self, key: str) -> None:
        data = dict(self.versions[self.revision])
        del data[key]
        self.versions[self.revision + 1] = data

    async def range(self, start: str, end: str, *, limit: int = 0, revision: int = 0) -> Page:
        if revision and revision <= self.compacted:
            raise RevisionCompacted(f"revision {revision} compacted")
        self.revisions_read.append(revision)
        at = revision or self.revision
        keys = sorted(self.versions[at])
        selected = [k for k in keys[bisect_left(keys, start) :] if k < end]
        page = selected[:limit] if limit else selected
        entries = [Entry(k, self.versions[at][k], 0, 0, 0) for k in page]
        return Page(entries, at, len(selected) > len(page))


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def push(store: VersionedStore, repo: str, digest: str, *tags: str, refs: int = 2) -> None:
    store.put(repo_key(repo), {"created_at": 1.0, "last_push_at": 2.0})
    references = [sha(f"{digest}-{n}") for n in range(refs)]
    store.put(
        manifest_key(repo, digest),
        {"media_type": "m", "size": 10, "references": references, "created_at": 3.0},
    )
    for tag in tags:
        store.put(tag_key(repo, tag), {"digest": digest, "pushed_at": 4.0})


def listed(entries: list[ListedManifest]) -> list[tuple[str, str, list[str]]]:
    return [(e.repository, e.record.digest, [t.name for t in e.tags]) for e in entries]


async def list_all(registry: Registry, repository: str = "", size: int = 0) -> list:
    entries, token = await registry.list_manifests(repository, size, "")
    while token:
        page, token = await registry.list_manifests(repository, size, token)
        entries += page
    return entries


@pytest.fixture
def store() -> VersionedStore:
    store = VersionedStore()
    shared, solo, other = sha("shared"), sha("solo"), sha("other")
    push(store, "lib/app", shared, "v1", "latest")
    push(store, "lib/app", solo, "old")
    push(store, "lib/app/sub", other)
    push(store, "lib/app-tools", shared, "stable")
    return store


def registry_over(store: VersionedStore) -> Registry:
    return Registry(None, Metadata(store))  # type: ignore[arg-type]


async def test_list_manifests_groups_tags_by_repository_and_digest(store) -> None:
    entries = await list_all(registry_over(store))
    shared, solo, other = sha("shared"), sha("solo"), sha("other")
    # Key order: "lib/app-tools@" < "lib/app/sub@" < "lib/app@" ("-" < "/" < "@").
    assert listed(entries) == [
        ("lib/app-tools", shared, ["stable"]),
        ("lib/app/sub", other, []),
        *sorted([("lib/app", shared, ["latest", "v1"]), ("lib/app", solo, ["old"])]),
    ]
    first = entries[0]
    assert first.record.references == (sha(f"{shared}-0"), sha(f"{shared}-1"))
    assert (first.record.media_type, first.record.size, first.record.created_at) == ("m", 10, 3.0)
    assert first.tags[0].pushed_at == 4.0 and first.tags[0].digest == shared


async def test_list_manifests_filters_one_repository_without_nested_ones(store) -> None:
    registry = registry_over(store)
    assert {e.record.digest for e in await list_all(registry, "lib/app")} == {
        sha("shared"),
        sha("solo"),
    }
    assert [e.repository for e in await list_all(registry, "lib/app/sub")] == ["lib/app/sub"]
    with pytest.raises(NotFound, match="lib/nothing") as unknown:
        await registry.list_manifests("lib/nothing", 0, "")
    assert unknown.value.reason == "NAME_UNKNOWN"
    assert unknown.value.details.metadata == {"repository": "lib/nothing"}
    with pytest.raises(InvalidArgument) as invalid:
        await registry.list_manifests("Not/Valid", 0, "")
    assert invalid.value.reason == "NAME_INVALID"
    assert invalid.value.details.field_violations[0][0] == "repository"


async def test_list_manifests_pages_share_the_first_pages_revision(store) -> None:
    registry = registry_over(store)
    everything = listed(await list_all(registry))
    page, token = await registry.list_manifests("", 2, "")
    assert len(page) == 2 and token
    revision = store.revision
    # Writes after the first page are not seen by the rest of the listing...
    push(store, "zzz/late", sha("late"), "v1")
    store.delete(tag_key("lib/app", "old"))
    store.revisions_read.clear()
    rest, last_token = await registry.list_manifests("", 2, token)
    assert last_token == "" and set(store.revisions_read) == {revision}
    assert listed(page + rest) == everything
    # ... but a new listing sees them.
    fresh = listed(await list_all(registry, size=2))
    assert ("zzz/late", sha("late"), ["v1"]) in fresh
    assert ("lib/app", sha("solo"), []) in fresh


async def test_list_manifests_reads_many_tags_in_batches(store) -> None:
    for n in range(1200):
        store.put(tag_key("lib/app", f"t{n:04}"), {"digest": sha("solo"), "pushed_at": 5.0})
    entries = await list_all(registry_over(store), "lib/app", size=1)
    tags = {e.record.digest: [t.name for t in e.tags] for e in entries}
    assert len(tags[sha("solo")]) == 1201 and tags[sha("shared")] == ["latest", "v1"]


async def test_list_manifests_rejects_bad_tokens_and_expired_views(store) -> None:
    registry = registry_over(store)
    _, token = await registry.list_manifests("", 1, "")
    for bad in (
        "%%%",
        encode_token("manifests", "garbage"),
        encode_token("manifests", 0, f"lib/app@{sha('x')}"),
        encode_token("tags:lib/app", 1, f"lib/app@{sha('x')}"),
    ):
        with pytest.raises(InvalidArgument, match="page_token"):
            await registry.list_manifests("", 1, bad)
    # A token from an unfiltered listing names a repository other than the filter's.
    with pytest.raises(InvalidArgument, match="page_token"):
        await registry.list_manifests("lib/app", 1, token)
    store.compacted = store.revision
    with pytest.raises(Aborted, match="list again") as expired:
        await registry.list_manifests("", 1, token)
    assert expired.value.reason == "LISTING_EXPIRED"


def test_prefix_end_bounds_exactly_the_prefix() -> None:
    end = prefix_end(tag_key("a", ""))
    assert tag_key("a", "zzz") < end <= tag_key("aa", "x")
    assert tag_key("a/b", "v1") < tag_key("a", "") and not tag_key("a/b", "v1").startswith(
        f"{TAGS}a@"
    )
