"""The HTTP API's pure parts: the one error table, and the registry's bearer tokens."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from berthd.common.errors import _BY_CODE, BerthError, Unauthenticated
from berthd.common.security.authorize import Authorizer
from berthd.common.security.permissions import Permission, Role, permissions_of
from berthd.common.security.principal import ANONYMOUS, Principal
from berthd.registry.http_auth import HttpAuth
from berthd.registry.http_errors import BY_REASON, from_berth, status_of

DOCS = Path(__file__).resolve().parents[2] / "docs" / "registry.md"
SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}
# Distribution's own codes, which Docker clients know too.
DISTRIBUTION_CODES = {"TAG_INVALID", "RANGE_INVALID", "UNAVAILABLE", "UNKNOWN"}


def documented_reasons() -> dict[str, str]:
    """reason -> gRPC code name, from the registry's error table."""
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \|", DOCS.read_text(), re.MULTILINE)
    return dict(rows)


def test_every_documented_reason_is_a_spec_error() -> None:
    reasons = documented_reasons()
    assert len(reasons) > 20
    for reason, code in reasons.items():
        error = _BY_CODE[code]("message", reason=reason)
        status, oci = status_of(error)
        assert oci in SPEC_CODES | DISTRIBUTION_CODES, reason
        # Only a damaged record is the server's fault; everything else names the problem.
        assert (status >= 500) == (
            reason.endswith("_CORRUPT") or reason in ("STORAGE_FULL", "STORAGE_ERROR")
        ), reason
    assert set(BY_REASON) - set(reasons) <= {
        "SIZE_INVALID",
        "MANIFEST_TOO_LARGE",
        "UNSUPPORTED",
        "AUTHENTICATION_REQUIRED",
        "TOKEN_INVALID",
        "TOKEN_EXPIRED",
        "PERMISSION_DENIED",
    }


def test_the_json_detail_carries_the_reason_and_metadata() -> None:
    error = from_berth(
        BerthError("blob sha256:x not found", reason="BLOB_UNKNOWN", metadata={"digest": "x"})
    )
    assert (error.status, error.code, str(error)) == (
        404,
        "BLOB_UNKNOWN",
        "blob sha256:x not found",
    )
    assert error.detail == {"reason": "BLOB_UNKNOWN", "digest": "x"}


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_tokens_round_trip_expire_and_refuse_tampering() -> None:
    auth = HttpAuth(b"k" * 32, Authorizer(None), None)  # type: ignore[arg-type]
    dev = Principal(
        "user:ci",
        permissions_of([Role.DEVELOPER]),
        via="token",
        repositories=("team/*",),
        role=Role.DEVELOPER,
    )
    token = auth.issue(dev, {"team/app": ["pull", "push"]})
    caller = auth.verify(token)
    assert caller.grants == {"team/app": frozenset({"pull", "push"})}
    assert caller.principal.name == "user:ci" and caller.principal.repositories == ("team/*",)
    assert caller.principal.holds(Permission.REPOSITORY_PUSH)
    assert claims_of(token)["exp"] - claims_of(token)["iat"] == 300
    # The anonymous principal stays anonymous.
    assert auth.verify(auth.issue(ANONYMOUS, {})).principal == ANONYMOUS
    # Another key, a changed payload, garbage: not this registry's.
    other = HttpAuth(b"o" * 32, Authorizer(None), None)  # type: ignore[arg-type]
    header, _, signature = token.split(".")
    widened = base64.urlsafe_b64encode(
        json.dumps({**claims_of(token), "role": "admin"}).encode()
    ).decode()
    for bad in (other.issue(dev, {}), f"{header}.{widened.rstrip('=')}.{signature}", "x.y", ""):
        with pytest.raises(Unauthenticated) as refused:
            auth.verify(bad)
        assert refused.value.reason == "TOKEN_INVALID"
    expired = HttpAuth(b"k" * 32, Authorizer(None), None, token_seconds=-1)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated) as refused:
        auth.verify(expired.issue(dev, {}))
    assert refused.value.reason == "TOKEN_EXPIRED"
