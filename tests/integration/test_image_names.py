"""The image catalog's names against a real registry process and etcd: a question about one
image reads that image, not the catalog (no listing of the registry, a few etcd reads however
many images there are), and the in-memory names are never behind a change the registry made
before the question (the registry's names-changed marker)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from berth.client import RegistryClient
from berthd.common.rpc.registry import RegistryApi
from berthd.image.catalog import Catalog

from .conftest import ServiceProcess
from .counting import CountingStore
from .images import push_image, tar_of

pytestmark = pytest.mark.integration

IMAGES = 40


class CountingRegistry(RegistryApi):
    """The real registry client, counting its calls by method."""

    calls: Counter[str]

    async def unary(self, method: str, request: Any, **kw: Any) -> Any:
        self.calls[method] += 1
        return await super().unary(method, request, **kw)


@pytest.fixture
async def catalog(
    counting: CountingStore, registry: ServiceProcess, tmp_path: Path
) -> AsyncIterator[Catalog]:
    api = CountingRegistry(registry.address)
    api.calls = Counter()
    catalog = Catalog(counting, api, tmp_path / "scratch")
    yield catalog
    await catalog.close()


def push_many(client: RegistryClient, tmp: Path, count: int) -> list[str]:
    return [
        push_image(client, f"many/img{n}", "1", [tar_of({f"f{n}": b"x" * n})], tmp)
        for n in range(count)
    ]


async def test_a_point_question_reads_one_image_not_the_catalog(
    catalog: Catalog, counting: CountingStore, client: RegistryClient, tmp_path: Path
) -> None:
    digests = push_many(client, tmp_path, IMAGES)
    registry = catalog.registry
    assert isinstance(registry, CountingRegistry)
    # Warm: the names listed once, the image's content fetched once.
    target = "many/img7:1"
    detail = await catalog.inspect(target)
    assert detail.digest == digests[7]
    for question in (
        lambda: catalog.inspect(target),
        lambda: catalog.history(target),
        lambda: catalog.inspect(detail.id[7:19]),  # an id prefix
        lambda: catalog.inspect(digests[7]),
        lambda: catalog.resolve(f"many/img7@{digests[7]}"),
    ):
        registry.calls.clear()
        counting.reads = counting.records = 0
        await question()
        # No listing of the registry, and content comes from memory.
        assert registry.calls == Counter(), registry.calls
        # The marker, the image's origin records and the node-layer records: not the 40
        # images' tags and manifests.
        assert counting.records <= 3, counting.records
        assert counting.reads <= 5, counting.reads
    registry.calls.clear()
    await catalog.tag(target, "many/img7:again")
    # The manifest put under the new tag: nothing listed.
    assert registry.calls == Counter({"PutManifest": 1}), registry.calls
    assert (await catalog.inspect(target)).repo_tags == ["many/img7:1", "many/img7:again"]


async def test_the_names_hold_every_change_the_registry_made_before_the_question(
    catalog: Catalog, client: RegistryClient, tmp_path: Path
) -> None:
    digest = push_image(client, "fresh/app", "1", [tar_of({"a": b"a"})], tmp_path)
    assert (await catalog.inspect("fresh/app:1")).repo_tags == ["fresh/app:1"]
    # Tags and deletions made straight through the registry (another process) are seen by
    # the very next question, every time: never a view a change behind.
    manifest = client.get_manifest("fresh/app", "1")
    for n in range(10):
        client.put_manifest("fresh/app", f"t{n}", manifest.media_type, manifest.content)
        detail = await catalog.inspect(f"fresh/app:t{n}")
        assert (detail.digest, f"fresh/app:t{n}") == (digest, detail.repo_tags[-1])
        client.delete_tag("fresh/app", f"t{n}")
        assert (await catalog.inspect("fresh/app:1")).repo_tags == ["fresh/app:1"]
    client.delete_manifest("fresh/app", digest)
    assert [row.repository for row in await catalog.list("fresh")] == []
    assert catalog.names.listings == 1


async def test_a_listing_computes_its_rows_once_and_fetches_only_new_images(
    catalog: Catalog, counting: CountingStore, client: RegistryClient, tmp_path: Path
) -> None:
    digests = push_many(client, tmp_path, IMAGES)
    registry = catalog.registry
    assert isinstance(registry, CountingRegistry)

    async def every_page(size: int) -> list[str]:
        shown, token, first = [], "", True
        while first or token:
            rows, token = await catalog.list_page(size=size, token=token)
            shown += [row.digest for row in rows]
            if first:  # the first page reads the names' marker, node layers and containers
                first = False
                counting.reads = counting.records = 0
        return shown

    # The first listing reads the images' manifests and configs in one batch, not a
    # GetManifest and a ReadBlob per image.
    assert sorted(await every_page(IMAGES)) == sorted(digests)
    assert registry.calls == Counter({"BatchGetManifests": 1}), registry.calls
    registry.calls.clear()
    # Later listings, page after page: no registry call for images already known, and a
    # continuation page is served from the rows the first page computed (one point read of
    # the names' marker each), not by reading the node layers and containers again.
    computed = catalog.rows_computed
    shown = await every_page(7)
    assert sorted(shown) == sorted(digests)
    assert registry.calls == Counter(), registry.calls
    assert catalog.rows_computed == computed + 1
    pages = -(-IMAGES // 7)
    assert counting.reads == pages - 1, counting.reads
    assert counting.records == pages - 1, counting.records
    # Images pushed since: only they are read, again in one batch.
    added = [
        push_image(client, f"more/img{n}", "1", [tar_of({"m": bytes([n])})], tmp_path)
        for n in range(3)
    ]
    assert sorted(await every_page(1000)) == sorted(digests + added)
    assert registry.calls == Counter({"BatchGetManifests": 1}), registry.calls
    # A name changed between two pages: the next page is computed anew from the names of
    # now (the kept rows are of an older revision), as before rows were kept.
    first, token = await catalog.list_page(size=10)
    client.delete_tag("many/img0", "1")
    computed = catalog.rows_computed
    rest, token = await catalog.list_page(size=1000, token=token)
    assert catalog.rows_computed == computed + 1 and token == ""
    # many/img0 was on the first page, gone before the second: each image shown once.
    assert first[0].repository == "many/img0"
    assert sorted(row.digest for row in first + rest) == sorted(digests + added)
