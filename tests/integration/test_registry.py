"""The registry service over real gRPC, with real etcd and real processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from berth.client import RegistryClient
from berth.client.registry import GcProgress
from berth.errors import BerthClientError, from_rpc_error
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import registry_pb2_grpc
from berth.tls import secure_channel
from berthd.common.store import Store

from .conftest import wait_until

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stub(address: str) -> registry_pb2_grpc.RegistryServiceStub:
    channel = secure_channel(address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024)])
    return registry_pb2_grpc.RegistryServiceStub(channel)


def push_bytes(client: RegistryClient, repo: str, data: bytes, tmp_path: Path) -> str:
    path = tmp_path / f"blob-{sha(data)[7:19]}"
    path.write_bytes(data)
    client.push_blob(repo, path, sha(data), len(data))
    return sha(data)


def image(layers: list[bytes]) -> tuple[bytes, list[bytes]]:
    """An OCI config and manifest for these layers: (manifest bytes, [config, *layers])."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(layer) for layer in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": sha(layer), "size": len(layer)}
                for layer in layers
            ],
        }
    ).encode()
    return manifest, [config, *layers]


def push_image(client: RegistryClient, repo: str, tag: str, layers: list[bytes], tmp: Path) -> str:
    manifest, blobs = image(layers)
    for blob in blobs:
        push_bytes(client, repo, blob, tmp)
    return client.put_manifest(repo, tag, OCI_MANIFEST, manifest)


def metric_value(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported once"
    return values[0]


def blob_files(data_dir: Path) -> dict[str, int]:
    return {
        f"sha256:{p.name}": p.stat().st_size for p in (data_dir / "blobs" / "sha256").glob("*/*")
    }


def test_multi_layer_image_round_trip(client: RegistryClient, tmp_path: Path) -> None:
    layers = [os.urandom(3 * 1024 * 1024 + 17), os.urandom(100), b"", os.urandom(1024 * 1024)]
    digest = push_image(client, "library/app", "1.0", layers, tmp_path)

    got = client.get_manifest("library/app", "1.0")
    assert got.digest == digest
    assert got.media_type == OCI_MANIFEST
    assert client.get_manifest("library/app", digest).content == got.content
    for layer in json.loads(got.content)["layers"]:
        out = tmp_path / "out" / layer["digest"]
        out.parent.mkdir(exist_ok=True)
        client.pull_blob("library/app", layer["digest"], out)
        assert sha(out.read_bytes()) == layer["digest"]
    assert [t.name for t in client.iter_tags("library/app")] == ["1.0"]


def test_interrupted_upload_resumes_from_committed_offset(registry, tmp_path: Path) -> None:
    s = stub(registry.address)
    data = os.urandom(5 * 1024 * 1024)
    upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/resume")).upload_id

    sent = 3 * 1024 * 1024

    def broken_stream():
        for offset in range(0, sent, 1024 * 1024):
            yield pb.WriteUploadRequest(
                upload_id=upload_id, offset=offset, data=data[offset : offset + 1024 * 1024]
            )
        # Let the server store what was sent, then drop the connection mid-upload.
        watcher = stub(registry.address)
        deadline = time.monotonic() + 10
        while watcher.GetUpload(pb.GetUploadRequest(upload_id=upload_id)).offset < sent:
            assert time.monotonic() < deadline, "server never stored the first chunks"
            time.sleep(0.01)
        raise ConnectionError("cable pulled")

    with pytest.raises(grpc.RpcError):
        s.WriteUpload(broken_stream())
    offset = s.GetUpload(pb.GetUploadRequest(upload_id=upload_id)).offset
    assert offset == sent

    with pytest.raises(grpc.RpcError) as wrong:
        s.WriteUpload(iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=b"x")]))
    assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"resume from offset {offset}" in wrong.value.details()
    # The client's error says where to resume, for programs.
    error = from_rpc_error(wrong.value, address=registry.address, service="registry")
    assert isinstance(error, BerthClientError)
    assert error.reason == "UPLOAD_OFFSET_MISMATCH"
    assert error.metadata == {
        "upload_id": upload_id,
        "offset": str(offset),
        "requested_offset": "0",
    }
    assert error.details.resource_type == "upload"

    rest = [
        pb.WriteUploadRequest(upload_id=upload_id, offset=o, data=data[o : o + 1024 * 1024])
        for o in range(offset, len(data), 1024 * 1024)
    ]
    assert s.WriteUpload(iter(rest)).offset == len(data)
    reply = s.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(data)))
    assert reply.descriptor.size == len(data)
    read = b"".join(
        c.data for c in s.ReadBlob(pb.ReadBlobRequest(repository="lib/resume", digest=sha(data)))
    )
    assert read == data


