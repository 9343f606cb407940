"""Client for the OCI distribution HTTP API (what `docker push` and `docker pull` speak), on httpx.

One `DistributionClient` talks to one external registry host. It knows the parts of the API
an image copy needs: manifests (OCI and Docker schema2, images and indexes), blob existence,
cross-repository mounts, streamed downloads verified against their digest, and streamed uploads
(POST a session, PATCH the bytes, PUT ?digest=) that resume after a broken connection.

Auth follows Docker's flow: a request answered 401 carries a `WWW-Authenticate` challenge.
`Basic` means send the credentials with every request; `Bearer realm=,service=,scope=` means ask
the token server at `realm` for a token covering the scopes (`repository:<name>:pull` to read,
`repository:<name>:pull,push` to write), then retry once. Tokens are cached per scope set until
they expire, and once a host is known to want tokens, later requests fetch theirs up front
instead of taking a 401 first. Nothing here imports grpc: failures are berthd domain errors.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import httpx

from berthd.common.errors import (
    BerthError,
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
from berthd.common.oci.digest import Digester, digest_bytes
from berthd.common.oci.manifest import MAX_MANIFEST_BYTES, parse_manifest
from berthd.common.oci.reference import is_digest
from berthd.image.model import Credentials

CHUNK_SIZE = 1 << 20
RESUME_ATTEMPTS = 3
DEFAULT_TIMEOUT = 60.0
# Tokens without `expires_in` live 60 s by the token spec; renew a little early.
DEFAULT_TOKEN_SECONDS = 60
TOKEN_MARGIN_SECONDS = 5
USER_AGENT = "berth-image/0.1"
MANIFEST_ACCEPT = ", ".join(
    (
        mediatypes.OCI_IMAGE_MANIFEST,
        mediatypes.OCI_IMAGE_INDEX,
        mediatypes.DOCKER_MANIFEST,
        mediatypes.DOCKER_MANIFEST_LIST,
    )
)

Progress = Callable[[int, int], None]
"""progress(bytes_done, total); total is 0 when the registry did not say."""


# --- pure helpers ---------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host[:port]` is this machine: localhost, 127.0.0.0/8 or [::1]."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def base_url(host: str, insecure: bool) -> str:
    """https://host, or http://host for an insecure registry. Docker treats loopback
    registries as insecure by default, and so does berth."""
    scheme = "http" if insecure or is_loopback(host) else "https"
    return f"{scheme}://{host}"


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def join_location(request_url: str, location: str) -> str:
    """The absolute URL of a `Location` header, which registries send absolute or relative."""
    return str(httpx.URL(request_url).join(location))


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate` challenge: the scheme (lowercase) and its parameters."""

    scheme: str
    params: dict[str, str]

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes a Bearer challenge names (several are separated by spaces)."""
        return tuple(self.params.get("scope", "").split())


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})(?=\s|,|$)")
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^,\s]*)\s*(?:,|$)")


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in a `WWW-Authenticate` value (RFC 7235): `Bearer realm="x",scope="a b"`.

    Quoted values may hold commas and backslash escapes; a token not followed by `=` starts
    the next challenge.
    """
    challenges: list[Challenge] = []
    pos = 0
    while (scheme := _SCHEME_RE.match(header, pos)) is not None:
        pos = scheme.end()
        params: dict[str, str] = {}
        while (param := _PARAM_RE.match(header, pos)) is not None:
            value = param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[param.group(1).lower()] = value
            pos = param.end()
        challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


def pick_challenge(header: str) -> Challenge | None:
    """The challenge berth answers: Bearer if offered, else Basic, else None."""
    by_scheme = {c.scheme: c for c in reversed(parse_challenges(header))}
    return by_scheme.get("bearer") or by_scheme.get("basic")


def scope_actions(scopes: Iterable[str]) -> dict[tuple[str, str], frozenset[str]]:
    """`repository:x:pull,push` -> {("repository", "x"): {"pull", "push"}}, merged."""
    actions: dict[tuple[str, str], frozenset[str]] = {}
    for scope in scopes:
        for part in scope.split():
            kind, _, rest = part.partition(":")
            name, _, wanted = rest.rpartition(":")
            key = (kind, name)
            actions[key] = actions.get(key, frozenset()) | frozenset(wanted.split(","))
    return actions


