"""The OCI distribution-spec 1.1 workflows against a real registry process over HTTP.

Each test names the spec section it covers: "Pull", "Push", "Content Discovery", "Content
Management" (the four conformance categories), plus the error codes table ("Error Codes").
The admin's berth token is the bearer here; tests/integration/test_registry_http_auth.py
covers who may do what.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request

from berth.client import RegistryClient

from .conftest import ServiceProcess
from .oci_http import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Http, image, sha


def test_base_endpoint(http_admin: Http, http_anonymous: Http) -> None:
    """Pull: `GET /v2/` says the API is spoken; without credentials it names the token realm."""
    reply = http_admin.request("GET", "/v2/")
    assert reply.status == 200
    assert reply.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    reply = http_anonymous.request("GET", "/v2/")
    assert reply.status == 401 and reply.codes == ["UNAUTHORIZED"]
    assert reply.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://{http_anonymous.host}/v2/token",service="berth"'
    )


def test_pull_manifests_by_tag_and_digest(http_admin: Http) -> None:
    """Pull: manifests by tag and by digest, GET and HEAD, with Docker-Content-Digest and the
    manifest's media type; the content byte for byte."""
    digest, manifest = http_admin.push_image("conf/pull", "v1", [os.urandom(1000)])
    assert digest == sha(manifest)
    for reference in ("v1", digest):
        got = http_admin.request("GET", f"/v2/conf/pull/manifests/{reference}")
        assert got.status == 200
        assert got.body == manifest
        assert got.headers["Docker-Content-Digest"] == digest
        assert got.headers["Content-Type"] == OCI_MANIFEST
        head = http_admin.request("HEAD", f"/v2/conf/pull/manifests/{reference}")
        assert head.status == 200 and head.body == b""
        assert head.headers["Content-Length"] == str(len(manifest))
        assert head.headers["Docker-Content-Digest"] == digest