def test_clients_that_hang_up_mid_stream_do_not_hurt_the_server(registry) -> None:
    s = stub(registry.address)
    data = os.urandom(8 * 1024 * 1024)
    upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/hangup")).upload_id
    chunks = [
        pb.WriteUploadRequest(upload_id=upload_id, offset=o, data=data[o : o + (1 << 20)])
        for o in range(0, len(data), 1 << 20)
    ]
    s.WriteUpload(iter(chunks))
    s.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(data)))
    for n in range(10):
        with secure_channel(registry.address) as channel:
            call = registry_pb2_grpc.RegistryServiceStub(channel).ReadBlob(
                pb.ReadBlobRequest(repository="lib/hangup", digest=sha(data))
            )
            next(call)
            if n % 2:
                time.sleep(0.05)
            call.cancel()
    read = s.ReadBlob(pb.ReadBlobRequest(repository="lib/hangup", digest=sha(data)))
    assert b"".join(c.data for c in read) == data
    assert registry.proc.poll() is None


def test_ranged_read_resumes_a_download(registry) -> None:
    s = stub(registry.address)
    data = os.urandom(2 * 1024 * 1024 + 5)
    upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/range")).upload_id
    s.WriteUpload(iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=data)]))
    s.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(data)))
    chunks = list(
        s.ReadBlob(
            pb.ReadBlobRequest(
                repository="lib/range", digest=sha(data), offset=1024 * 1024 - 3, length=1024 * 1024
            )
        )
    )
    assert chunks[0].offset == 1024 * 1024 - 3 and chunks[0].total_size == len(data)
    assert b"".join(c.data for c in chunks) == data[1024 * 1024 - 3 : 2 * 1024 * 1024 - 3]


def test_wrong_digest_is_rejected_and_nothing_is_visible(registry, tmp_path: Path) -> None:
    s = stub(registry.address)
    data = b"the real bytes"
    upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/bad")).upload_id
    s.WriteUpload(iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=data)]))
    with pytest.raises(grpc.RpcError) as err:
        s.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(b"claimed")))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert sha(data) in err.value.details()
    error = from_rpc_error(err.value, address=registry.address)
    assert error.reason == "DIGEST_MISMATCH"
    assert error.metadata == {
        "expected": sha(b"claimed"),
        "actual": sha(data),
        "size": str(len(data)),
    }
    for digest in (sha(data), sha(b"claimed")):
        with pytest.raises(grpc.RpcError) as missing:
            s.StatBlob(pb.StatBlobRequest(repository="lib/bad", digest=digest))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert blob_files(tmp_path / "registry-data") == {}
    # The discarded session is gone.
    with pytest.raises(grpc.RpcError) as gone:
        s.GetUpload(pb.GetUploadRequest(upload_id=upload_id))
    assert from_rpc_error(gone.value, address=registry.address).reason == "UPLOAD_UNKNOWN"


def test_a_client_sees_digest_mismatch_and_unknown_blob_reasons(
    client: RegistryClient, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"what was sent")
    with pytest.raises(BerthClientError) as mismatch:
        client.push_blob("lib/reasons", path, sha(b"what was claimed"), len(b"what was sent"))
    assert mismatch.value.code == "DATA_LOSS"
    assert mismatch.value.reason == "DIGEST_MISMATCH"
    assert mismatch.value.metadata["expected"] == sha(b"what was claimed")
    assert mismatch.value.metadata["actual"] == sha(b"what was sent")

    unknown = sha(b"never pushed")
    with pytest.raises(BerthClientError) as missing:
        client.pull_blob("lib/reasons", unknown, tmp_path / "out")
    assert missing.value.code == "NOT_FOUND"
    assert missing.value.reason == "BLOB_UNKNOWN"
    assert missing.value.metadata == {"digest": unknown, "repository": "lib/reasons"}
    assert (missing.value.details.resource_type, missing.value.details.resource_name) == (
        "blob",
        unknown,
    )


