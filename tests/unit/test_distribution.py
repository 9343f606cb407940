"""The distribution HTTP client's logic: challenge parsing, scheme, scopes, Location joining,
error mapping, and the auth and resume flows against an in-process httpx MockTransport; and
the pure parts of transfer (local names, platform choice, mount sources)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from berthd.common.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from berthd.common.oci import mediatypes
from berthd.common.oci.manifest import ParsedManifest, parse_manifest
from berthd.common.oci.platform import host_platform, pick_platform
from berthd.common.oci.reference import parse_reference
from berthd.image.distribution import (
    Challenge,
    DistributionClient,
    base_url,
    covers,
    error_for_status,
    join_location,
    parse_challenges,
    parse_range_end,
    pick_challenge,
    pull_scope,
    push_scope,
    registry_message,
)
from berthd.image.model import Credentials
from berthd.image.transfer import MountSources, local_target

HOST = "registry.test:5000"
REALM = "https://auth.test/token"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def client(
    handler: Callable, credentials: Credentials | None = None, host: str = HOST
) -> DistributionClient:
    return DistributionClient(host, credentials, transport=httpx.MockTransport(handler))


# --- WWW-Authenticate -----------------------------------------------------------------------


def test_parse_bearer_challenge_with_commas_and_escapes_inside_quotes() -> None:
    header = (
        'Bearer realm="https://auth.test/token",service="registry.test",'
        'scope="repository:a/b:pull,push repository:c:pull",error="say \\"hi\\", ok"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.test/token",
                "service": "registry.test",
                "scope": "repository:a/b:pull,push repository:c:pull",
                "error": 'say "hi", ok',
            },
        )
    ]
    assert parse_challenges(header)[0].scopes == ("repository:a/b:pull,push", "repository:c:pull")


def test_parse_several_challenges_unquoted_values_and_case() -> None:
    header = 'Basic Realm=registry , BEARER realm="r", service=s'
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": "registry"}),
        Challenge("bearer", {"realm": "r", "service": "s"}),
    ]
    assert pick_challenge(header) == Challenge("bearer", {"realm": "r", "service": "s"})
    assert pick_challenge('Basic realm="x"') == Challenge("basic", {"realm": "x"})
    assert pick_challenge("") is None
    assert pick_challenge('Negotiate abc="1"') is None


# --- scheme, scopes, locations --------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "insecure", "url"),
    [
        ("127.0.0.1:5000", False, "http://127.0.0.1:5000"),
        ("127.9.8.7", False, "http://127.9.8.7"),
        ("localhost:5000", False, "http://localhost:5000"),
        ("[::1]:5000", False, "http://[::1]:5000"),
        ("registry.example.com", False, "https://registry.example.com"),
        ("10.0.0.1:5000", False, "https://10.0.0.1:5000"),
        ("localhost.example.com:5000", False, "https://localhost.example.com:5000"),
        ("registry.example.com", True, "http://registry.example.com"),
    ],
)
def test_scheme_is_https_except_insecure_or_loopback(host: str, insecure: bool, url: str) -> None:
    assert base_url(host, insecure) == url


def test_scopes_and_what_a_token_covers() -> None:
    assert pull_scope("a/b") == "repository:a/b:pull"
    assert push_scope("a/b") == "repository:a/b:pull,push"
    assert covers([push_scope("a")], [pull_scope("a")])
    assert not covers([pull_scope("a")], [push_scope("a")])
    assert not covers([push_scope("a")], [push_scope("a"), pull_scope("b")])
    assert covers([f"{push_scope('a')} {pull_scope('b')}"], [pull_scope("b"), push_scope("a")])


@pytest.mark.parametrize(
    ("location", "joined"),
    [
        ("/v2/x/blobs/uploads/u1?_state=s", "https://r.test:5000/v2/x/blobs/uploads/u1?_state=s"),
        ("http://other.test/upload/u2", "http://other.test/upload/u2"),
        ("u3", "https://r.test:5000/v2/x/blobs/uploads/u3"),
    ],
)
def test_location_headers_join_the_request_url(location: str, joined: str) -> None:
    assert join_location("https://r.test:5000/v2/x/blobs/uploads/", location) == joined


def test_range_header_gives_the_bytes_an_upload_holds() -> None:
    assert parse_range_end("0-9") == 10
    assert parse_range_end("bytes=0-1023") == 1024
    assert parse_range_end("0-0") == 0
    assert parse_range_end(None) == 0


# --- error mapping --------------------------------------------------------------------------


def errors(*pairs: tuple[str, str]) -> bytes:
    return json.dumps({"errors": [{"code": c, "message": m} for c, m in pairs]}).encode()


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        (403, errors(("DENIED", "requested access to the resource is denied")), PermissionDenied,
         "r.test: permission denied for r.test/x:1: requested access to the resource is denied"),
        (404, errors(("BLOB_UNKNOWN", "blob unknown to registry")), NotFound,
         "r.test/x:1: blob unknown to registry (BLOB_UNKNOWN)"),
        (400, errors(("MANIFEST_INVALID", "manifest invalid")), InvalidArgument,
         "r.test: r.test/x:1: manifest invalid (MANIFEST_INVALID)"),
        (400, errors(("DIGEST_INVALID", "provided digest did not match")), DataLoss,
         "provided digest did not match"),
        (416, errors(("BLOB_UPLOAD_INVALID", "bad range")), FailedPrecondition, "bad range"),
        (429, errors(("TOOMANYREQUESTS", "slow down")), ResourceExhausted, "slow down"),
        (503, b"<html>\n  Service   Unavailable</html>", Unavailable,
         "r.test: registry error on r.test/x:1: <html> Service Unavailable</html>"),
        (502, b"", Unavailable, "HTTP 502"),
    ],
)  # fmt: skip
def test_registry_errors_map_to_domain_errors(
    status: int, body: bytes, kind: type, text: str
) -> None:
    error = error_for_status("r.test", status, "r.test/x:1", body)
    assert type(error) is kind
    assert text in str(error)


def test_registry_message_joins_every_error() -> None:
    body = errors(("A", "first"), ("B", "second"))
    assert registry_message(body) == "first (A); second (B)"


# --- auth flows -----------------------------------------------------------------------------

MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": mediatypes.DOCKER_MANIFEST,
        "config": {"mediaType": mediatypes.DOCKER_CONFIG, "digest": sha(b"{}"), "size": 2},
        "layers": [],
    }
).encode()


def manifest_response(content: bytes = MANIFEST, digest: str | None = None) -> httpx.Response:
    return httpx.Response(
        200,
        content=content,
        headers={
            "Content-Type": mediatypes.DOCKER_MANIFEST,
            "Docker-Content-Digest": digest or sha(content),
        },
    )


class TokenRegistry:
    """A registry wanting bearer tokens, and its token server: tokens are 'tok:<scopes>'."""

    def __init__(self, user: str = "u", password: str = "p") -> None:
        self.user, self.password = user, password
        self.token_requests: list[httpx.Request] = []
        self.registry_requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return self.token(request)
        self.registry_requests.append(request)
        needed = "repository:x:pull" if request.method in ("GET", "HEAD") else push_scope("x")
        granted = request.headers.get("authorization", "").removeprefix("Bearer tok:")
        if not covers(granted.split("|"), [needed]):
            challenge = f'Bearer realm="{REALM}",service="reg",scope="{needed}"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        if request.method == "GET":
            return manifest_response()
        return httpx.Response(201, headers={"Docker-Content-Digest": sha(request.content)})

    def token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if request.method == "POST":
            form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
            ok = form["grant_type"] == "refresh_token" and form["refresh_token"] == "idtok"
            scopes = httpx.QueryParams(request.content.decode()).get("scope", "").split(" ")
        else:
            ok = request.headers.get("authorization") == basic(self.user, self.password)
            scopes = request.url.params.get_list("scope")
        if not ok:
            return httpx.Response(401, json={"details": "bad credentials"})
        return httpx.Response(200, json={"token": "tok:" + "|".join(scopes), "expires_in": 300})


async def test_bearer_flow_fetches_a_token_per_scope_and_caches_it() -> None:
    remote = TokenRegistry()
    async with client(remote, Credentials("u", "p")) as c:
        first = await c.get_manifest("x", "1")
        await c.get_manifest("x", "1")
        digest = await c.put_manifest("x", "2", mediatypes.DOCKER_MANIFEST, MANIFEST)
    assert first.digest == digest == sha(MANIFEST)
    assert first.media_type == mediatypes.DOCKER_MANIFEST
    # One token for pull, one for push (fetched up front, without another 401).
    assert [r.url.params.get_list("scope") for r in remote.token_requests] == [
        ["repository:x:pull"],
        ["repository:x:pull,push"],
    ]
    assert remote.token_requests[0].url.params["service"] == "reg"
    assert remote.token_requests[0].url.params["account"] == "u"
    assert [r.method for r in remote.registry_requests] == ["GET", "GET", "GET", "PUT"]


async def test_concurrent_requests_share_one_token_fetch() -> None:
    remote = TokenRegistry()
    async with client(remote, Credentials("u", "p")) as c:
        await asyncio.gather(*(c.get_manifest("x", str(n)) for n in range(3)))
    assert len(remote.token_requests) == 1


async def test_bearer_flow_with_an_identity_token_posts_a_refresh_token() -> None:
    remote = TokenRegistry()
    async with client(remote, Credentials(identity_token="idtok")) as c:
        await c.get_manifest("x", "1")
    assert [r.method for r in remote.token_requests] == ["POST"]


async def test_bearer_flow_wrong_password_and_no_credentials_are_unauthenticated() -> None:
    async with client(TokenRegistry(), Credentials("u", "wrong")) as c:
        with pytest.raises(Unauthenticated, match=f"^{HOST} refused the credentials for u$"):
            await c.get_manifest("x", "1")
    async with client(TokenRegistry()) as c:
        with pytest.raises(Unauthenticated, match=f"^{HOST}: authentication required$"):
            await c.get_manifest("x", "1")


def basic_registry(request: httpx.Request) -> httpx.Response:
    if request.headers.get("authorization") == basic("u", "p"):
        return manifest_response()
    return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="reg"'})


async def test_basic_flow_sends_credentials_after_the_challenge() -> None:
    async with client(basic_registry, Credentials("u", "p")) as c:
        assert (await c.get_manifest("x", "1")).content == MANIFEST
    async with client(basic_registry, Credentials("u", "nope")) as c:
        with pytest.raises(Unauthenticated, match="refused the credentials for u"):
            await c.get_manifest("x", "1")
    async with client(basic_registry) as c:
        with pytest.raises(Unauthenticated, match="authentication required"):
            await c.get_manifest("x", "1")


# --- manifests ------------------------------------------------------------------------------


async def test_manifest_not_found_names_the_reference() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=errors(("MANIFEST_UNKNOWN", "manifest unknown")))

    async with client(handler) as c:
        with pytest.raises(NotFound, match=f"^{HOST}/a/b:v1: manifest unknown$"):
            await c.get_manifest("a/b", "v1")


async def test_manifest_not_matching_its_digest_is_data_loss() -> None:
    async with client(lambda r: manifest_response(digest=sha(b"other"))) as c:
        with pytest.raises(DataLoss, match="manifest with digest"):
            await c.get_manifest("x", "1")
    async with client(lambda r: manifest_response()) as c:
        with pytest.raises(DataLoss, match=f"{HOST}/x@{sha(b'pinned')}"):
            await c.get_manifest("x", sha(b"pinned"))


async def test_manifest_media_type_falls_back_to_the_document() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert mediatypes.OCI_IMAGE_INDEX in request.headers["accept"]
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": "text/plain"})

    async with client(handler) as c:
        assert (await c.get_manifest("x", "1")).media_type == mediatypes.DOCKER_MANIFEST


async def test_connection_errors_are_unavailable_naming_the_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused")

    async with client(handler) as c:
        with pytest.raises(Unavailable, match=f"^{HOST}: cannot reach the registry: Connection"):
            await c.blob_exists("x", sha(b"a"))


# --- blobs ----------------------------------------------------------------------------------


class Body(httpx.AsyncByteStream):
    """A response body as it comes off a socket; `breaks` ends it with a reset connection."""

    def __init__(self, data: bytes, breaks: bool = False) -> None:
        self.data, self.breaks = data, breaks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data
        if self.breaks:
            raise httpx.ReadError("connection reset by peer")


async def test_download_resumes_with_a_range_request_and_verifies(tmp_path: Path) -> None:
    blob = b"0123456789" * 1000
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        if len(ranges) == 1:
            length = {"Content-Length": str(len(blob))}
            return httpx.Response(200, headers=length, stream=Body(blob[:4000], breaks=True))
        start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
        length = {"Content-Length": str(len(blob) - start)}
        return httpx.Response(206, headers=length, stream=Body(blob[start:]))

    seen: list[tuple[int, int]] = []
    async with client(handler) as c:
        size = await c.download_blob("x", sha(blob), tmp_path / "b", lambda *a: seen.append(a))
    assert size == len(blob)
    assert (tmp_path / "b").read_bytes() == blob
    assert ranges == [None, "bytes=4000-"]
    assert seen[-1] == (len(blob), len(blob))
    assert list(tmp_path.iterdir()) == [tmp_path / "b"]


async def test_download_not_matching_its_digest_leaves_nothing(tmp_path: Path) -> None:
    async with client(lambda r: httpx.Response(200, stream=Body(b"evil"))) as c:
        with pytest.raises(DataLoss, match=f"{HOST}/x@sha256:.*sent 4 bytes with digest"):
            await c.download_blob("x", sha(b"good"), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


async def test_upload_resumes_from_what_the_session_holds(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 40
    path = tmp_path / "blob"
    path.write_bytes(blob)
    received = bytearray()
    log: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        log.append(f"{request.method} {request.url.path} {request.headers.get('content-range')}")
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": "/v2/x/blobs/uploads/s1?_state=a"})
        if request.method == "PATCH":
            body = await request.aread()
            if len(log) == 2:  # the first PATCH: 1000 bytes arrive, then the connection breaks
                received.extend(body[:1000])
                raise httpx.WriteError("broken pipe")
            received.extend(body)
            return httpx.Response(202, headers={"Location": "/v2/x/blobs/uploads/s1?_state=c"})
        if request.method == "GET":
            headers = {"Range": f"0-{len(received) - 1}", "Location": "s1?_state=b"}
            return httpx.Response(204, headers=headers)
        assert request.method == "PUT"
        assert request.url.params["digest"] == sha(blob)
        assert request.url.params["_state"] == "c"
        return httpx.Response(201)

    async with client(handler) as c:
        await c.upload_blob("x", path, sha(blob), len(blob))
    assert bytes(received) == blob
    assert log == [
        "POST /v2/x/blobs/uploads/ None",
        f"PATCH /v2/x/blobs/uploads/s1 0-{len(blob) - 1}",
        "GET /v2/x/blobs/uploads/s1 None",
        f"PATCH /v2/x/blobs/uploads/s1 1000-{len(blob) - 1}",
        "PUT /v2/x/blobs/uploads/s1 None",
    ]


async def test_mount_not_done_cancels_the_session_it_opened() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url}")
        if request.method == "POST":
            return httpx.Response(202, headers={"Location": f"https://{HOST}/v2/x/up/1"})
        return httpx.Response(204)

    async with client(handler) as c:
        assert not await c.mount_blob("x", sha(b"a"), "y")
    assert calls == [
        f"POST https://{HOST}/v2/x/blobs/uploads/?mount={sha(b'a').replace(':', '%3A')}&from=y",
        f"DELETE https://{HOST}/v2/x/up/1",
    ]
    async with client(lambda r: httpx.Response(201)) as c:
        assert await c.mount_blob("x", sha(b"a"), "y")


# --- transfer's pure parts ------------------------------------------------------------------


def test_local_target_defaults_to_the_reference_without_its_host() -> None:
    source = parse_reference(f"{HOST}/lib/app:2")
    assert local_target(source, "") == ("lib/app", "2")
    pinned = parse_reference(f"{HOST}/lib/app@{sha(b'm')}")
    assert local_target(pinned, "") == ("lib/app", None)
    assert local_target(source, "mine/app") == ("mine/app", "latest")
    for bad in (f"{HOST}/mine:1", f"mine@{sha(b'm')}"):
        with pytest.raises(InvalidArgument, match="local reference must be name"):
            local_target(source, bad)


def test_pick_platform_chooses_the_host_image_or_lists_what_there_is() -> None:
    os_name, arch = host_platform()

    def entry(architecture: str) -> dict:
        platform = {"os": os_name, "architecture": architecture}
        return {"mediaType": mediatypes.OCI_IMAGE_MANIFEST, "digest": sha(architecture.encode()),
                "size": 1, "platform": platform}  # fmt: skip

    def index(*arches: str) -> ParsedManifest:
        doc = {"schemaVersion": 2, "manifests": [entry(a) for a in arches]}
        return parse_manifest(json.dumps(doc).encode(), mediatypes.OCI_IMAGE_INDEX)

    assert pick_platform(index("s390x", arch), "r").digest == sha(arch.encode())
    with pytest.raises(NotFound, match=rf"^r: the image index has no {os_name}/{arch} image"):
        pick_platform(index("s390x", "mips64le"), "r")


def test_mount_sources_are_per_host_and_bounded() -> None:
    sources = MountSources(limit_per_host=2)
    sources.remember("a:1", "d1", "x")
    sources.remember("a:1", "d2", "y")
    sources.remember("a:1", "d1", "z")  # refreshed: now the newest
    sources.remember("a:1", "d3", "w")
    assert [sources.lookup("a:1", d) for d in ("d1", "d2", "d3")] == ["z", None, "w"]
    assert sources.lookup("b:1", "d1") is None