def test_pull_manifest_content_negotiation(http_admin: Http) -> None:
    """Pull: the Accept header. A stored type the client does not accept is MANIFEST_UNKNOWN
    (Distribution's answer); a listed type, a wildcard or no Accept header gets it."""
    layer = os.urandom(100)
    manifest, blobs = image([layer], DOCKER_MANIFEST)
    for blob in blobs:
        http_admin.upload("conf/negotiate", blob)
    http_admin.put_manifest("conf/negotiate", "docker", manifest, DOCKER_MANIFEST)
    path = "/v2/conf/negotiate/manifests/docker"
    for accept in (None, "*/*", f"{OCI_MANIFEST}, {DOCKER_MANIFEST};q=0.9"):
        reply = http_admin.request("GET", path, headers={"Accept": accept} if accept else {})
        assert reply.status == 200, accept
        assert reply.headers["Content-Type"] == DOCKER_MANIFEST
    refused = http_admin.request("GET", path, headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
    assert refused.status == 404 and refused.codes == ["MANIFEST_UNKNOWN"]
    assert DOCKER_MANIFEST in refused.json()["errors"][0]["message"]


def test_pull_blobs_with_ranges(http_admin: Http) -> None:
    """Pull: blobs by digest, HEAD and GET, and `Range` requests (206 with Content-Range; a
    range past the end is 416)."""
    data = os.urandom(300_000)
    digest = http_admin.upload("conf/blobs", data)
    head = http_admin.request("HEAD", f"/v2/conf/blobs/blobs/{digest}")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    got = http_admin.request("GET", f"/v2/conf/blobs/blobs/{digest}")
    assert got.status == 200 and got.body == data
    part = http_admin.request(
        "GET", f"/v2/conf/blobs/blobs/{digest}", headers={"Range": "bytes=10-99"}
    )
    assert part.status == 206
    assert part.body == data[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    tail = http_admin.request(
        "GET", f"/v2/conf/blobs/blobs/{digest}", headers={"Range": "bytes=299990-"}
    )
    assert tail.status == 206 and tail.body == data[299_990:]
    past = http_admin.request(
        "GET", f"/v2/conf/blobs/blobs/{digest}", headers={"Range": "bytes=400000-"}
    )
    assert past.status == 416


def test_pull_errors(http_admin: Http) -> None:
    """Error Codes: unknown manifest, blob and repository; a malformed name and digest."""
    http_admin.push_image("conf/errors", "v1", [os.urandom(10)])
    missing = sha(b"nothing")
    cases = [
        ("/v2/conf/errors/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        (f"/v2/conf/errors/manifests/{missing}", 404, "MANIFEST_UNKNOWN"),
        (f"/v2/conf/errors/blobs/{missing}", 404, "BLOB_UNKNOWN"),
        ("/v2/conf/nothing-here/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/conf/nothing-here/manifests/v1", 404, "NAME_UNKNOWN"),
        ("/v2/Conf/UPPER/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/conf/errors/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ]
    for path, status, code in cases:
        reply = http_admin.request("GET", path)
        assert (reply.status, reply.codes) == (status, [code]), path
        assert reply.json()["errors"][0]["message"], path
    # HEAD answers the same status, with no body.
    head = http_admin.request("HEAD", f"/v2/conf/errors/blobs/{missing}")
    assert head.status == 404 and head.body == b""


def test_push_monolithic_and_post_put(http_admin: Http) -> None:
    """Push: a monolithic POST ?digest=, and POST then PUT with the body; both 201 with the
    blob's Location."""
    data = os.urandom(5000)
    reply = http_admin.request("POST", f"/v2/conf/push/blobs/uploads/?digest={sha(data)}", data)
    assert reply.status == 201
    assert reply.headers["Location"] == f"/v2/conf/push/blobs/{sha(data)}"
    other = os.urandom(7000)
    started = http_admin.request("POST", "/v2/conf/push/blobs/uploads/")
    assert started.status == 202
    location = started.headers["Location"]
    assert started.headers["Range"] == "0-0" and started.headers["Docker-Upload-UUID"]
    done = http_admin.request("PUT", f"{location}?digest={sha(other)}", other)
    assert done.status == 201 and done.headers["Docker-Content-Digest"] == sha(other)
    assert http_admin.request("GET", f"/v2/conf/push/blobs/{sha(other)}").body == other


def test_push_chunked_interrupted_and_resumed(http_admin: Http) -> None:
    """Push: chunked PATCHes with Content-Range; a chunk at the wrong offset is 416 with the
    stored Range; GET on the upload tells where to resume; the final PUT checks the digest."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    first, second, third = data[:1_000_000], data[1_000_000:2_500_000], data[2_500_000:]
    location = http_admin.request("POST", "/v2/conf/chunks/blobs/uploads/").headers["Location"]
    reply = http_admin.request(
        "PATCH",
        location,
        first,
        {"Content-Range": f"0-{len(first) - 1}", "Content-Type": "application/octet-stream"},
    )
    assert reply.status == 202 and reply.headers["Range"] == f"0-{len(first) - 1}"
    # Nothing of an unfinished upload is visible as a blob.
    assert http_admin.request("HEAD", f"/v2/conf/chunks/blobs/{sha(data)}").status == 404
    # The client "lost" the answer and sends a chunk from the wrong place.
    wrong = http_admin.request("PATCH", location, second, {"Content-Range": f"5-{len(second) + 4}"})
    assert wrong.status == 416 and wrong.codes == ["BLOB_UPLOAD_INVALID"]
    assert wrong.headers["Range"] == f"0-{len(first) - 1}"
    status = http_admin.request("GET", location)
    assert status.status == 204 and status.headers["Range"] == f"0-{len(first) - 1}"
    end = len(first) + len(second)
    reply = http_admin.request(
        "PATCH", location, second, {"Content-Range": f"{len(first)}-{end - 1}"}
    )
    assert reply.status == 202 and reply.headers["Range"] == f"0-{end - 1}"
    # A streamed chunk (no Content-Range) appends.
    assert http_admin.request("PATCH", location, third).status == 202
    done = http_admin.request("PUT", f"{location}?digest={sha(data)}")
    assert done.status == 201
    assert http_admin.request("GET", f"/v2/conf/chunks/blobs/{sha(data)}").body == data
    # The session is gone once committed.
    assert http_admin.request("GET", location).codes == ["BLOB_UPLOAD_UNKNOWN"]


def test_push_wrong_digest_discards_the_upload(http_admin: Http) -> None:
    """Push + Error Codes: a digest the bytes do not hash to is DIGEST_INVALID, the blob never
    becomes visible and the session is gone; a malformed digest is DIGEST_INVALID too."""
    data = os.urandom(1000)
    claimed = sha(b"something else")
    reply = http_admin.request("POST", f"/v2/conf/wrong/blobs/uploads/?digest={claimed}", data)
    assert reply.status == 400 and reply.codes == ["DIGEST_INVALID"]
    detail = reply.json()["errors"][0]["detail"]
    assert detail["expected"] == claimed and detail["actual"] == sha(data)
    assert http_admin.request("HEAD", f"/v2/conf/wrong/blobs/{claimed}").status == 404
    assert http_admin.request("HEAD", f"/v2/conf/wrong/blobs/{sha(data)}").status == 404
    location = http_admin.request("POST", "/v2/conf/wrong/blobs/uploads/").headers["Location"]
    assert http_admin.request("PUT", f"{location}?digest={claimed}", data).codes == [
        "DIGEST_INVALID"
    ]
    assert http_admin.request("GET", location).status == 404
    location = http_admin.request("POST", "/v2/conf/wrong/blobs/uploads/").headers["Location"]
    reply = http_admin.request("PUT", f"{location}?digest=sha256:short", data)
    assert reply.status == 400 and reply.codes == ["DIGEST_INVALID"]


def test_push_cross_repository_mount(http_admin: Http) -> None:
    """Push: `POST ?mount=&from=` links a blob with no transfer (201); a blob the source does
    not hold falls back on an upload session (202)."""
    data = os.urandom(4000)
    digest = http_admin.upload("conf/source", data)
    reply = http_admin.request(
        "POST", f"/v2/conf/target/blobs/uploads/?mount={digest}&from=conf/source"
    )
    assert reply.status == 201
    assert reply.headers["Location"] == f"/v2/conf/target/blobs/{digest}"
    assert http_admin.request("GET", f"/v2/conf/target/blobs/{digest}").body == data
    missing = sha(b"not stored anywhere")
    reply = http_admin.request(
        "POST", f"/v2/conf/target/blobs/uploads/?mount={missing}&from=conf/source"
    )
    assert reply.status == 202 and "/blobs/uploads/" in reply.headers["Location"]


def test_push_manifest_rules(http_admin: Http) -> None:
    """Push + Error Codes: a manifest whose blobs are not in the repository is
    MANIFEST_BLOB_UNKNOWN; malformed JSON MANIFEST_INVALID; a digest reference that does not
    match the content DIGEST_INVALID; a malformed name NAME_INVALID; a bad tag TAG_INVALID."""
    layer = os.urandom(50)
    manifest, blobs = image([layer])
    http_admin.upload("conf/manifests", blobs[0])  # the config only
    reply = http_admin.request(
        "PUT", "/v2/conf/manifests/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST}
    )
    assert reply.status == 400 and reply.codes == ["MANIFEST_BLOB_UNKNOWN"]
    assert reply.json()["errors"][0]["detail"]["digest"] == sha(layer)
    bad = http_admin.request(
        "PUT", "/v2/conf/manifests/manifests/v1", b"{not json", {"Content-Type": OCI_MANIFEST}
    )
    assert bad.status == 400 and bad.codes == ["MANIFEST_INVALID"]
    http_admin.upload("conf/manifests", layer)
    reply = http_admin.request(
        "PUT",
        f"/v2/conf/manifests/manifests/{sha(b'other')}",
        manifest,
        {"Content-Type": OCI_MANIFEST},
    )
    assert reply.status == 400 and reply.codes == ["DIGEST_INVALID"]
    reply = http_admin.request(
        "PUT", "/v2/conf/-bad/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST}
    )
    assert reply.status == 400 and reply.codes == ["NAME_INVALID"]
    reply = http_admin.request(
        "PUT", "/v2/conf/manifests/manifests/.bad", manifest, {"Content-Type": OCI_MANIFEST}
    )
    assert reply.status == 400 and reply.codes == ["TAG_INVALID"]
    # By digest with the right digest: stored, no tag.
    put = http_admin.request(
        "PUT",
        f"/v2/conf/manifests/manifests/{sha(manifest)}",
        manifest,
        {"Content-Type": OCI_MANIFEST},
    )
    assert put.status == 201
    assert put.headers["Location"] == f"/v2/conf/manifests/manifests/{sha(manifest)}"


def test_content_discovery_tags_list_pagination(http_admin: Http) -> None:
    """Content Discovery: tags/list in lexical order, `n` and `last`, a `Link` to the next
    page while there is one."""
    _, manifest = http_admin.push_image("conf/tags", "a", [os.urandom(10)])
    tags = ["a", "b", "c", "d", "e"]
    for tag in tags[1:]:
        http_admin.put_manifest("conf/tags", tag, manifest, OCI_MANIFEST)
    reply = http_admin.request("GET", "/v2/conf/tags/tags/list")
    assert reply.json() == {"name": "conf/tags", "tags": tags}
    assert "Link" not in reply.headers
    seen: list[str] = []
    path = "/v2/conf/tags/tags/list?n=2"
    while path:
        reply = http_admin.request("GET", path)
        assert reply.status == 200
        seen += reply.json()["tags"]
        link = reply.headers.get("Link")
        path = link[1 : link.index(">")] if link else ""
        assert not link or link.endswith('rel="next"')
    assert seen == tags
    assert http_admin.request("GET", "/v2/conf/tags/tags/list?n=2&last=b").json()["tags"] == [
        "c",
        "d",
    ]
    assert http_admin.request("GET", "/v2/conf/tags/tags/list?n=0").json()["tags"] == []


def test_content_discovery_catalog_agrees_with_grpc(
    http_admin: Http, oci_registry: ServiceProcess
) -> None:
    """Content Discovery: `/v2/_catalog` with `n`/`last`/`Link`, the same list as berth's
    gRPC ListRepositories (`berth registry ls`)."""
    for name in ("cat/one", "cat/three", "cat/two"):
        http_admin.push_image(name, "1", [os.urandom(10)])
    names: list[str] = []
    path = "/v2/_catalog?n=2"
    while path:
        reply = http_admin.request("GET", path)
        names += reply.json()["repositories"]
        link = reply.headers.get("Link")
        path = link[1 : link.index(">")] if link else ""
    with RegistryClient(oci_registry.address) as client:
        assert names == [r.name for r in client.iter_repositories()]
    assert names == ["cat/one", "cat/three", "cat/two"]


def test_content_management_deletes(http_admin: Http) -> None:
    """Content Management: DELETE of a tag (the manifest stays) and of a manifest by digest
    (its tags go with it), 202 each; blobs are not deleted one by one (405 UNSUPPORTED: GC
    reclaims them)."""
    digest, manifest = http_admin.push_image("conf/delete", "keep", [os.urandom(10)])
    http_admin.put_manifest("conf/delete", "drop", manifest, OCI_MANIFEST)
    assert http_admin.request("DELETE", "/v2/conf/delete/manifests/drop").status == 202
    assert http_admin.request("GET", "/v2/conf/delete/manifests/drop").codes == ["MANIFEST_UNKNOWN"]
    assert http_admin.request("GET", "/v2/conf/delete/tags/list").json()["tags"] == ["keep"]
    assert http_admin.request("GET", f"/v2/conf/delete/manifests/{digest}").status == 200
    assert http_admin.request("DELETE", f"/v2/conf/delete/manifests/{digest}").status == 202
    assert http_admin.request("GET", "/v2/conf/delete/manifests/keep").codes == ["MANIFEST_UNKNOWN"]
    assert http_admin.request("GET", f"/v2/conf/delete/manifests/{digest}").status == 404
    assert http_admin.request("DELETE", "/v2/conf/delete/manifests/keep").codes == [
        "MANIFEST_UNKNOWN"
    ]
    config = json.loads(manifest)["config"]["digest"]
    reply = http_admin.request("DELETE", f"/v2/conf/delete/blobs/{config}")
    assert reply.status == 405 and reply.codes == ["UNSUPPORTED"]


def test_grpc_and_http_share_one_store(
    http_admin: Http, oci_registry: ServiceProcess, tmp_path
) -> None:
    """A blob pushed over gRPC is there over HTTP at once, and a manifest pushed over HTTP is
    there over gRPC."""
    data = os.urandom(20_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with RegistryClient(oci_registry.address) as client:
        client.push_blob("mixed/app", path, sha(data), len(data))
        assert http_admin.request("GET", f"/v2/mixed/app/blobs/{sha(data)}").body == data
        digest, manifest = http_admin.push_image("mixed/app", "http", [os.urandom(30)])
        got = client.get_manifest("mixed/app", "http")
        assert (got.digest, got.content) == (digest, manifest)
    # Requests are counted by endpoint, and changes audited with their principal, as RPCs are.
    with urllib.request.urlopen(oci_registry.metrics, timeout=30) as reply:
        figures = reply.read().decode()
    assert (
        'berth_registry_http_requests_total{endpoint="manifests",method="PUT",status="201"} 1.0'
        in figures
    )
    audited = [
        json.loads(line)
        for line in oci_registry.log.read_text().splitlines()
        if '"berthd.audit"' in line and "HTTP PUT" in line
    ]
    assert any(
        a["method"] == "HTTP PUT /v2/mixed/app/manifests/http" and a["principal"] == "user:admin"
        for a in audited
    )


def test_unknown_endpoints_and_methods(http_admin: Http) -> None:
    """Error Codes: a path the API does not have is 404 and a method it does not take 405,
    each with the spec's JSON body (never a traceback)."""
    reply = http_admin.request("GET", "/v2/conf/x/nothing/here")
    assert reply.status == 404 and reply.json()["errors"]
    reply = http_admin.request("POST", "/v2/conf/x/manifests/v1")
    assert reply.status == 405 and reply.codes == ["UNSUPPORTED"]


def artifact(subject: bytes, artifact_type: str, note: str) -> tuple[bytes, bytes]:
    """An OCI 1.1 artifact manifest (the empty config, one blob) whose subject is `subject`:
    (manifest, its blob)."""
    blob = note.encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha(b"{}"),
                "size": 2,
            },
            "layers": [{"mediaType": "text/plain", "digest": sha(blob), "size": len(blob)}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": sha(subject), "size": len(subject)},
            "annotations": {"note": note},
        }
    ).encode()
    return manifest, blob


def test_content_discovery_referrers(http_admin: Http) -> None:
    """Content Discovery (referrers): manifests pushed with a `subject` are listed by
    `GET /v2/<name>/referrers/<digest>` as an image index, `artifactType` filters them, and
    the PUT answers `OCI-Subject`."""
    digest, image_manifest = http_admin.push_image("conf/signed", "v1", [os.urandom(10)])
    http_admin.upload("conf/signed", b"{}")
    kinds = {"application/vnd.example.signature": "sig", "application/vnd.example.sbom": "sbom"}
    pushed = {}
    for artifact_type, note in kinds.items():
        manifest, blob = artifact(image_manifest, artifact_type, note)
        http_admin.upload("conf/signed", blob)
        reply = http_admin.request(
            "PUT",
            f"/v2/conf/signed/manifests/{sha(manifest)}",
            manifest,
            {"Content-Type": OCI_MANIFEST},
        )
        assert reply.status == 201 and reply.headers["OCI-Subject"] == digest
        pushed[sha(manifest)] = (artifact_type, note, len(manifest))
    reply = http_admin.request("GET", f"/v2/conf/signed/referrers/{digest}")
    assert reply.status == 200 and reply.headers["Content-Type"] == OCI_INDEX
    index = reply.json()
    assert index["mediaType"] == OCI_INDEX and index["schemaVersion"] == 2
    listed = {
        d["digest"]: (d["artifactType"], d["annotations"]["note"], d["size"])
        for d in index["manifests"]
    }
    assert listed == pushed
    assert all(d["mediaType"] == OCI_MANIFEST for d in index["manifests"])
    only = http_admin.request(
        "GET",
        f"/v2/conf/signed/referrers/{digest}?artifactType=application/vnd.example.sbom",
    )
    assert only.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["annotations"]["note"] for d in only.json()["manifests"]] == ["sbom"]
    # No referrers (or an unknown subject): an empty index, not an error.
    none = http_admin.request("GET", f"/v2/conf/signed/referrers/{sha(b'unknown')}")
    assert none.status == 200 and none.json()["manifests"] == []
    # The image itself has no subject: no OCI-Subject header.
    again = http_admin.request(
        "PUT", "/v2/conf/signed/manifests/v2", image_manifest, {"Content-Type": OCI_MANIFEST}
    )
    assert again.status == 201 and "OCI-Subject" not in again.headers
    bad = http_admin.request("GET", "/v2/conf/signed/referrers/sha256:nope")
    assert bad.status == 400 and bad.codes == ["DIGEST_INVALID"]


def test_push_connection_lost_mid_chunk_then_resumed(http_admin: Http) -> None:
    """Push: a PATCH whose connection breaks halfway keeps what was stored; GET on the
    upload says where to resume, and the upload finishes from there with the right digest."""
    data = os.urandom(6 * 1024 * 1024)
    location = http_admin.request("POST", "/v2/conf/broken/blobs/uploads/").headers["Location"]
    host, port = http_admin.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: {http_admin.host}\r\n"
            f"Authorization: {http_admin.authorization}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: 4 * 1024 * 1024])
        # The server takes what arrived; then the client "crashes" with 2 MiB unsent.
        stored = 0
        deadline = time.monotonic() + 30
        while stored < 2 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
            status = http_admin.request("GET", location)
            stored = int(status.headers["Range"].split("-")[1]) + 1
    # The lost connection ends the request; the session keeps its bytes, durable. Resume as a
    # client does: from the offset the registry states, again from the Range of a 416 if the
    # broken request was still storing what had arrived.
    for _ in range(5):
        status = http_admin.request("GET", location)
        assert status.status == 204
        offset = int(status.headers["Range"].split("-")[1]) + 1
        assert 0 < offset <= 4 * 1024 * 1024
        reply = http_admin.request(
            "PATCH", location, data[offset:], {"Content-Range": f"{offset}-{len(data) - 1}"}
        )
        if reply.status != 416:
            break
    assert reply.status == 202, reply.body
    done = http_admin.request("PUT", f"{location}?digest={sha(data)}")
    assert done.status == 201, done.body
    assert http_admin.request("GET", f"/v2/conf/broken/blobs/{sha(data)}").body == data