def test_start_upload_with_a_request_id_opens_one_session(registry, tmp_path: Path) -> None:
    s = stub(registry.address)
    first = s.StartUpload(pb.StartUploadRequest(repository="lib/once", request_id="req-1"))
    again = s.StartUpload(pb.StartUploadRequest(repository="lib/once", request_id="req-1"))
    other = s.StartUpload(pb.StartUploadRequest(repository="lib/once", request_id="req-2"))
    plain = s.StartUpload(pb.StartUploadRequest(repository="lib/once"))
    assert first.upload_id == again.upload_id
    assert len({first.upload_id, other.upload_id, plain.upload_id}) == 3
    assert len(list((tmp_path / "registry-data" / "uploads").iterdir())) == 3
    with pytest.raises(grpc.RpcError) as bad:
        s.StartUpload(pb.StartUploadRequest(repository="lib/once", request_id="a/b"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_same_blob_pushed_concurrently_is_stored_once(registry, tmp_path: Path) -> None:
    data = os.urandom(4 * 1024 * 1024 + 3)
    errors: list[BaseException] = []

    def push(n: int) -> None:
        try:
            s = stub(registry.address)
            upload_id = s.StartUpload(pb.StartUploadRequest(repository=f"lib/c{n}")).upload_id
            chunks = [
                pb.WriteUploadRequest(upload_id=upload_id, offset=o, data=data[o : o + (1 << 20)])
                for o in range(0, len(data), 1 << 20)
            ]
            s.WriteUpload(iter(chunks))
            s.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(data)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    files = blob_files(tmp_path / "registry-data")
    assert files == {sha(data): len(data)}
    path = tmp_path / "registry-data" / "blobs" / "sha256" / sha(data)[7:9] / sha(data)[7:]
    assert sha(path.read_bytes()) == sha(data)
    assert list((tmp_path / "registry-data" / "uploads").iterdir()) == []
    # Every repository that pushed it now holds it.
    s = stub(registry.address)
    for n in range(6):
        s.StatBlob(pb.StatBlobRequest(repository=f"lib/c{n}", digest=sha(data)))


def test_existing_blob_transfers_zero_bytes(client: RegistryClient, registry, tmp_path) -> None:
    data = os.urandom(1024 * 1024)
    push_bytes(client, "lib/one", data, tmp_path)
    path = tmp_path / "again"
    path.write_bytes(data)
    assert client.push_blob("lib/one", path, sha(data), len(data)).outcome == "exists"
    assert client.push_blob("lib/two", path, sha(data), len(data)).outcome == "mounted"
    metrics = urllib.request.urlopen(registry.metrics).read().decode()
    assert metric_value(metrics, "berth_registry_received_bytes_total") == len(data)


def test_manifest_with_missing_blob_is_refused(client: RegistryClient, tmp_path: Path) -> None:
    layers = [b"present layer", b"missing layer"]
    manifest, blobs = image(layers)
    push_bytes(client, "lib/partial", blobs[0], tmp_path)
    push_bytes(client, "lib/partial", blobs[1], tmp_path)
    with pytest.raises(BerthClientError) as err:
        client.put_manifest("lib/partial", "v1", OCI_MANIFEST, manifest)
    assert err.value.code == "FAILED_PRECONDITION"
    assert sha(b"missing layer") in str(err.value)
    assert err.value.reason == "MANIFEST_BLOB_UNKNOWN"
    assert err.value.metadata["digest"] == sha(b"missing layer")
    assert err.value.metadata["digests"] == sha(b"missing layer")
    [violation] = err.value.details.violations
    assert (violation.type, violation.subject) == ("BLOB_UNKNOWN", f"blob/{sha(b'missing layer')}")
    # A blob in another repository is not enough: it must be pushed or mounted here.
    push_bytes(client, "lib/elsewhere", b"missing layer", tmp_path)
    with pytest.raises(BerthClientError):
        client.put_manifest("lib/partial", "v1", OCI_MANIFEST, manifest)
    assert client.mount_blob("lib/partial", sha(b"missing layer"), "lib/elsewhere")
    client.put_manifest("lib/partial", "v1", OCI_MANIFEST, manifest)


def test_index_needs_its_manifests_first(client: RegistryClient, tmp_path: Path) -> None:
    child = push_image(client, "lib/multi", "amd64", [b"amd64 layer"], tmp_path)
    size = len(client.get_manifest("lib/multi", child).content)
    missing = "sha256:" + "ab" * 32
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": child, "size": size},
                {"mediaType": OCI_MANIFEST, "digest": missing, "size": 10},
            ],
        }
    ).encode()
    with pytest.raises(BerthClientError, match=missing):
        client.put_manifest("lib/multi", "latest", OCI_INDEX, index)
    fixed = json.loads(index)
    fixed["manifests"].pop()
    content = json.dumps(fixed).encode()
    assert client.put_manifest("lib/multi", "latest", OCI_INDEX, content) == sha(content)


