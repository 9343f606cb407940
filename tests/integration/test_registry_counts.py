"""Tag counts kept in the repository record (issue 14): a listing or search reads its page of
repository records and nothing per repository; every tag put and delete changes the count in
the same transaction, so it stays right across tag, retag, untag, manifest deletion, a damaged
tag's deletion and concurrent pushes; a record written before counts existed is counted once
and written back, and GC puts right a count that hand edits made wrong. Real etcd, a real
registry process or the registry's core in this process (to count its etcd reads)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from berth.client import RegistryClient
from berthd.common.store import Store
from berthd.registry.access import MayPull
from berthd.registry.blobstore import BlobStore
from berthd.registry.core import Registry
from berthd.registry.gc import collect
from berthd.registry.metadata import PUBLIC, Metadata, RepoRecord, repo_key

from .conftest import ServiceProcess
from .counting import CountingStore
from .test_registry import OCI_MANIFEST, image, push_image
from .test_registry_disk import put_raw

pytestmark = pytest.mark.integration


async def push(registry: Registry, repository: str, tags: list[str], seed: bytes) -> str:
    """An image pushed through the registry's core (its blobs stored and linked first)."""
    manifest, blobs = image([seed])
    for blob in blobs:
        digest, _ = registry.blobs.put(blob)
        await registry.meta.link_blob(repository, digest, len(blob))
    digest = ""
    for tag in tags:
        digest, _ = await registry.put_manifest(repository, tag, OCI_MANIFEST, manifest)
    return digest


async def test_listing_and_search_read_their_page_not_a_count_per_repository(
    counting: CountingStore, tmp_path: Path
) -> None:
    registry = Registry(BlobStore(tmp_path / "blobs"), Metadata(counting))
    for n in range(25):
        await push(registry, f"lib/r{n:02}", ["v1", "v2", "v3"][: 1 + n % 3], b"layer")
    expected = {f"lib/r{n:02}": 1 + n % 3 for n in range(25)}

    counting.reads = 0
    page, token = await registry.list_repositories(100, "")
    assert {r.name: r.tag_count for r in page} == expected and token == ""
    assert counting.reads == 1  # one range read, not one count per repository

    counting.reads, shown = 0, {}
    token = ""
    for _ in range(3):
        page, token = await registry.list_repositories(10, token)
        shown |= {r.name: r.tag_count for r in page}
    assert shown == expected and token == "" and counting.reads == 3  # one per page

    # A caller who may pull only some repositories: still nothing per repository.
    counting.reads = 0
    page, _ = await registry.list_repositories(100, "", lambda name: name < "lib/r10")
    assert [r.tag_count for r in page] == [expected[r.name] for r in page] and len(page) == 10
    assert counting.reads == 1

    counting.reads = 0
    found, _ = await registry.search("r1", {}, 100, "")
    assert {r.name: r.tag_count for r in found} == {n: c for n, c in expected.items() if "r1" in n}
    assert counting.reads == 1

    counting.reads = 0
    assert (await registry.get_repository("lib/r05")).tag_count == 3
    assert counting.reads == 1


async def list_every_page(
    registry: Registry, size: int, may_pull: MayPull | None = None
) -> tuple[list[str], int]:
    """Every repository a listing shows, page after page, and the number of pages."""
    names, token, pages = [], "", 0
    while True:
        page, token = await registry.list_repositories(size, token, may_pull)
        names += [r.name for r in page]
        pages += 1
        if not token:
            return names, pages


