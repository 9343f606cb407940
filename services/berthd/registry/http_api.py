"""The OCI Distribution HTTP API (`/v2/`) over the registry's core.

Same process, same asyncio loop as the gRPC server, same `Registry` (blob store, upload
sessions, etcd records): every rule (names, digests, upload offsets, manifest validation,
visibility) is the core's, and a blob pushed through one API is visible through the other at
once. This module converts HTTP to core calls and back; errors become the spec's JSON in
`http_errors`, credentials and tokens are `http_auth`'s.

Server: aiohttp. Blob GETs are `web.FileResponse`s of the blob file, which aiohttp sends with
`sendfile(2)` on plain HTTP (bytes never enter Python) and handles `Range` on; uploads stream
the request body into the upload session in chunks, never the whole blob in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from berth.tls import plaintext_mode
from berthd.common.config import split_host_port
from berthd.common.errors import BerthError
from berthd.common.oci import mediatypes
from berthd.common.oci.manifest import MAX_MANIFEST_BYTES
from berthd.common.oci.reference import is_digest
from berthd.common.pages import MAX_PAGE_SIZE, encode_token
from berthd.common.security.principal import set_current_principal
from berthd.registry import metrics
from berthd.registry.access import pull_filter
from berthd.registry.blobstore import MAX_CHUNK_BYTES, BlobStat
from berthd.registry.core import Registry
from berthd.registry.http_auth import Caller, HttpAuth, challenge
from berthd.registry.http_errors import HttpError, from_berth, response

log = logging.getLogger("berthd.registry.http")
audit = logging.getLogger("berthd.audit")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
# Request bodies go to the upload session in writes of about this size (the core takes at most
# MAX_CHUNK_BYTES per write).
WRITE_BYTES = 1024 * 1024
READ_BUFFER = 4 * 1024 * 1024
DEFAULT_PAGE = 100

Handler = Callable[..., Awaitable[web.StreamResponse]]


def _range(offset: int) -> str:
    """The `Range` header of an upload holding `offset` bytes (Distribution's form: `0-0` when
    empty)."""
    return f"0-{max(offset - 1, 0)}"


def _query_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise HttpError(400, "PAGINATION_NUMBER_INVALID", f"{name}={value!r} is not a number")
    return int(value)


def _accepts(request: web.Request, media_type: str) -> bool:
    """Content negotiation: no Accept header, a wildcard, or the stored type itself."""
    accepted: set[str] = set()
    for header in request.headers.getall("Accept", []):
        for item in header.split(","):
            accepted.add(item.split(";", 1)[0].strip().lower())
    accepted.discard("")
    return not accepted or bool(accepted & {"*/*", "application/*", media_type})


class OciApi:
    def __init__(self, registry: Registry, auth: HttpAuth) -> None:
        self.registry = registry
        self.auth = auth
        # (endpoint, path pattern under /v2/, {method: handler}), first match wins: uploads
        # before blobs. The endpoint names the route in metrics.
        self.routes: list[tuple[str, re.Pattern[str], dict[str, Handler]]] = [
            (name, re.compile(p), h)
            for name, p, h in (
                ("base", r"", {"GET": self.base, "HEAD": self.base}),
                ("catalog", r"_catalog", {"GET": self.catalog}),
                ("token", r"token", {"GET": self.token, "POST": self.token}),
                ("tags", r"(?P<name>.+)/tags/list", {"GET": self.tags}),
                ("referrers", r"(?P<name>.+)/referrers/(?P<digest>[^/]+)", {"GET": self.referrers}),
                (
                    "manifests",
                    r"(?P<name>.+)/manifests/(?P<reference>[^/]+)",
                    {
                        "GET": self.get_manifest,
                        "HEAD": self.get_manifest,
                        "PUT": self.put_manifest,
                        "DELETE": self.delete_manifest,
                    },
                ),
                ("uploads", r"(?P<name>.+)/blobs/uploads/?", {"POST": self.start_upload}),
                (
                    "upload",
                    r"(?P<name>.+)/blobs/uploads/(?P<upload>[^/]+)",
                    {
                        "GET": self.upload_status,
                        "PATCH": self.patch_upload,
                        "PUT": self.finish_upload,
                        "DELETE": self.cancel_upload,
                    },
                ),
                (
                    "blobs",
                    r"(?P<name>.+)/blobs/(?P<digest>[^/]+)",
                    {"GET": self.get_blob, "HEAD": self.get_blob, "DELETE": self.delete_blob},
                ),
            )
        ]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._observe, self._errors])
        app.router.add_route("*", "/v2", self.redirect)
        app.router.add_route("*", "/v2/{path:.*}", self.dispatch)
        app.router.add_route("GET", "/token", self.token)
        app.router.add_route("POST", "/token", self.token)
        return app

    # -- plumbing -----------------------------------------------------------------------------

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Metrics for every request; an audit line (as the gRPC interceptor writes) for
        every request that may change something."""
        start = time.perf_counter()
        status = 500
        try:
            reply = await handler(request)
            status = reply.status
            return reply
        except web.HTTPException as exc:  # the /v2 redirect
            status = exc.status
            raise
        finally:
            endpoint = request.get("endpoint", "none")
            metrics.HTTP_REQUESTS.labels(request.method, endpoint, str(status)).inc()
            metrics.HTTP_LATENCY.labels(request.method, endpoint).observe(
                time.perf_counter() - start
            )
            # Getting a token (a POST to the realm) changes nothing.
            if request.method in MUTATING and endpoint != "token":
                caller: Caller | None = request.get("caller")
                audit.info(
                    "mutation",
                    extra={
                        "method": f"HTTP {request.method} {request.path}",
                        "principal": caller.principal.name if caller else "-",
                        "via": caller.principal.via if caller else "-",
                        "code": str(status),
                        "peer": request.remote or "-",
                    },
                )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        head = request.method == "HEAD"
        try:
            return await handler(request)
        except HttpError as exc:
            return response(exc, head)
        except BerthError as exc:
            return response(from_berth(exc), head)
        except web.HTTPException:
            raise
        except ConnectionResetError:
            # The client went away (mid-upload, say): what was stored stays, for a resume.
            log.info("%s %s: the client closed the connection", request.method, request.path)
            return response(HttpError(400, "BLOB_UPLOAD_INVALID", "the connection was lost"))
        except Exception:
            # A bug: logged with its traceback here, one line to the client.
            log.exception("%s %s failed", request.method, request.path)
            return response(
                HttpError(500, "UNKNOWN", "internal error; the registry's log has the cause"),
                head,
            )

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/v2/")

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        for endpoint, pattern, methods in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            handler = methods.get(request.method)
            request["endpoint"] = endpoint
            if handler is None:
                raise HttpError(
                    405,
                    "UNSUPPORTED",
                    f"{request.method} is not supported on {request.path}",
                    headers={"Allow": ", ".join(methods)},
                )
            return await handler(request, **match.groupdict())
        raise HttpError(404, "NOT_FOUND", f"no such endpoint: {request.path}")

    async def _caller(self, request: web.Request, action: str, name: str) -> Caller:
        caller = await self._who(request)
        await self.auth.require(request, caller, action, name)
        return caller

    async def _who(self, request: web.Request) -> Caller:
        try:
            caller = await self.auth.caller(request)
        except BerthError as exc:
            raise HttpError(
                401, "UNAUTHORIZED", str(exc), headers={"WWW-Authenticate": challenge(request)}
            ) from None
        request["caller"] = caller
        # As the gRPC interceptor does: the core's events name the caller (webhooks' actor).
        set_current_principal(caller.principal)
        return caller

    # -- base, token, listings -------------------------------------------------------------------

    async def base(self, request: web.Request) -> web.StreamResponse:
        caller = await self._who(request)
        if not caller.principal.authenticated:
            # Docker clients learn where to get tokens here: anonymous pulls of public
            # repositories then go through an anonymous token.
            raise HttpError(
                401,
                "UNAUTHORIZED",
                "authentication required (public repositories need only an anonymous token "
                "from the realm)",
                headers={"WWW-Authenticate": challenge(request)},
            )
        return web.json_response({}, headers=API_VERSION)

    async def token(self, request: web.Request) -> web.StreamResponse:
        request["endpoint"] = "token"
        return await self.auth.token(request)

    def _page(self, request: web.Request) -> tuple[int, str | None]:
        n = _query_int(request, "n")
        return (DEFAULT_PAGE if n is None else min(n, MAX_PAGE_SIZE)), request.query.get("last")

    @staticmethod
    def _link(path: str, n: int, last: str) -> dict[str, str]:
        return {"Link": f'<{path}?n={n}&last={quote(last, safe="")}>; rel="next"'}

    async def catalog(self, request: web.Request) -> web.StreamResponse:
        caller = await self._who(request)
        n, last = self._page(request)
        if n == 0:
            return web.json_response({"repositories": []}, headers=API_VERSION)
        token = encode_token("repositories", last) if last else ""
        records, more = await self.registry.list_repositories(
            n, token, pull_filter(caller.principal)
        )
        names = [r.name for r in records]
        headers = dict(API_VERSION)
        if more and names:
            headers.update(self._link("/v2/_catalog", n, names[-1]))
        return web.json_response({"repositories": names}, headers=headers)

    async def tags(self, request: web.Request, name: str) -> web.StreamResponse:
        await self._caller(request, "pull", name)
        n, last = self._page(request)
        if n == 0:
            await self.registry.get_repository(name)  # an unknown repository is still 404
            return web.json_response({"name": name, "tags": []}, headers=API_VERSION)
        token = encode_token(f"tags:{name}", last) if last else ""
        records, more = await self.registry.list_tags(name, n, token)
        tags = [t.name for t in records]
        headers = dict(API_VERSION)
        if more and tags:
            headers.update(self._link(f"/v2/{name}/tags/list", n, tags[-1]))
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    # -- manifests -----------------------------------------------------------------------------

    async def get_manifest(
        self, request: web.Request, name: str, reference: str
    ) -> web.StreamResponse:
        await self._caller(request, "pull", name)
        if request.method == "HEAD":
            record = await self.registry.resolve(name, reference)
            digest, media_type, size, content = record.digest, record.media_type, record.size, b""
        else:
            manifest = await self.registry.get_manifest(name, reference)
            digest, media_type = manifest.digest, manifest.media_type
            content, size = manifest.content, len(manifest.content)
        if not _accepts(request, media_type):
            # As Distribution: a client that cannot read the stored type finds no manifest.
            raise HttpError(
                404,
                "MANIFEST_UNKNOWN",
                f"the manifest {name}:{reference} is {media_type}, which the request's Accept "
                "header does not list",
                {"mediaType": media_type},
            )
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": digest,
            "Content-Type": media_type,
            "ETag": f'"{digest}"',
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=content, headers=headers)

    async def put_manifest(
        self, request: web.Request, name: str, reference: str
    ) -> web.StreamResponse:
        await self._caller(request, "push", name)
        content = await self._body(request, MAX_MANIFEST_BYTES, "manifest")
        declared = request.headers.get("Content-Type", "").split(";", 1)[0].strip()
        known = mediatypes.MANIFEST_TYPES | mediatypes.SCHEMA1_TYPES
        # A generic type (or none) declares nothing: the manifest's own mediaType decides.
        media_type = declared if declared in known else ""
        digest, _ = await self.registry.put_manifest(name, reference, media_type, content)
        headers = {
            **API_VERSION,
            "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": digest,
        }
        record = await self.registry.resolve(name, digest)
        if record.subject:
            # OCI 1.1: the registry indexed the subject (clients need no fallback tag).
            headers["OCI-Subject"] = record.subject
        return web.Response(status=201, headers=headers)

    async def referrers(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        await self._caller(request, "pull", name)
        artifact_type = request.query.get("artifactType", "")
        manifests = await self.registry.referrers(name, digest, artifact_type)
        headers = dict(API_VERSION)
        if artifact_type:
            headers["OCI-Filters-Applied"] = "artifactType"
        index = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_IMAGE_INDEX,
            "manifests": manifests,
        }
        headers["Content-Type"] = mediatypes.OCI_IMAGE_INDEX  # exactly: no charset parameter
        return web.Response(body=json.dumps(index).encode(), headers=headers)

    async def delete_manifest(
        self, request: web.Request, name: str, reference: str
    ) -> web.StreamResponse:
        await self._caller(request, "delete", name)
        if is_digest(reference):
            await self.registry.delete_manifest(name, reference)
        else:
            await self.registry.delete_tag(name, reference)
        return web.Response(status=202, headers=API_VERSION)

    async def _body(self, request: web.Request, limit: int, what: str) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(
                413, "SIZE_INVALID", f"the {what} is {request.content_length} bytes, over {limit}"
            )
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > limit:
                raise HttpError(413, "SIZE_INVALID", f"the {what} is over {limit} bytes")
        return bytes(data)

    # -- blobs ---------------------------------------------------------------------------------

    async def get_blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        await self._caller(request, "pull", name)
        stat = await self.registry.stat_blob(name, digest)
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": stat.digest,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(stat.size)
            return web.Response(status=200, headers=headers)
        metrics.BYTES_SENT.inc(stat.size)
        # Streams the file (sendfile on plain HTTP) and answers Range with 206/416 itself.
        return web.FileResponse(self.registry.blobs.path(stat.digest), headers=headers)

    async def delete_blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        await self._caller(request, "delete", name)
        raise HttpError(
            405,
            "UNSUPPORTED",
            "blobs are not deleted one by one: delete the manifests that use them and garbage "
            "collection (berth registry gc) removes what nothing references",
        )

    # -- uploads -------------------------------------------------------------------------------

    @staticmethod
    def _upload_headers(name: str, upload_id: str, offset: int) -> dict[str, str]:
        return {
            **API_VERSION,
            "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
            "Range": _range(offset),
            "Docker-Upload-UUID": upload_id,
        }

    @staticmethod
    def _blob_created(name: str, blob: BlobStat) -> web.Response:
        return web.Response(
            status=201,
            headers={
                **API_VERSION,
                "Location": f"/v2/{name}/blobs/{blob.digest}",
                "Docker-Content-Digest": blob.digest,
            },
        )

    async def start_upload(self, request: web.Request, name: str) -> web.StreamResponse:
        caller = await self._caller(request, "push", name)
        mount, source = request.query.get("mount"), request.query.get("from", "")
        if mount:
            mounted = await self._mount(request, caller, name, mount, source)
            if mounted is not None:
                return self._blob_created(name, mounted)
        upload_id = await self.registry.start_upload(name)
        digest = request.query.get("digest")
        try:
            offset = await self._write(request, upload_id, 0)
            if digest is not None:
                # Monolithic: POST with the whole blob and its digest.
                blob, _ = await self.registry.commit_upload(upload_id, digest)
                return self._blob_created(name, blob)
        except BaseException:
            with contextlib.suppress(BerthError):
                await self.registry.cancel_upload(upload_id)
            raise
        return web.Response(status=202, headers=self._upload_headers(name, upload_id, offset))

    async def _mount(
        self, request: web.Request, caller: Caller, name: str, digest: str, source: str
    ) -> BlobStat | None:
        """The mounted blob, or None to fall back on an upload (202): also when the caller
        may not pull the source, which then says nothing about what the source holds."""
        if source:
            try:
                await self.auth.require(request, caller, "pull", source)
            except HttpError:
                return None
        return await self.registry.mount_blob(name, digest, source, pull_filter(caller.principal))

    async def _session(self, request: web.Request, name: str, upload_id: str) -> int:
        """The session's offset, once the caller may push to `name` and the session is one
        of `name`'s (an id from another repository is unknown here)."""
        await self._caller(request, "push", name)
        info = await self.registry.upload_info(upload_id)
        if info.repository != name:
            raise HttpError(
                404,
                "BLOB_UPLOAD_UNKNOWN",
                f"upload {upload_id} is not an upload of {name}",
                {"upload_id": upload_id},
            )
        return info.offset

    async def upload_status(
        self, request: web.Request, name: str, upload: str
    ) -> web.StreamResponse:
        offset = await self._session(request, name, upload)
        return web.Response(status=204, headers=self._upload_headers(name, upload, offset))

    async def patch_upload(
        self, request: web.Request, name: str, upload: str
    ) -> web.StreamResponse:
        await self._session(request, name, upload)
        start = self._content_range(request)
        try:
            offset = await self._write(request, upload, start)
        except BerthError as exc:
            if exc.reason != "UPLOAD_OFFSET_MISMATCH":
                raise
            stored = int(exc.details.metadata.get("offset", "0"))
            error = from_berth(exc)
            error.headers.update(self._upload_headers(name, upload, stored))
            raise error from None
        return web.Response(status=202, headers=self._upload_headers(name, upload, offset))

    async def finish_upload(
        self, request: web.Request, name: str, upload: str
    ) -> web.StreamResponse:
        await self._session(request, name, upload)
        digest = request.query.get("digest")
        if not digest:
            raise HttpError(
                400, "DIGEST_INVALID", "the final PUT of an upload needs ?digest=<digest>"
            )
        start = self._content_range(request)
        await self._write(request, upload, start)
        blob, _ = await self.registry.commit_upload(upload, digest)
        return self._blob_created(name, blob)

    async def cancel_upload(
        self, request: web.Request, name: str, upload: str
    ) -> web.StreamResponse:
        await self._session(request, name, upload)
        await self.registry.cancel_upload(upload)
        return web.Response(status=204, headers=API_VERSION)

    @staticmethod
    def _content_range(request: web.Request) -> int | None:
        """Where a chunk says it starts (`Content-Range: <start>-<end>`); None: append."""
        value = request.headers.get("Content-Range")
        if value is None:
            return None
        match = re.fullmatch(r"(?:bytes )?(\d+)-(\d+)(?:/(?:\d+|\*))?", value.strip())
        if match is None or int(match.group(2)) < int(match.group(1)):
            raise HttpError(
                416,
                "BLOB_UPLOAD_INVALID",
                f"Content-Range {value!r} is not <start>-<end> with start <= end",
            )
        start, end = int(match.group(1)), int(match.group(2))
        length = request.content_length
        if length is not None and length != end - start + 1:
            raise HttpError(
                400,
                "BLOB_UPLOAD_INVALID",
                f"Content-Range {value} covers {end - start + 1} bytes but the body has {length}",
            )
        return start

    async def _write(self, request: web.Request, upload_id: str, start: int | None) -> int:
        """Stream the request body into the session from `start` (None: where it stands);
        the session's offset after. The core's writer checks the offset, holds the session's
        lock and makes the bytes durable before the offset is promised."""
        if not request.body_exists:
            return (await self.registry.upload_info(upload_id)).offset
        writer = await asyncio.to_thread(self.registry.blobs.open_writer, upload_id)
        metrics.UPLOADS_IN_PROGRESS.inc()
        pending: asyncio.Future[int] | None = None
        try:
            offset = writer.offset if start is None else start
            first = True
            buffer = bytearray()
            async for data in request.content.iter_any():
                buffer += data
                if len(buffer) < WRITE_BYTES:
                    continue
                # The disk write (and its hashing) runs while the next buffer arrives; one
                # write in flight at a time keeps the order; no write over the core's limit.
                view = memoryview(buffer)
                for at in range(0, len(view), MAX_CHUNK_BYTES):
                    piece = view[at : at + MAX_CHUNK_BYTES]
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(asyncio.to_thread(writer.write, offset, piece))
                    offset += len(piece)
                metrics.BYTES_RECEIVED.inc(len(buffer))
                buffer, first = bytearray(), False
            if pending is not None:
                await pending
                pending = None
            if buffer or (first and offset != writer.offset):
                # Also an empty write at a wrong offset: the writer refuses it.
                view = memoryview(buffer)
                for at in range(0, max(len(view), 1), MAX_CHUNK_BYTES):
                    offset = await asyncio.to_thread(
                        writer.write, offset, view[at : at + MAX_CHUNK_BYTES]
                    )
                metrics.BYTES_RECEIVED.inc(len(buffer))
            await asyncio.shield(asyncio.to_thread(writer.close))
            return writer.offset
        finally:
            if pending is not None:
                # Let a write still running end before the writer is closed under it.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
            metrics.UPLOADS_IN_PROGRESS.dec()
            # Shielded, as in the gRPC servicer: a cancelled request must still let go of the
            # session's lock.
            with contextlib.suppress(BerthError):
                await asyncio.shield(asyncio.to_thread(writer.close))