@pytest.mark.parametrize(
    ("repo", "reference", "fragment"),
    [
        ("Library/App", "v1", "lowercase"),
        ("lib//app", "v1", "repository"),
        ("lib/app-", "v1", "repository"),
        ("-lib", "v1", "repository"),
        ("a" * 256, "v1", "255"),
        ("lib/app", "-bad", "tag"),
        ("lib/app", "x" * 129, "tag"),
        ("lib/app", "sha256:1234", "digest"),
        ("lib/app", "v1:2", "tag"),
    ],
)
def test_invalid_names_and_tags_are_rejected(client: RegistryClient, repo, reference, fragment):
    manifest, _ = image([b"x"])
    with pytest.raises(BerthClientError) as err:
        client.put_manifest(repo, reference, OCI_MANIFEST, manifest)
    assert err.value.code == "INVALID_ARGUMENT"
    assert fragment in str(err.value).lower()


def test_malformed_manifests_are_rejected(client: RegistryClient) -> None:
    for content, fragment in [
        (b"not json", "json"),
        (b'{"schemaVersion": 1, "name": "x"}', "schema 1"),
        (b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'"}', "config"),
    ]:
        with pytest.raises(BerthClientError) as err:
            client.put_manifest("lib/bad", "v1", OCI_MANIFEST, content)
        assert err.value.code == "INVALID_ARGUMENT", content
        assert fragment in str(err.value).lower()