async def test_every_page_of_a_listing_is_one_range_of_its_own_records(
    counting: CountingStore, tmp_path: Path
) -> None:
    """250 repositories listed at several page sizes: one etcd range per page, each record
    read once, nothing per repository, damaged records and a caller's visibility included."""
    registry = Registry(BlobStore(tmp_path / "blobs"), Metadata(counting))
    names = sorted(f"team-{n % 3}/r{n:03}" for n in range(250))
    for n, name in enumerate(names):
        record = RepoRecord(name, 1.0, 2.0, tag_count=n % 4)
        record.visibility = PUBLIC if n % 50 == 0 else record.visibility
        await counting.put_json(repo_key(name), record.to_json())

    for size, pages in ((100, 3), (1000, 1), (7, 36)):
        counting.reads = counting.records = 0
        assert await list_every_page(registry, size) == (names, pages)
        assert (counting.reads, counting.records) == (pages, 250), size

    # Ten damaged records are skipped; a page that held one reads on once to fill up.
    damaged = names[5::25]
    for name in damaged:
        await counting.put(repo_key(name), b"{")
    readable_names = [n for n in names if n not in damaged]
    counting.reads = counting.records = 0
    assert await list_every_page(registry, 100) == (readable_names, 3)
    assert counting.records == 250 and counting.reads <= 3 + len(damaged)

    # A caller who sees team-0 and the public ones: pages of what it sees, each read a
    # batch at a time past what it does not, never a read per repository.
    def may_pull(name: str) -> bool:
        return name.startswith("team-0/")

    visible = [n for n in readable_names if may_pull(n) or names.index(n) % 50 == 0]
    counting.reads = counting.records = 0
    shown, pages = await list_every_page(registry, 20, may_pull)
    assert shown == visible and pages == -(-len(visible) // 20)
    # Each batch is a page and one more (21 records): a record is read at most twice (the
    # next page starts after the last one shown, so it reads again what the batch held past
    # it); a damaged record may make a batch read on once more.
    assert counting.records <= 2 * 250
    assert counting.reads <= 2 * -(-250 // 21) + pages + len(damaged)


async def test_a_record_from_before_counts_is_counted_once_and_written_back(
    counting: CountingStore, tmp_path: Path
) -> None:
    registry = Registry(BlobStore(tmp_path / "blobs"), Metadata(counting))
    for n in range(5):
        await push(registry, f"old/r{n}", ["a", "b"][: 1 + n % 2], b"old")
    # As an older version wrote them: no tag_count.
    for n in range(5):
        entry = await counting.get(repo_key(f"old/r{n}"))
        assert entry is not None
        value = json.loads(entry.value)
        del value["tag_count"]
        await counting.put_json(repo_key(f"old/r{n}"), value)

    page, _ = await registry.list_repositories(100, "")
    assert [r.tag_count for r in page] == [1, 2, 1, 2, 1]
    for n in range(5):
        stored = json.loads((await counting.get(repo_key(f"old/r{n}"))).value)  # type: ignore[union-attr]
        assert stored["tag_count"] == 1 + n % 2
    counting.reads = 0
    page, _ = await registry.list_repositories(100, "")
    assert [r.tag_count for r in page] == [1, 2, 1, 2, 1] and counting.reads == 1

    # A write to a record without a count counts first, then applies its change.
    entry = await counting.get(repo_key("old/r0"))
    value = json.loads(entry.value)  # type: ignore[union-attr]
    del value["tag_count"]
    await counting.put_json(repo_key("old/r0"), value)
    await push(registry, "old/r0", ["c"], b"old")
    assert (await registry.get_repository("old/r0")).tag_count == 2


def stored_count(endpoint: str, prefix: str, repository: str) -> int | None:
    async def read() -> int | None:
        store = Store(endpoint, prefix)
        await store.connect()
        try:
            entry = await store.get(repo_key(repository))
            return json.loads(entry.value).get("tag_count") if entry else None
        finally:
            await store.close()

    return asyncio.run(read())


def test_the_count_stays_right_across_tag_retag_untag_and_deletes(
    registry: ServiceProcess, etcd_endpoint: str, etcd_prefix: str, tmp_path: Path
) -> None:
    repo = "lib/counted"
    with RegistryClient(registry.address) as client:

        def count() -> int:
            shown = client.get_repository(repo).tag_count
            listed = {r.name: r.tag_count for r in client.iter_repositories()}[repo]
            [found] = [r.tag_count for r in client.search("counted") if r.name == repo]
            stored = stored_count(etcd_endpoint, etcd_prefix, repo)
            assert shown == listed == found == stored, (shown, listed, found, stored)
            return shown

        first = push_image(client, repo, "v1", [b"first"], tmp_path)
        assert count() == 1
        manifest_a = client.get_manifest(repo, first).content
        client.put_manifest(repo, "v2", OCI_MANIFEST, manifest_a)  # tag
        assert count() == 2
        client.put_manifest(repo, "v2", OCI_MANIFEST, manifest_a)  # the same tag again
        assert count() == 2
        second = push_image(client, repo, "v1", [b"second"], tmp_path)  # retag
        assert count() == 2
        manifest_b = client.get_manifest(repo, second).content
        client.put_manifest(repo, second, OCI_MANIFEST, manifest_b)  # by digest: no tag
        assert count() == 2
        assert client.delete_tag(repo, "v2") == first  # untag
        assert count() == 1
        for tag in ("v3", "v4", "v5"):
            client.put_manifest(repo, tag, OCI_MANIFEST, manifest_b)
        assert count() == 4
        # A damaged tag still counts (its key exists) and its deletion is counted.
        put_raw(etcd_endpoint, etcd_prefix, f"registry/tags/{repo}@v3", b"{")
        assert count() == 4
        assert client.delete_tag(repo, "v3") == ""
        assert count() == 3
        # Deleting the manifest deletes its tags (v1, v4, v5) and counts them.
        assert sorted(client.delete_manifest(repo, second).deleted_tags) == ["v1", "v4", "v5"]
        assert count() == 0
        client.put_manifest(repo, "again", OCI_MANIFEST, manifest_a)
        assert count() == 1

        # A tag record made by hand (no registry wrote it) is not in the count until GC
        # counts again; its deletion then counts right.
        put_raw(etcd_endpoint, etcd_prefix, f"registry/tags/{repo}@by-hand", b"{")
        assert client.get_repository(repo).tag_count == 1
        client.garbage_collect(grace_seconds=3600)
        assert count() == 2
        assert client.delete_tag(repo, "by-hand") == ""
        assert count() == 1


def test_concurrent_pushes_of_tags_to_one_repository_count_each_tag_once(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    repo = "lib/busy"
    with RegistryClient(registry.address) as client:
        digest = push_image(client, repo, "base", [b"busy"], tmp_path)
        manifest = client.get_manifest(repo, digest).content
        tags = [f"t{n}" for n in range(24)]

        def tag(name: str) -> None:
            client.put_manifest(repo, name, OCI_MANIFEST, manifest)
            client.put_manifest(repo, name, OCI_MANIFEST, manifest)  # again: not a new tag

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(tag, tags))
        assert client.get_repository(repo).tag_count == 25
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: client.delete_tag(repo, name), tags[:12]))
        assert client.get_repository(repo).tag_count == 13


