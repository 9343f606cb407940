"""Damaged tag and repository records in etcd (written by hand here, as an older version or an
operator's edit would leave them): readers report the one record (DATA_LOSS with a reason),
listings page on past it, GC runs clean; and ListManifests pages on past a page of damaged
manifest records. A real registry process and real etcd."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.client import RegistryClient
from berth.errors import BerthClientError
from berth.registry.v1 import registry_pb2 as pb

from .conftest import ServiceProcess
from .test_registry import OCI_MANIFEST, age, image, push_bytes, push_image, stub
from .test_registry_disk import put_raw

pytestmark = pytest.mark.integration

# Not JSON, not an object, and an object with fields of the wrong kinds.
DAMAGE = [b"{", b"[1, 2]", b'{"digest": 5, "pushed_at": "yesterday"}']


def test_a_damaged_tag_record_is_reported_alone_and_skipped_in_listings(
    registry: ServiceProcess, etcd_endpoint: str, etcd_prefix: str, tmp_path: Path
) -> None:
    rpc = stub(registry.address)
    with RegistryClient(registry.address) as client:
        digest = push_image(client, "lib/tags", "v0", [b"layer"], tmp_path)
        manifest = client.get_manifest("lib/tags", digest).content
        for n in range(1, 6):
            client.put_manifest("lib/tags", f"v{n}", OCI_MANIFEST, manifest)
        for tag, value in zip(("v1", "v2", "v3"), DAMAGE, strict=True):
            put_raw(etcd_endpoint, etcd_prefix, f"registry/tags/lib/tags@{tag}", value)

        with pytest.raises(BerthClientError) as damaged:
            client.get_manifest("lib/tags", "v2")
        error = damaged.value
        assert (error.code, error.reason) == ("DATA_LOSS", "TAG_RECORD_CORRUPT")
        assert error.metadata == {"repository": "lib/tags", "tag": "v2"}
        assert "tag lib/tags:v2 is damaged" in str(error)
        assert client.get_manifest("lib/tags", "v0").digest == digest

        # Pages of one: the damaged tags are skipped, never a failed or empty-ended listing.
        assert [t.name for t in client.iter_tags("lib/tags", page_size=1)] == ["v0", "v4", "v5"]
        page = rpc.ListTags(pb.ListTagsRequest(repository="lib/tags", page_size=3))
        assert [t.name for t in page.tags] == ["v0", "v4", "v5"]
        assert not page.next_page_token
        [listed] = client.iter_manifests("lib/tags")
        assert sorted(t.name for t in listed.tags) == ["v0", "v4", "v5"]
        assert client.get_repository("lib/tags").tag_count == 6  # every record counts

        report = client.garbage_collect(grace_seconds=3600)
        assert report.deleted == []
        # The way out: delete the damaged tag (its digest is unknown), or push it again.
        assert client.delete_tag("lib/tags", "v1") == ""
        client.put_manifest("lib/tags", "v2", OCI_MANIFEST, manifest)
        assert client.get_manifest("lib/tags", "v2").digest == digest
        # Deleting the manifest deletes every tag naming it, and the damaged one is left.
        deleted = client.delete_manifest("lib/tags", digest)
        assert sorted(deleted.deleted_tags) == ["v0", "v2", "v4", "v5"]


def test_a_damaged_repository_record_is_reported_alone_skipped_and_rewritten_by_a_push(
    registry: ServiceProcess, etcd_endpoint: str, etcd_prefix: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "registry-data"
    names = ["lib/a", "lib/b", "lib/c", "lib/d", "lib/e"]
    rpc = stub(registry.address)
    with RegistryClient(registry.address) as client:
        for name in names:
            push_image(client, name, "v1", [name.encode()], tmp_path)
        orphan = push_bytes(client, "lib/a", b"referenced by nothing", tmp_path)
        age(data_dir, [orphan], 7200)
        damage = [b"", b"null", b'{"created_at": "yesterday", "last_push_at": 1}']
        for name, value in zip(("lib/b", "lib/c", "lib/d"), damage, strict=True):
            put_raw(etcd_endpoint, etcd_prefix, f"registry/repos/{name}", value)

        with pytest.raises(BerthClientError) as damaged:
            client.get_repository("lib/d")
        error = damaged.value
        assert (error.code, error.reason) == ("DATA_LOSS", "REPOSITORY_RECORD_CORRUPT")
        assert error.metadata == {"repository": "lib/d"}
        assert client.get_repository("lib/a").tag_count == 1

        assert [r.name for r in client.iter_repositories(page_size=1)] == ["lib/a", "lib/e"]
        page = rpc.ListRepositories(pb.ListRepositoriesRequest(page_size=2))
        assert [r.name for r in page.repositories] == ["lib/a", "lib/e"]
        assert not page.next_page_token
        assert [r.name for r in client.search("lib")] == ["lib/a", "lib/e"]
        # Its images still read, by tag and by digest.
        assert client.get_manifest("lib/b", "v1").content
        assert [m.repository for m in client.iter_manifests()] == names

        report = client.garbage_collect(grace_seconds=3600)
        assert [b.digest for b in report.deleted] == [orphan]

        # A push (or an update) rewrites the record whole.
        push_image(client, "lib/b", "v2", [b"again"], tmp_path)
        client.update_repository("lib/c", description="fixed")
        assert client.get_repository("lib/b").tag_count == 2
        assert client.get_repository("lib/c").description == "fixed"
        assert [r.name for r in client.iter_repositories()] == ["lib/a", "lib/b", "lib/c", "lib/e"]


def test_list_manifests_pages_on_past_a_page_of_damaged_records(
    registry: ServiceProcess, etcd_endpoint: str, etcd_prefix: str, tmp_path: Path
) -> None:
    """Before: a page whose every record was damaged failed with IndexError (INTERNAL)."""
    rpc = stub(registry.address)
    with RegistryClient(registry.address) as client:
        digests = sorted(
            push_image(client, "lib/m", f"t{n}", [f"layer {n}".encode()], tmp_path)
            for n in range(5)
        )
        for digest in digests[:3]:
            put_raw(etcd_endpoint, etcd_prefix, f"registry/manifests/lib/m@{digest}", b"{")
        # A damaged tag in the span of the page's tags is skipped there too.
        put_raw(etcd_endpoint, etcd_prefix, "registry/tags/lib/m@t0", b"{")

        for repository in ("lib/m", ""):
            page = rpc.ListManifests(pb.ListManifestsRequest(repository=repository, page_size=2))
            assert [m.digest for m in page.manifests] == digests[3:]
            assert not page.next_page_token
            listed = list(client.iter_manifests(repository, page_size=1))
            assert [m.digest for m in listed] == digests[3:]
            assert all(len(m.tags) == 1 for m in listed)

        # A page ending on a damaged record: the next one starts after it.
        for digest in digests[3:]:
            put_raw(etcd_endpoint, etcd_prefix, f"registry/manifests/lib/m@{digest}", b"{")
        manifest, blobs = image([b"last"])
        for blob in blobs:
            push_bytes(client, "lib/n", blob, tmp_path)
        last = client.put_manifest("lib/n", "v1", OCI_MANIFEST, manifest)
        page = rpc.ListManifests(pb.ListManifestsRequest(page_size=5))
        assert [m.digest for m in page.manifests] == [last]
        assert [m.digest for m in client.iter_manifests(page_size=2)] == [last]