def test_oversized_chunk_is_refused(registry) -> None:
    s = stub(registry.address)
    upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/big")).upload_id
    with pytest.raises(grpc.RpcError) as err:
        s.WriteUpload(
            iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=b"x" * (5 << 20))])
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_ids_are_not_found(registry) -> None:
    s = stub(registry.address)
    for call, request in [
        (s.GetUpload, pb.GetUploadRequest(upload_id="0" * 32)),
        (s.CommitUpload, pb.CommitUploadRequest(upload_id="0" * 32, digest=sha(b""))),
        (s.GetManifest, pb.GetManifestRequest(repository="no/such", reference="latest")),
        (s.GetRepository, pb.GetRepositoryRequest(repository="no/such")),
        (s.DeleteTag, pb.DeleteTagRequest(repository="no/such", tag="v1")),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, call


def test_tags_pagination_and_delete(client: RegistryClient, registry, tmp_path: Path) -> None:
    digest = push_image(client, "lib/tags", "v0", [b"layer"], tmp_path)
    manifest = client.get_manifest("lib/tags", digest).content
    for n in range(1, 7):
        client.put_manifest("lib/tags", f"v{n}", OCI_MANIFEST, manifest)
    s = stub(registry.address)
    page = s.ListTags(pb.ListTagsRequest(repository="lib/tags", page_size=4))
    assert [t.name for t in page.tags] == ["v0", "v1", "v2", "v3"] and page.next_page_token
    page2 = s.ListTags(
        pb.ListTagsRequest(repository="lib/tags", page_size=4, page_token=page.next_page_token)
    )
    assert [t.name for t in page2.tags] == ["v4", "v5", "v6"] and not page2.next_page_token
    assert client.delete_tag("lib/tags", "v3") == digest
    assert "v3" not in [t.name for t in client.iter_tags("lib/tags")]
    assert client.get_manifest("lib/tags", digest).digest == digest
    deleted = s.DeleteManifest(pb.DeleteManifestRequest(repository="lib/tags", reference="v0"))
    assert sorted(deleted.deleted_tags) == ["v0", "v1", "v2", "v4", "v5", "v6"]
    assert list(client.iter_tags("lib/tags")) == []


def test_nested_repositories_do_not_see_each_others_tags(client, tmp_path: Path) -> None:
    push_image(client, "a", "one", [b"l1"], tmp_path)
    push_image(client, "a/b", "two", [b"l2"], tmp_path)
    assert [t.name for t in client.iter_tags("a")] == ["one"]
    assert [t.name for t in client.iter_tags("a/b")] == ["two"]
    assert {r.name: r.tag_count for r in client.iter_repositories()} == {"a": 1, "a/b": 1}


def test_list_manifests_across_repositories(client: RegistryClient, registry, tmp_path) -> None:
    # One image in two repositories (same manifest digest), each tagged; an extra untagged
    # image in the first, and an index over the shared manifest in the second.
    layers = [b"shared base", b"shared top"]
    shared = push_image(client, "lib/one", "v1", layers, tmp_path)
    assert push_image(client, "lib/two", "stable", layers, tmp_path) == shared
    client.put_manifest("lib/two", "also", OCI_MANIFEST, image(layers)[0])
    solo_manifest, solo_blobs = image([b"solo layer"])
    for blob in solo_blobs:
        push_bytes(client, "lib/one", blob, tmp_path)
    solo = client.put_manifest("lib/one", sha(solo_manifest), OCI_MANIFEST, solo_manifest)
    size = len(image(layers)[0])
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": shared, "size": size}],
        }
    ).encode()
    multi = client.put_manifest("lib/two", "multi", OCI_INDEX, index)

    entries = list(client.iter_manifests())
    expected = sorted(
        [("lib/one", shared), ("lib/one", solo), ("lib/two", shared), ("lib/two", multi)],
        key=lambda e: f"{e[0]}@{e[1]}",
    )
    assert [(e.repository, e.digest) for e in entries] == expected
    by_key = {(e.repository, e.digest): e for e in entries}
    manifest, blobs = image(layers)
    one = by_key["lib/one", shared]
    assert one.references == [sha(b) for b in blobs]  # config first, then the layers
    assert (one.media_type, one.size) == (OCI_MANIFEST, len(manifest))
    assert [t.name for t in one.tags] == ["v1"] and one.tags[0].digest == shared
    assert one.pushed_at is not None and one.tags[0].pushed_at is not None
    assert [t.name for t in by_key["lib/two", shared].tags] == ["also", "stable"]
    assert by_key["lib/one", solo].tags == []
    assert by_key["lib/two", multi].references == [shared]
    assert by_key["lib/two", multi].media_type == OCI_INDEX

    # Pages of one entry return the same listing, and every page but the last has a token.
    assert list(client.iter_manifests(page_size=1)) == entries
    s = stub(registry.address)
    first = s.ListManifests(pb.ListManifestsRequest(page_size=3))
    assert len(first.manifests) == 3 and first.next_page_token
    # A tag moved after the first page does not show in the rest of that listing.
    client.put_manifest("lib/two", "stable", OCI_INDEX, index)
    rest = s.ListManifests(pb.ListManifestsRequest(page_size=3, page_token=first.next_page_token))
    assert not rest.next_page_token
    pages = [*first.manifests, *rest.manifests]
    assert [(m.repository, m.digest) for m in pages] == expected
    tags = {(m.repository, m.digest): [t.name for t in m.tags] for m in pages}
    assert tags["lib/two", shared] == ["also", "stable"] and tags["lib/two", multi] == ["multi"]
    fresh = {(e.repository, e.digest): [t.name for t in e.tags] for e in client.iter_manifests()}
    assert fresh["lib/two", shared] == ["also"] and fresh["lib/two", multi] == ["multi", "stable"]

    only_two = list(client.iter_manifests("lib/two", page_size=1))
    assert [(e.repository, e.digest) for e in only_two] == [
        e for e in expected if e[0] == "lib/two"
    ]
    assert [e.repository for e in client.iter_manifests("lib/one")] == ["lib/one", "lib/one"]

    two_first = s.ListManifests(pb.ListManifestsRequest(repository="lib/two", page_size=1))
    for request in [
        pb.ListManifestsRequest(page_token="not a token"),
        pb.ListManifestsRequest(page_token=first.next_page_token[:-4]),
        # A token of a lib/two listing does not continue a lib/one listing.
        pb.ListManifestsRequest(repository="lib/one", page_token=two_first.next_page_token),
        pb.ListManifestsRequest(page_size=-1),
        pb.ListManifestsRequest(repository="Bad/Name"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            s.ListManifests(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    with pytest.raises(BerthClientError) as missing:
        list(client.iter_manifests("no/such"))
    assert missing.value.code == "NOT_FOUND"


def test_repositories_pagination_and_search(client: RegistryClient, registry, tmp_path) -> None:
    names = ["tools/busybox", "tools/alpine", "web/nginx", "web/busy-cache", "db/redis"]
    for name in names:
        push_image(client, name, "latest", [name.encode()], tmp_path)
    s = stub(registry.address)
    seen, token = [], ""
    while True:
        page = s.ListRepositories(pb.ListRepositoriesRequest(page_size=2, page_token=token))
        assert len(page.repositories) <= 2
        seen += [r.name for r in page.repositories]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(names)
    assert [r.name for r in client.iter_repositories(page_size=3)] == sorted(names)

    client.update_repository("db/redis", description="In-memory store, busy all day")
    client.update_repository("tools/alpine", labels={"team": "busybees"})
    results = client.search("busy")
    assert [r.name for r in results] == [
        "tools/busybox",
        "web/busy-cache",
        "db/redis",
        "tools/alpine",
    ]
    assert results[0].tag_count == 1 and results[0].last_push_at is not None
    assert [r.name for r in client.search("", labels={"team": "busybees"})] == ["tools/alpine"]
    assert [r.name for r in client.search("busy", limit=3)] == [
        "tools/busybox",
        "web/busy-cache",
        "db/redis",
    ]
    # Search pages like every listing; a token belongs to its term and labels.
    paged, token = [], ""
    while True:
        page = s.Search(pb.SearchRequest(term="busy", page_size=1, page_token=token))
        assert len(page.results) <= 1
        paged += [r.name for r in page.results]
        token = page.next_page_token
        if not token:
            break
    assert paged == [r.name for r in results]
    first = s.Search(pb.SearchRequest(term="busy", page_size=1))
    with pytest.raises(grpc.RpcError) as err:
        s.Search(pb.SearchRequest(term="redis", page_size=1, page_token=first.next_page_token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(err.value, address=registry.address)
    assert error.reason == "INVALID_PAGE_TOKEN"
    assert error.details.field_violations[0][0] == "page_token"


def test_two_replicas_share_one_blob_dir_and_etcd(services, tmp_path: Path) -> None:
    shared = tmp_path / "shared-data"
    first, second = services.registry(shared), services.registry(shared)
    with RegistryClient(first.address) as a, RegistryClient(second.address) as b:
        digest = push_image(a, "lib/replicated", "v1", [os.urandom(70_000)], tmp_path)
        assert b.get_manifest("lib/replicated", "v1").digest == digest
        assert [t.name for t in b.iter_tags("lib/replicated")] == ["v1"]
        b.delete_tag("lib/replicated", "v1")
        assert list(a.iter_tags("lib/replicated")) == []
    # An upload started on one replica is resumed and committed on the other.
    data = os.urandom(300_000)
    sa, sb = stub(first.address), stub(second.address)
    upload_id = sa.StartUpload(pb.StartUploadRequest(repository="lib/replicated")).upload_id
    sa.WriteUpload(iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=data[:1000])]))
    assert sb.GetUpload(pb.GetUploadRequest(upload_id=upload_id)).offset == 1000
    sb.WriteUpload(
        iter([pb.WriteUploadRequest(upload_id=upload_id, offset=1000, data=data[1000:])])
    )
    sb.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(data)))
    sa.StatBlob(pb.StatBlobRequest(repository="lib/replicated", digest=sha(data)))