def covers(granted: Iterable[str], wanted: Iterable[str]) -> bool:
    """Whether a token granted for `granted` scopes also serves a request needing `wanted`."""
    have = scope_actions(granted)
    return all(need <= have.get(key, frozenset()) for key, need in scope_actions(wanted).items())


def registry_message(body: bytes) -> str:
    """The registry's own words from an error body ({"errors":[{"code","message"}]})."""
    try:
        errors = json.loads(body).get("errors")
        parts = [f"{e.get('message') or e.get('code')} ({e.get('code')})" for e in errors]
    except (ValueError, AttributeError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return " ".join(text.split())[:200]
    return "; ".join(parts)


def _error_codes(body: bytes) -> set[str]:
    try:
        return {str(e.get("code")) for e in json.loads(body).get("errors")}
    except (ValueError, AttributeError, TypeError):
        return set()


def _facts(host: str, what: str, status: int = 0, codes: Iterable[str] = ()) -> dict[str, object]:
    """ErrorInfo metadata of an external registry's error."""
    facts: dict[str, object] = {"host": host, "what": what}
    if status:
        facts["status"] = status
    if codes:
        facts["codes"] = ",".join(sorted(codes))
    return facts


def error_for_status(host: str, status: int, what: str, body: bytes) -> BerthError:
    """The domain error for a failed registry response about `what` (a reference or a URL).
    Reasons start with REGISTRY_; the metadata names the host, the HTTP status and the
    registry's own error codes."""
    message = registry_message(body) or f"HTTP {status}"
    codes = _error_codes(body)
    facts = _facts(host, what, status, codes)
    if status == 401:
        return Unauthenticated(
            f"{host}: authentication required for {what}: {message}",
            reason="REGISTRY_UNAUTHORIZED",
            metadata=facts,
        )
    if status == 403:
        return PermissionDenied(
            f"{host}: permission denied for {what}: {message}",
            reason="REGISTRY_DENIED",
            metadata=facts,
        )
    if status == 404:
        return NotFound(f"{what}: {message}", reason="REGISTRY_NOT_FOUND", metadata=facts)
    if "DIGEST_INVALID" in codes:
        return DataLoss(f"{what}: {message}", reason="REGISTRY_DIGEST_INVALID", metadata=facts)
    if status == 429:
        return ResourceExhausted(
            f"{host}: too many requests for {what}: {message}",
            reason="REGISTRY_RATE_LIMITED",
            metadata=facts,
        )
    if status >= 500:
        return Unavailable(
            f"{host}: registry error on {what}: {message}",
            reason="REGISTRY_UNAVAILABLE",
            metadata=facts,
        )
    if status == 400:
        return InvalidArgument(
            f"{host}: {what}: {message}", reason="REGISTRY_BAD_REQUEST", metadata=facts
        )
    return FailedPrecondition(f"{host}: {what}: {message}", reason="REGISTRY_ERROR", metadata=facts)


def parse_range_end(header: str | None) -> int:
    """Bytes an upload session holds, from its `Range: 0-<last byte>` header."""
    if not header:
        return 0
    _, _, end = header.rpartition("-")
    # Distribution answers "0-0" for an empty session as well as for one byte; assume empty,
    # since resending a byte is refused (416) while skipping one would corrupt the blob.
    return int(end) + 1 if end.isdigit() and int(end) > 0 else 0


def _manifest_media_type(content_type: str, content: bytes) -> str:
    """The manifest's media type: the Content-Type if it is one, else from the document."""
    declared = content_type.partition(";")[0].strip()
    if declared in mediatypes.MANIFEST_TYPES:
        return declared
    return parse_manifest(content).media_type


# --- the client -----------------------------------------------------------------------------


class Manifest(NamedTuple):
    digest: str
    media_type: str
    content: bytes


@dataclass(frozen=True)
class _Token:
    value: str
    scopes: tuple[str, ...]
    expires: float


class _Received:
    """What a download has written so far, and its running digest."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hasher = Digester()

    def add(self, data: bytes) -> None:
        self.out.write(data)
        self.hasher.update(data)

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.hasher = Digester()


@dataclass
class _Session:
    """An upload session: where to send the next request, and how much it holds."""

    location: str
    offset: int = 0


class _Broken(Exception):
    """A connection broke mid-transfer; the caller may resume."""


Body = Callable[[], AsyncIterator[bytes]] | bytes | None


class DistributionClient:
    """Async client for one external registry host (`127.0.0.1:5000`, `registry.example.com`).

    Use as an async context manager, or call aclose().
    """

    def __init__(
        self,
        host: str,
        credentials: Credentials | None = None,
        insecure: bool = False,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.host = host
        self.base = base_url(host, insecure)
        self._credentials = credentials or Credentials()
        self._http = httpx.AsyncClient(
            timeout=timeout, transport=transport, headers={"User-Agent": USER_AGENT}
        )
        self._challenge: Challenge | None = None
        self._tokens: list[_Token] = []
        self._token_lock = asyncio.Lock()

    async def __aenter__(self) -> DistributionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- manifests -------------------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str) -> Manifest:
        """A manifest by tag or digest, its bytes as stored, checked against its digest."""
        what = self._name(repository, reference)
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        response = await self._send(
            "GET",
            url,
            (pull_scope(repository),),
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        try:
            if response.status_code == 404:
                raise NotFound(
                    f"{what}: manifest unknown",
                    reason="REGISTRY_NOT_FOUND",
                    metadata=_facts(self.host, what, 404, ("MANIFEST_UNKNOWN",)),
                )
            await self._check(response, what)
            content = await _read_limited(response, MAX_MANIFEST_BYTES, what)
        finally:
            await response.aclose()
        digest = digest_bytes(content)
        claimed = response.headers.get("docker-content-digest", "")
        pinned = reference if is_digest(reference) else ""
        for expected in (pinned, claimed if claimed.startswith("sha256:") else ""):
            if expected and expected != digest:
                raise DataLoss(
                    f"{what}: the registry sent a manifest with digest {digest}",
                    reason="DIGEST_MISMATCH",
                    metadata={"host": self.host, "expected": expected, "actual": digest},
                )
        try:
            media_type = _manifest_media_type(response.headers.get("content-type", ""), content)
        except InvalidArgument as e:
            raise InvalidArgument(f"{what}: {e}") from e
        return Manifest(digest, media_type, content)

    async def put_manifest(
        self, repository: str, reference: str, media_type: str, content: bytes
    ) -> str:
        """Store a manifest under a tag (or its digest); returns its digest."""
        what = self._name(repository, reference)
        response = await self._send(
            "PUT",
            f"{self.base}/v2/{repository}/manifests/{reference}",
            (push_scope(repository),),
            headers={"Content-Type": media_type},
            body=content,
        )
        await self._check(response, what)
        digest = digest_bytes(content)
        claimed = response.headers.get("docker-content-digest", "")
        if claimed.startswith("sha256:") and claimed != digest:
            raise DataLoss(
                f"{what}: the registry stored the manifest as {claimed}, not {digest}",
                reason="DIGEST_MISMATCH",
                metadata={"host": self.host, "expected": digest, "actual": claimed},
            )
        return digest

    # --- blobs -----------------------------------------------------------------------------

    async def blob_exists(self, repository: str, digest: str) -> int | None:
        """The blob's size if the repository holds it, else None."""
        response = await self._send(
            "HEAD",
            f"{self.base}/v2/{repository}/blobs/{digest}",
            (pull_scope(repository),),
            follow_redirects=True,
        )
        if response.status_code == 404:
            return None
        await self._check(response, self._name(repository, digest))
        return int(response.headers.get("content-length") or 0)

    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Ask the registry to link a blob from another of its repositories (no bytes move).

        False when it would not (it then opens an upload session, which is cancelled)."""
        response = await self._send(
            "POST",
            f"{self.base}/v2/{repository}/blobs/uploads/",
            (push_scope(repository), pull_scope(from_repository)),
            params={"mount": digest, "from": from_repository},
            headers={"Content-Length": "0"},
        )
        if response.status_code == 201:
            return True
        await self._check(response, self._name(repository, digest))
        if location := response.headers.get("location"):
            await self._cancel_upload(repository, join_location(str(response.url), location))
        return False

    async def download_blob(
        self, repository: str, digest: str, dest: Path, progress: Progress | None = None
    ) -> int:
        """Stream a blob to `dest`, verified against its digest; returns its size.

        Bytes land in `<dest>.partial`, renamed into place once the digest matches. A broken
        connection resumes with a Range request (from the start if the server ignores it).
        """
        what = self._name(repository, digest)
        url = f"{self.base}/v2/{repository}/blobs/{digest}"
        scopes = (pull_scope(repository),)
        partial = dest.with_name(dest.name + ".partial")
        try:
            with open(partial, "wb") as out:
                received = _Received(out)

                async def step() -> None:
                    await self._download(url, scopes, what, received, progress)

                await self._resuming("download", what, step)
            got = received.hasher
            if got.digest != digest:
                raise DataLoss(
                    f"{what}: the registry sent {got.size} bytes with digest {got.digest}",
                    reason="DIGEST_MISMATCH",
                    metadata={"host": self.host, "expected": digest, "actual": got.digest},
                )
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
        return got.size

    async def upload_blob(
        self,
        repository: str,
        path: Path,
        digest: str,
        size: int,
        progress: Progress | None = None,
    ) -> None:
        """Stream a file into the repository as a blob: POST a session, PATCH the bytes, PUT
        ?digest= to commit (Docker's way). A broken connection asks the session how much
        arrived and resumes from there."""
        what = self._name(repository, digest)
        scopes = (push_scope(repository),)
        start = await self._send(
            "POST",
            f"{self.base}/v2/{repository}/blobs/uploads/",
            scopes,
            headers={"Content-Length": "0"},
        )
        await self._check(start, what)
        session = _Session(self._location(start, what))

        async def step() -> None:
            if session.offset < size:
                session.location = await self._patch(
                    session.location, scopes, what, path, session.offset, size, progress
                )

        async def recover() -> None:
            status = await self._upload_status(session.location, scopes, what)
            session.offset, session.location = status

        try:
            await self._resuming("upload", what, step, recover)
            url = str(httpx.URL(session.location).copy_merge_params({"digest": digest}))
            done = await self._send("PUT", url, scopes, headers={"Content-Length": "0"})
            await self._check(done, what)
        except BaseException:
            await self._cancel_upload(repository, session.location)
            raise
        if progress is not None:
            progress(size, size)

    # --- transfer internals ----------------------------------------------------------------

    async def _resuming(
        self,
        action: str,
        what: str,
        step: Callable[[], Awaitable[None]],
        recover: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run step; after a broken connection, recover() and run it again, a few times."""
        for attempt in range(RESUME_ATTEMPTS + 1):
            try:
                return await step()
            except _Broken as broken:
                if attempt == RESUME_ATTEMPTS:
                    raise Unavailable(
                        f"{self.host}: {action} of {what} broke: {broken}",
                        reason="REGISTRY_UNREACHABLE",
                        metadata=_facts(self.host, what),
                    ) from broken
            await asyncio.sleep(0.25 * 2**attempt)
            if recover is not None:
                await recover()

    async def _download(
        self,
        url: str,
        scopes: tuple[str, ...],
        what: str,
        received: _Received,
        progress: Progress | None,
    ) -> None:
        """One GET of the rest of the blob, appended to what was received before."""
        offset = received.hasher.size
        # Raw bytes (identity, aiter_raw): the digest is over the blob as stored.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = await self._send(
            "GET", url, scopes, headers=headers, stream=True, follow_redirects=True
        )
        try:
            if response.status_code == 404:
                raise NotFound(
                    f"{what}: blob unknown",
                    reason="REGISTRY_NOT_FOUND",
                    metadata=_facts(self.host, what, 404, ("BLOB_UNKNOWN",)),
                )
            await self._check(response, what)
            if offset and response.status_code != 206:  # the server ignored Range: start over
                received.restart()
                offset = 0
            length = response.headers.get("content-length")
            total = offset + int(length) if length else 0
            # Unbuffered, so bytes that arrived before a break are kept for the resume.
            async for chunk in response.aiter_raw():
                received.add(chunk)
                if progress is not None:
                    progress(received.hasher.size, total)
        except httpx.TransportError as e:
            raise _Broken(_describe(e)) from e
        finally:
            await response.aclose()

    async def _patch(
        self,
        location: str,
        scopes: tuple[str, ...],
        what: str,
        path: Path,
        offset: int,
        size: int,
        progress: Progress | None = None,
    ) -> str:
        """PATCH bytes [offset, size) of the file to the session; returns its next Location."""

        async def chunks() -> AsyncIterator[bytes]:
            # Blocking reads of 1 MiB from local disk are short enough for the event loop.
            with open(path, "rb") as source:
                source.seek(offset)
                left = size - offset
                while left > 0 and (data := source.read(min(CHUNK_SIZE, left))):
                    left -= len(data)
                    yield data
                    if progress is not None:
                        progress(size - left, size)

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size - offset),
            "Content-Range": f"{offset}-{size - 1}",
        }
        try:
            response = await self._send("PATCH", location, scopes, headers=headers, body=chunks)
        except Unavailable as e:
            raise _Broken(str(e)) from e
        await self._check(response, what)
        return self._location(response, what)

    async def _upload_status(
        self, location: str, scopes: tuple[str, ...], what: str
    ) -> tuple[int, str]:
        """How many bytes an upload session holds, and its current Location."""
        response = await self._send("GET", location, scopes)
        await self._check(response, what)
        return parse_range_end(response.headers.get("range")), self._location(response, what)

    async def _cancel_upload(self, repository: str, location: str) -> None:
        """Best effort: free a session the registry opened for nothing; failures are ignored."""
        try:
            response = await self._send("DELETE", location, (push_scope(repository),))
            await response.aclose()
        except BerthError:
            pass

    def _location(self, response: httpx.Response, what: str) -> str:
        location = response.headers.get("location")
        if not location:
            raise FailedPrecondition(
                f"{self.host}: {what}: the registry answered HTTP {response.status_code} "
                "without a Location for the upload",
                reason="REGISTRY_ERROR",
                metadata=_facts(self.host, what, response.status_code),
            )
        return join_location(str(response.url), location)

    # --- requests and auth -----------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: Body = None,
        stream: bool = False,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send one request with the right credentials, answering one auth challenge.

        A streamed `body` is a factory so the request can be replayed after a 401."""
        for attempt in range(2):
            auth = await self._authorization(scopes)
            request = self._http.build_request(
                method,
                url,
                headers={**(headers or {}), **auth},
                params=params,
                content=body() if callable(body) else body,
            )
            try:
                response = await self._http.send(
                    request, stream=stream, follow_redirects=follow_redirects
                )
            except httpx.TransportError as e:
                raise Unavailable(
                    f"{self.host}: cannot reach the registry: {_describe(e)}",
                    reason="REGISTRY_UNREACHABLE",
                    metadata={"host": self.host},
                ) from e
            if response.status_code != 401:
                return response
            await response.aclose()
            challenge = pick_challenge(response.headers.get("www-authenticate", ""))
            if attempt or challenge is None or (auth and challenge.scheme == "basic"):
                raise self._refused(sent=bool(auth))
            self._challenge = challenge
            if challenge.scheme == "bearer":
                stale = auth.get("Authorization", "").removeprefix("Bearer ")
                await self._renew_token(scopes, challenge, challenge.scopes, stale)
            elif not self._credentials:
                raise self._refused(sent=False)
        raise AssertionError("unreachable")

    async def _authorization(self, scopes: tuple[str, ...]) -> dict[str, str]:
        challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            creds = self._credentials
            if not creds:
                return {}
            pair = f"{creds.username}:{creds.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        token = self._cached_token(scopes)
        if token is None:
            token = await self._renew_token(scopes, challenge)
        return {"Authorization": f"Bearer {token.value}"}

    def _cached_token(self, scopes: tuple[str, ...]) -> _Token | None:
        now = time.monotonic()
        self._tokens = [t for t in self._tokens if t.expires > now]
        return next((t for t in self._tokens if covers(t.scopes, scopes)), None)

    async def _renew_token(
        self,
        scopes: tuple[str, ...],
        challenge: Challenge,
        extra: tuple[str, ...] = (),
        stale: str = "",
    ) -> _Token:
        """A token for the scopes, plus `extra` ones a 401 challenge asked for; never `stale`,
        the one the registry just refused."""
        wanted = tuple(dict.fromkeys((*scopes, *extra)))
        async with self._token_lock:
            # Concurrent requests wait here while the first fetches the token they all need.
            cached = self._cached_token(wanted)
            if cached is not None and cached.value != stale:
                return cached
            token = await self._fetch_token(challenge, wanted)
            self._tokens = [t for t in self._tokens if not covers(token.scopes, t.scopes)]
            self._tokens.append(token)
            return token

    async def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise Unauthenticated(
                f"{self.host}: the registry's Bearer challenge has no realm",
                reason="REGISTRY_UNAUTHORIZED",
                metadata={"host": self.host},
            )
        service = challenge.params.get("service", "")
        creds = self._credentials
        try:
            if creds.identity_token:
                # An identity token is an OAuth2 refresh token: POST it to the realm.
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "scope": " ".join(scopes),
                    "client_id": "berth",
                }
                response = await self._http.post(realm, data=form)
            else:
                query = [("service", service), *(("scope", s) for s in scopes)]
                auth = None
                if creds.username:
                    query.append(("account", creds.username))
                    auth = httpx.BasicAuth(creds.username, creds.password)
                response = await self._http.get(realm, params=query, auth=auth)
        except httpx.TransportError as e:
            raise Unavailable(
                f"{self.host}: cannot reach the token server {realm}: {_describe(e)}",
                reason="REGISTRY_UNREACHABLE",
                metadata={"host": self.host, "realm": realm},
            ) from e
        if response.status_code in (401, 403):
            raise self._refused(sent=bool(creds))
        if not response.is_success:
            raise Unauthenticated(
                f"{self.host}: the token server {realm} answered HTTP {response.status_code}: "
                f"{registry_message(response.content)}",
                reason="REGISTRY_UNAUTHORIZED",
                metadata={"host": self.host, "realm": realm, "status": response.status_code},
            )
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            seconds = int(body.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError, TypeError):
            value, seconds = None, 0
        if not isinstance(value, str) or not value:
            raise Unauthenticated(
                f"{self.host}: the token server {realm} sent no token",
                reason="REGISTRY_UNAUTHORIZED",
                metadata={"host": self.host, "realm": realm},
            )
        expires = time.monotonic() + max(seconds - TOKEN_MARGIN_SECONDS, 1)
        return _Token(value, scopes, expires)

    def _refused(self, sent: bool) -> Unauthenticated:
        creds = self._credentials
        facts = {"host": self.host}
        if not sent or not creds:
            return Unauthenticated(
                f"{self.host}: authentication required",
                reason="REGISTRY_UNAUTHORIZED",
                metadata=facts,
            )
        who = creds.username or "the identity token"
        return Unauthenticated(
            f"{self.host} refused the credentials for {who}",
            reason="REGISTRY_UNAUTHORIZED",
            metadata={**facts, "username": creds.username},
        )

    async def _check(self, response: httpx.Response, what: str) -> None:
        if response.is_success:
            return
        body = await response.aread()
        raise error_for_status(self.host, response.status_code, what, body)

    def _name(self, repository: str, reference: str) -> str:
        sep = "@" if is_digest(reference) else ":"
        return f"{self.host}/{repository}{sep}{reference}"


async def _read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise ResourceExhausted(
                f"{what}: manifest is larger than {limit} bytes",
                reason="MANIFEST_TOO_LARGE",
                metadata={"limit": limit},
            )
    return bytes(data)


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__