async def test_a_mount_with_no_source_reads_the_blobs_holders_not_every_link(
    counting: CountingStore, tmp_path: Path
) -> None:
    """A caller who may pull only some repositories mounts a blob with no source repository
    (what the client does for every blob it pushes): the registry asks which repositories hold
    that blob, one narrow read, never a scan of every link. A link written before that index
    existed is indexed by GC."""
    registry = Registry(BlobStore(tmp_path / "blobs"), Metadata(counting))
    for n in range(30):
        await push(registry, f"other/r{n:02}", ["v1"], f"layer {n}".encode())
    shared = f"team layer {0}".encode()
    await push(registry, "team/a", ["v1"], shared)
    digest, _ = registry.blobs.put(shared)
    team = lambda name: name.startswith("team/")  # noqa: E731

    counting.reads = counting.records = 0
    assert await registry.mount_blob("team/b", digest, "", team) is not None
    assert counting.records <= 2, counting.records  # the holders of that one blob
    assert await registry.mount_blob("team/c", digest, "", lambda name: False) is None
    private = b"only in other/r00"
    other, _ = registry.blobs.put(private)
    await registry.meta.link_blob("other/r00", other, len(private))
    assert await registry.mount_blob("team/b", other, "", team) is None

    # A link as an older registry wrote it, with no entry in the index: GC indexes it.
    legacy = b"linked by an older registry"
    old, _ = registry.blobs.put(legacy)
    await counting.put_json(f"registry/links/team/old@{old}", {"size": len(legacy)})
    assert await registry.mount_blob("team/b", old, "", team) is None
    await collect(registry.blobs, registry.meta, dry_run=False, grace_seconds=3600)
    assert await registry.mount_blob("team/b", old, "", team) is not None