def age(data_dir: Path, digests: list[str], seconds: float) -> None:
    for digest in digests:
        path = data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        old = time.time() - seconds
        os.utime(path, (old, old))


def test_gc_frees_orphans_and_keeps_shared_and_young_blobs(client, tmp_path: Path) -> None:
    data_dir = tmp_path / "registry-data"
    shared, only_old, only_kept = b"shared layer", b"layer of deleted image", b"kept layer"
    old_image = push_image(client, "lib/old", "v1", [shared, only_old], tmp_path)
    push_image(client, "lib/kept", "v1", [shared, only_kept], tmp_path)
    orphan = push_bytes(client, "lib/old", b"never referenced", tmp_path)
    young_orphan = push_bytes(client, "lib/old", b"just uploaded", tmp_path)
    old_config = image([shared, only_old])[1][0]
    client.delete_manifest("lib/old", "v1")
    everything = list(blob_files(data_dir))
    age(data_dir, [d for d in everything if d != young_orphan], 7200)

    stages: list[GcProgress] = []
    dry = client.garbage_collect(dry_run=True, grace_seconds=3600, progress=stages.append)
    expected = {old_image, sha(old_config), sha(only_old), orphan}
    assert {b.digest for b in dry.deleted} == expected
    assert set(blob_files(data_dir)) == set(everything)
    # Progress of both stages streams before the result: manifests marked, blobs swept.
    assert [(p.stage, p.done) for p in stages] == [
        ("mark", False),
        ("mark", True),
        ("sweep", False),
        ("sweep", True),
    ]
    assert stages[1].current == 1  # lib/kept's manifest
    assert stages[-1].current == stages[-1].total == len(everything)

    report = client.garbage_collect(grace_seconds=3600)
    assert {b.digest for b in report.deleted} == expected
    with pytest.raises(BerthClientError) as negative:
        client.garbage_collect(grace_seconds=-1)
    assert negative.value.code == "INVALID_ARGUMENT"
    assert negative.value.details.field_violations[0][0] == "min_age"
    assert report.reclaimed_bytes == sum(b.size for b in report.deleted)
    assert report.blobs_young == 1
    remaining = set(blob_files(data_dir))
    assert remaining == set(everything) - expected
    assert {sha(shared), sha(only_kept), young_orphan} <= remaining
    assert client.stat_blob("lib/old", orphan) is None
    kept = client.get_manifest("lib/kept", "v1")
    for layer in json.loads(kept.content)["layers"]:
        assert client.stat_blob("lib/kept", layer["digest"]) is not None


