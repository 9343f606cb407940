"""Repository visibility in the registry core: who sees which repositories in listings,
search and manifest listings, what a page token may carry, mounts without a source, and the
cached public lookup the registry gives its Authorizer."""

from __future__ import annotations

import base64

import pytest

from berthd.common.errors import InvalidArgument
from berthd.common.security.permissions import Role, permissions_of
from berthd.common.security.principal import ANONYMOUS, Principal, from_certificate
from berthd.registry.access import PublicCache, pull_filter, sees
from berthd.registry.blobstore import BlobStat
from berthd.registry.core import Registry
from berthd.registry.metadata import PRIVATE, PUBLIC, RecordPage, RepoRecord

from .test_registry_core import VersionedStore, push, registry_over, sha


def token_user(role: Role, *repositories: str) -> Principal:
    return Principal(
        f"user:{role.value}", permissions_of([role]), via="token", repositories=repositories
    )


def decoded(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def test_pull_filter_is_none_for_callers_who_may_pull_everything() -> None:
    assert pull_filter(from_certificate("user:admin")) is None
    assert pull_filter(from_certificate("service:image")) is None
    assert pull_filter(token_user(Role.READER)) is None
    scoped = pull_filter(token_user(Role.DEVELOPER, "team/*"))
    assert scoped is not None
    assert scoped("team/app") and scoped("team/a/b") and not scoped("other/x")
    anonymous = pull_filter(ANONYMOUS)
    assert anonymous is not None and not anonymous("team/app")
    # A certificate that is neither berth's nor the admin's pulls nothing by itself.
    stranger = pull_filter(from_certificate("user:mallory"))
    assert stranger is not None and not stranger("team/app")


def test_a_repository_is_seen_when_pullable_or_public() -> None:
    scoped = pull_filter(token_user(Role.READER, "team/*"))
    assert sees(None, "any/thing", False)
    assert sees(scoped, "team/app", False)
    assert not sees(scoped, "other/x", False)
    assert sees(scoped, "other/x", True)
    assert not sees(pull_filter(ANONYMOUS), "team/app", False)
    assert sees(pull_filter(ANONYMOUS), "team/app", True)


def test_records_are_private_unless_they_say_public() -> None:
    old = RepoRecord.from_json("lib/old", {"created_at": 1.0, "last_push_at": 1.0})
    assert old.visibility == PRIVATE and not old.public
    odd = RepoRecord.from_json("lib/odd", {"created_at": 1, "last_push_at": 1, "visibility": "x"})
    assert odd.visibility == PRIVATE
    record = RepoRecord("lib/pub", 1.0, 1.0, visibility=PUBLIC)
    again = RepoRecord.from_json("lib/pub", record.to_json())
    assert again.public and again.visibility == PUBLIC


async def test_public_cache_keeps_an_answer_briefly_and_forgets_on_change() -> None:
    now = [100.0]
    public = {"lib/a": False}
    reads: list[str] = []

    async def lookup(name: str) -> bool:
        reads.append(name)
        return public.get(name, False)

    cache = PublicCache(lookup, seconds=1.0, clock=lambda: now[0])
    assert not await cache("lib/a")
    public["lib/a"] = True
    now[0] += 0.5
    assert not await cache("lib/a")  # still the cached answer
    assert reads == ["lib/a"]
    now[0] += 0.6
    assert await cache("lib/a")  # older than a second: read again
    public["lib/a"] = False
    cache.forget("lib/a")  # this instance changed it: no waiting
    assert not await cache("lib/a")
    assert reads == ["lib/a"] * 3
    assert not await cache("no/such")


class Repos:
    """Metadata with only repositories: list_repos over a sorted list, counting its reads."""

    def __init__(self, records: list[RepoRecord]) -> None:
        self.records = sorted(records, key=lambda r: r.name)
        self.reads = 0

    async def list_repos(self, start_after: str | None, limit: int) -> RecordPage[RepoRecord]:
        self.reads += 1
        after = [r for r in self.records if start_after is None or r.name > start_after]
        page = [
            RepoRecord(r.name, 0.0, 0.0, r.description, dict(r.labels), 2, r.visibility)
            for r in (after[:limit] if limit else after)
        ]
        return RecordPage(page, page[-1].name if page else None, 1, len(page) < len(after))

    async def all_repos(self) -> list[RepoRecord]:
        return (await self.list_repos(None, 0)).records


def mixed() -> list[RepoRecord]:
    """Ten repositories: team/0..4 private, other/0..4 with the odd ones public."""
    records = [RepoRecord(f"team/{n}", 0.0, 0.0, f"team {n}") for n in range(5)]
    records += [
        RepoRecord(f"other/{n}", 0.0, 0.0, f"other {n}", visibility=PUBLIC if n % 2 else PRIVATE)
        for n in range(5)
    ]
    return records


async def list_every_page(registry: Registry, size: int, principal: Principal) -> list[list[str]]:
    may_pull = pull_filter(principal)
    pages: list[list[str]] = []
    token = ""
    while True:
        page, token = await registry.list_repositories(size, token, may_pull)
        pages.append([r.name for r in page])
        if not token:
            return pages


@pytest.mark.parametrize("size", [1, 2, 3, 100])
async def test_listing_shows_only_what_the_caller_sees_in_every_page(size: int) -> None:
    registry = Registry(None, Repos(mixed()))  # type: ignore[arg-type]
    public = ["other/1", "other/3"]
    anonymous = await list_every_page(registry, size, ANONYMOUS)
    assert [n for page in anonymous for n in page] == public
    # No empty last page: a "next page" is promised only when a visible repository follows.
    assert all(anonymous)
    scoped = await list_every_page(registry, size, token_user(Role.READER, "team/*"))
    assert [n for page in scoped for n in page] == public + [f"team/{n}" for n in range(5)]
    assert all(scoped)
    everything = await list_every_page(registry, 100, token_user(Role.READER))
    assert len(everything[0]) == 10


async def test_listing_tokens_never_name_a_hidden_repository() -> None:
    records = [RepoRecord(f"a/{n:02}", 0.0, 0.0) for n in range(20)]
    records[5].visibility = PUBLIC
    records[17].visibility = PUBLIC
    meta = Repos(records)
    registry = Registry(None, meta)  # type: ignore[arg-type]
    page, token = await registry.list_repositories(1, "", pull_filter(ANONYMOUS))
    assert [r.name for r in page] == ["a/05"] and "a/05" in decoded(token)
    assert page[0].tag_count == 2  # as the record holds it
    page, token = await registry.list_repositories(1, token, pull_filter(ANONYMOUS))
    assert [r.name for r in page] == ["a/17"] and token == ""
    # Hidden ones behind the last visible one: no token, nothing to hint they exist.
    records[17].visibility = PRIVATE
    page, token = await registry.list_repositories(1, "", pull_filter(ANONYMOUS))
    assert [r.name for r in page] == ["a/05"] and token == ""
    # A caller who sees everything pages as before, reading one page per call.
    meta.reads = 0
    page, token = await registry.list_repositories(5, "", None)
    assert len(page) == 5 and token and meta.reads == 1


async def test_search_shows_only_what_the_caller_sees() -> None:
    registry = Registry(None, Repos(mixed()))  # type: ignore[arg-type]

    async def found(principal: Principal, term: str, size: int = 0) -> list[str]:
        page, token = await registry.search(term, {}, size, "", pull_filter(principal))
        names = [r.name for r in page]
        while token:
            assert all(f'"{n}"' not in decoded(token) for n in ("team/0", "other/0"))
            page, token = await registry.search(term, {}, size, token, pull_filter(principal))
            names += [r.name for r in page]
        return names

    assert await found(ANONYMOUS, "") == ["other/1", "other/3"]
    assert await found(ANONYMOUS, "team") == []
    assert await found(ANONYMOUS, "", size=1) == ["other/1", "other/3"]
    scoped = token_user(Role.DEVELOPER, "team/*")
    assert await found(scoped, "team", size=2) == [f"team/{n}" for n in range(5)]
    assert len(await found(from_certificate("user:admin"), "")) == 10
    with pytest.raises(InvalidArgument):
        await registry.search("x", {}, 1, "not-a-token", pull_filter(ANONYMOUS))


def manifests_store() -> VersionedStore:
    store = VersionedStore()
    for repo in ("a/private", "b/public", "c/private", "d/public"):
        for n in range(3):
            push(store, repo, sha(f"{repo}-{n}"), f"v{n}")
    return store


async def test_manifest_listing_of_every_repository_shows_only_visible_ones() -> None:
    registry = registry_over(manifests_store())

    async def public(name: str) -> bool:
        return name.endswith("/public")

    registry.is_public = PublicCache(public)
    for size in (1, 2, 4, 100):
        token = ""
        shown: list[str] = []
        while True:
            page, token = await registry.list_manifests("", size, token, pull_filter(ANONYMOUS))
            assert page, "no empty page"
            shown += [e.repository for e in page]
            if not token:
                break
            assert "private" not in decoded(token)
        assert shown == ["b/public"] * 3 + ["d/public"] * 3
    scoped = pull_filter(token_user(Role.READER, "c/*"))
    entries, _ = await registry.list_manifests("", 100, "", scoped)
    assert sorted({e.repository for e in entries}) == ["b/public", "c/private", "d/public"]
    everything, _ = await registry.list_manifests("", 100, "", None)
    assert len(everything) == 12


class Links:
    """Metadata holding blob links only, for mounts."""

    def __init__(self, links: dict[str, list[str]]) -> None:
        self.links = links
        self.linked: list[tuple[str, str]] = []

    async def linked_repos(self, digest: str) -> list[str]:
        return self.links.get(digest, [])

    async def is_linked(self, repo: str, digest: str) -> bool:
        return repo in self.links.get(digest, [])

    async def link_blob(self, repo: str, digest: str, size: int) -> None:
        self.linked.append((repo, digest))


class Blobs:
    def stat(self, digest: str) -> BlobStat:
        return BlobStat(digest, 10, 0.0)

    def touch(self, digest: str) -> None:
        pass


async def test_a_mount_without_source_uses_only_repositories_the_caller_sees() -> None:
    secret, shared = sha("secret"), sha("shared")
    meta = Links({secret: ["other/private"], shared: ["other/private", "team/app"]})
    registry = Registry(Blobs(), meta)  # type: ignore[arg-type]

    async def public(name: str) -> bool:
        return False

    registry.is_public = PublicCache(public)
    scoped = pull_filter(token_user(Role.DEVELOPER, "team/*"))
    assert await registry.mount_blob("team/new", secret, "", scoped) is None
    assert await registry.mount_blob("team/new", shared, "", scoped) is not None
    # A caller who may pull everything mounts whatever the registry stores.
    assert await registry.mount_blob("team/new", secret, "", None) is not None
    assert meta.linked == [("team/new", shared), ("team/new", secret)]
    # The named source was authorized by the servicer; the core only checks the link.
    assert await registry.mount_blob("team/new", secret, "other/private", scoped) is not None
