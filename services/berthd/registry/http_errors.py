"""The one place where berth's domain errors become OCI Distribution errors.

The core raises BerthErrors with a stable `reason` (docs/registry.md#errors); the HTTP API
answers with the distribution-spec's JSON (`{"errors": [{"code", "message", "detail"}]}`), its
codes and statuses. Reasons missing from the table fall back on the gRPC code's mapping, so a
new reason never becomes a 500 with a traceback.
"""

from __future__ import annotations

import json

import grpc
from aiohttp import web

from berthd.common.errors import BerthError

# reason -> (HTTP status, OCI error code). Codes outside the spec's list (TAG_INVALID,
# RANGE_INVALID, UNAVAILABLE, UNKNOWN) are the ones CNCF Distribution uses.
BY_REASON: dict[str, tuple[int, str]] = {
    "BLOB_UNKNOWN": (404, "BLOB_UNKNOWN"),
    "MANIFEST_UNKNOWN": (404, "MANIFEST_UNKNOWN"),
    "TAG_UNKNOWN": (404, "MANIFEST_UNKNOWN"),
    "NAME_UNKNOWN": (404, "NAME_UNKNOWN"),
    "UPLOAD_UNKNOWN": (404, "BLOB_UPLOAD_UNKNOWN"),
    "NAME_INVALID": (400, "NAME_INVALID"),
    "DIGEST_INVALID": (400, "DIGEST_INVALID"),
    # The upload was discarded: the client starts again (Distribution answers the same).
    "DIGEST_MISMATCH": (400, "DIGEST_INVALID"),
    "MANIFEST_INVALID": (400, "MANIFEST_INVALID"),
    "MANIFEST_BLOB_UNKNOWN": (400, "MANIFEST_BLOB_UNKNOWN"),
    "INVALID_REFERENCE": (400, "TAG_INVALID"),
    "INVALID_RANGE": (416, "RANGE_INVALID"),
    # A chunk that does not start where the session stands: 416 as the spec says.
    "UPLOAD_OFFSET_MISMATCH": (416, "BLOB_UPLOAD_INVALID"),
    "UPLOAD_IN_USE": (409, "BLOB_UPLOAD_INVALID"),
    "UPLOAD_CLOSED": (409, "BLOB_UPLOAD_INVALID"),
    "SIZE_INVALID": (400, "SIZE_INVALID"),
    "MANIFEST_TOO_LARGE": (413, "SIZE_INVALID"),
    "STORAGE_FULL": (507, "UNKNOWN"),
    "STORAGE_ERROR": (503, "UNAVAILABLE"),
    "UNSUPPORTED": (405, "UNSUPPORTED"),
    "AUTHENTICATION_REQUIRED": (401, "UNAUTHORIZED"),
    "TOKEN_INVALID": (401, "UNAUTHORIZED"),
    "TOKEN_EXPIRED": (401, "UNAUTHORIZED"),
    "PERMISSION_DENIED": (403, "DENIED"),
    "MANIFEST_RECORD_CORRUPT": (500, "UNKNOWN"),
    "TAG_RECORD_CORRUPT": (500, "UNKNOWN"),
    "REPOSITORY_RECORD_CORRUPT": (500, "UNKNOWN"),
}

BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "UNSUPPORTED"),
    grpc.StatusCode.NOT_FOUND: (404, "NAME_UNKNOWN"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "UNSUPPORTED"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "UNSUPPORTED"),
    grpc.StatusCode.DATA_LOSS: (500, "UNKNOWN"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "SIZE_INVALID"),
    grpc.StatusCode.UNAVAILABLE: (503, "UNAVAILABLE"),
    grpc.StatusCode.ABORTED: (409, "UNKNOWN"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "UNAUTHORIZED"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "DENIED"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "UNAVAILABLE"),
}


class HttpError(Exception):
    """An error the HTTP layer raises itself (headers, query, auth), in the spec's terms."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: object = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def status_of(error: BerthError) -> tuple[int, str]:
    return BY_REASON.get(error.reason) or BY_CODE.get(error.code, (500, "UNKNOWN"))


def detail_of(error: BerthError) -> dict[str, object]:
    details = error.details
    detail: dict[str, object] = {"reason": details.reason, **details.metadata}
    if details.violations:
        detail["violations"] = [
            {"type": v.type, "subject": v.subject, "description": v.description}
            for v in details.violations
        ]
    return detail


def from_berth(error: BerthError) -> HttpError:
    status, code = status_of(error)
    return HttpError(status, code, str(error), detail_of(error))


def response(error: HttpError, head: bool = False) -> web.Response:
    """The spec's error body (none for HEAD, which has no body)."""
    body = json.dumps(
        {"errors": [{"code": error.code, "message": str(error), "detail": error.detail}]}
    ).encode()
    headers = {"Docker-Distribution-API-Version": "registry/2.0", **error.headers}
    if head:
        return web.Response(status=error.status, headers=headers)
    return web.Response(
        status=error.status, body=body, content_type="application/json", headers=headers
    )