def test_gc_with_no_grace_period_keeps_nothing_for_its_age(registry, client, tmp_path) -> None:
    """Before: a grace period of 0 was read as "unset" and became the 1 h default."""
    data_dir = tmp_path / "registry-data"
    kept = push_image(client, "lib/zero", "v1", [b"referenced"], tmp_path)
    fresh = push_bytes(client, "lib/zero", b"uploaded a moment ago", tmp_path)
    # Unset, and an explicit 0 in grace_period (what clients written before min_age send
    # for "the default"), both mean the server default: the fresh blob is young.
    assert client.garbage_collect().blobs_young == 1
    zero = duration_pb2.Duration(seconds=0)
    request = pb.GarbageCollectRequest(grace_period=zero)
    [*_, last] = stub(registry.address).GarbageCollect(request)
    assert (last.result.blobs_young, list(last.result.deleted)) == (1, [])

    report = client.garbage_collect(grace_seconds=0)
    assert [b.digest for b in report.deleted] == [fresh]
    assert report.blobs_young == 0
    assert fresh not in blob_files(data_dir)
    assert client.get_manifest("lib/zero", "v1").digest == kept


def test_gc_keeps_blobs_a_stat_a_mount_or_a_manifest_push_refreshed(client, tmp_path) -> None:
    """docs/registry.md: stats, mounts and manifest pushes refresh a blob's age, so a blob a
    client was just told about is not swept under it; an old blob nobody touched is."""
    data_dir = tmp_path / "registry-data"
    stated = push_bytes(client, "lib/src", b"stated", tmp_path)
    mounted = push_bytes(client, "lib/src", b"mounted", tmp_path)
    untouched = push_bytes(client, "lib/src", b"untouched", tmp_path)
    manifest, parts = image([b"layer of a pushed then deleted manifest"])
    for part in parts:
        push_bytes(client, "lib/src", part, tmp_path)
    age(data_dir, list(blob_files(data_dir)), 7200)  # all older than the grace period

    assert client.stat_blob("lib/src", stated) is not None
    assert client.mount_blob("lib/dst", mounted, "lib/src")
    client.put_manifest("lib/src", "v1", OCI_MANIFEST, manifest)
    client.delete_manifest("lib/src", "v1")  # its blobs are unreferenced again, but young

    report = client.garbage_collect(grace_seconds=3600)
    assert [b.digest for b in report.deleted] == [untouched]
    assert set(blob_files(data_dir)) >= {stated, mounted, *(sha(p) for p in parts)}


def test_gc_removes_upload_sessions_idle_for_a_day(registry, client, tmp_path) -> None:
    """docs/registry.md: upload sessions untouched for 24 h are removed by GC; younger ones,
    however old their start, stay and resume."""
    s = stub(registry.address)
    sessions = {}
    for name in ("idle", "almost", "fresh"):
        upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/up")).upload_id
        chunk = pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=b"0123456789")
        s.WriteUpload(iter([chunk]))
        sessions[name] = upload_id
    uploads = tmp_path / "registry-data" / "uploads"
    for name, idle_hours in (("idle", 24.5), ("almost", 23.5)):
        old = time.time() - idle_hours * 3600
        os.utime(uploads / sessions[name] / "data", (old, old))

    assert client.garbage_collect(dry_run=True).uploads_removed == 0
    assert client.garbage_collect().uploads_removed == 1
    with pytest.raises(grpc.RpcError) as gone:
        s.GetUpload(pb.GetUploadRequest(upload_id=sessions["idle"]))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (uploads / sessions["idle"]).exists()
    for name in ("almost", "fresh"):
        assert s.GetUpload(pb.GetUploadRequest(upload_id=sessions[name])).offset == 10


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_the_client_refuses_a_blob_corrupted_on_the_registrys_disk(
    client: RegistryClient, tmp_path: Path, damage: str
) -> None:
    """The registry serves what its disk holds; the client checks the digest on pull and
    refuses bytes that do not match it with DATA_LOSS, leaving no file behind."""
    data = os.urandom(300_000)
    digest = push_bytes(client, "lib/rot", data, tmp_path)
    on_disk = tmp_path / "registry-data" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    rotten = bytearray(data)
    rotten[150_000] ^= 0xFF
    on_disk.write_bytes(bytes(rotten) if damage == "flipped byte" else data[:200_000])
    dest = tmp_path / "pulled"
    with pytest.raises(BerthClientError) as refused:
        client.pull_blob("lib/rot", digest, dest)
    assert refused.value.code == "DATA_LOSS"
    assert digest in str(refused.value)
    assert sorted(p.name for p in tmp_path.glob("pulled*")) == []