class HttpServer:
    """The API on its own listener, in the registry's process and loop. Plain HTTP on a
    loopback address (development, `berthd up`), else TLS with the instance's certificate
    from the cluster CA (client certificates optional: berth's own identities), reloaded when
    the certificate is renewed."""

    def __init__(self, api: OciApi, credentials: Any, tls: bool) -> None:
        self.api = api
        self.credentials = credentials
        self.tls = tls
        self._runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None

    def _load_certificate(self) -> None:
        assert self._ssl is not None
        issued = self.credentials.current
        # The ssl module loads chains from files only: a private directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="berth-http-tls-") as folder:
            cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert.write_bytes(issued.cert_pem)
            key.touch(mode=0o600)
            key.write_bytes(issued.key_pem)
            self._ssl.load_cert_chain(cert, key)

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=self.credentials.ca_pem.decode())
        self._ssl = context
        self._load_certificate()

        async def reload() -> None:
            self._load_certificate()

        self.credentials.on_renew.append(reload)
        return context

    async def start(self, listen: str) -> str:
        """Listen; returns the API's base URL."""
        host, port = split_host_port(listen)
        # The API's own middleware logs failures; aiohttp's access log would add a line per
        # blob request.
        # A larger read buffer than aiohttp's 64 KiB keeps the socket flowing while a chunk
        # is written to disk.
        self._runner = web.AppRunner(self.api.app(), access_log=None, read_bufsize=READ_BUFFER)
        await self._runner.setup()
        context = self._context() if self.tls else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot listen on {listen} (--http-listen): {exc}") from None
        bound = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=context).start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{'https' if self.tls else 'http'}://{shown}:{bound}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def needs_tls(listen: str) -> bool:
    """TLS unless the listener is on loopback (development), or security is off (bench)."""
    host, _ = split_host_port(listen)
    if plaintext_mode():
        return False
    return not (host == "localhost" or host == "::1" or host.startswith("127."))