def test_health_reflection_and_metrics(registry, client: RegistryClient, tmp_path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = secure_channel(registry.address)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "berth.registry.v1.RegistryService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {s.name for r in replies for s in r.list_services_response.service}
    assert "berth.registry.v1.RegistryService" in services

    push_bytes(client, "lib/m", b"abc", tmp_path)
    assert client.stat_blob("lib/m", sha(b"nope")) is None
    metrics = urllib.request.urlopen(registry.metrics).read().decode()
    assert (
        'berth_grpc_requests_total{code="OK",method="CommitUpload",service="registry"} 1.0'
        in metrics
    )
    assert 'code="NOT_FOUND",method="StatBlob"' in metrics
    assert 'berth_grpc_request_duration_seconds_count{method="CommitUpload"' in metrics
    assert "berth_grpc_requests_in_flight" in metrics
    assert metric_value(metrics, "berth_registry_received_bytes_total") == 3


async def test_endpoint_is_registered_and_removed_on_sigterm(
    services, etcd_endpoint: str, etcd_prefix: str
) -> None:
    store = Store(etcd_endpoint, etcd_prefix)
    await store.connect()
    try:
        process = services.registry()
        entries = await store.list("endpoints/registry/")
        assert [e.json()["address"] for e in entries] == [process.address]
        assert entries[0].lease != 0
        assert process.stop() == 0
        assert await store.list("endpoints/registry/") == []
    finally:
        await store.close()


def test_sigterm_reports_not_serving_and_lets_in_flight_calls_finish(
    services, tmp_path: Path
) -> None:
    """docs/operations.md: on SIGTERM a service reports NOT_SERVING (a health watcher hears
    it), then in-flight calls finish and it exits 0."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process = services.registry()
    data = os.urandom(8 * 1024 * 1024)
    with RegistryClient(process.address) as c:
        push_bytes(c, "lib/drain", data, tmp_path)
    channel = secure_channel(process.address)
    s = registry_pb2_grpc.RegistryServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="berth.registry.v1.RegistryService"), timeout=60
    )
    assert next(health).status == health_pb2.HealthCheckResponse.SERVING
    stream = s.ReadBlob(pb.ReadBlobRequest(repository="lib/drain", digest=sha(data)))
    received = [next(stream).data]
    process.proc.send_signal(signal.SIGTERM)
    assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
    health.cancel()
    received += [chunk.data for chunk in stream]
    assert b"".join(received) == data
    assert process.proc.wait(15) == 0


def test_the_log_line_of_a_call_carries_its_x_request_id(registry) -> None:
    """docs/operations.md: each RPC's log line has `request_id`, from `x-request-id` if given."""
    s = stub(registry.address)
    missing = pb.StatBlobRequest(repository="lib/logged", digest=sha(b"absent"))
    with pytest.raises(grpc.RpcError):
        s.StatBlob(missing, metadata=(("x-request-id", "req-7f3a"),))
    s.ListRepositories(pb.ListRepositoriesRequest())  # no id given: one is made up

    def calls() -> list[dict]:
        text = registry.log.read_text()
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return [line for line in lines if str(line.get("method", "")).endswith("ListRepositories")
                or line.get("request_id") == "req-7f3a"]  # fmt: skip

    wait_until(lambda: len(calls()) == 2, 30, "both calls logged")
    tagged, other = calls()
    assert tagged["request_id"] == "req-7f3a"
    assert tagged["method"].endswith("StatBlob") and tagged["code"] == "NOT_FOUND"
    assert other["request_id"] and other["request_id"] != "req-7f3a"


def test_a_client_resumes_from_the_offset_a_mismatch_reports(
    client: RegistryClient, registry
) -> None:
    """A write whose answer was lost leaves the session ahead of the client: the registry's
    UPLOAD_OFFSET_MISMATCH says where it stands, and the client goes on from there."""
    s = stub(registry.address)
    data = os.urandom(300_000)
    upload_id = s.StartUpload(pb.StartUploadRequest(repository="lib/ahead")).upload_id
    s.WriteUpload(iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=data[:1000])]))
    sent: list[int] = []
    client._send_and_commit(
        upload_id,
        "lib/ahead",
        io.BytesIO(data),
        sha(data),
        len(data),
        lambda done, total: sent.append(done),
    )
    assert client.stat_blob("lib/ahead", sha(data)).size == len(data)
    assert sent[-1] == len(data)
