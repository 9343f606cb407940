"""The webhook parts that need no server: glob, signature, backoff, envelope, spec checks."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from berthd.common.errors import InvalidArgument
from berthd.registry.webhooks import (
    PUSH,
    Target,
    backoff,
    check_spec,
    envelope,
    make_event,
    matches,
    sign,
    verify,
)


def test_glob_on_repository_names() -> None:
    assert matches("", "any/thing")
    assert matches("team/*", "team/app") and matches("team/*", "team/a/b")
    assert not matches("team/*", "other/app") and not matches("team/*", "team")
    assert matches("app-?", "app-1") and not matches("app-?", "app-10")
    assert matches("web[12]", "web2") and not matches("web[12]", "web3")


def test_signature_is_githubs_hmac_sha256() -> None:
    body = b'{"events":[]}'
    expected = hmac.new(b"key", body, hashlib.sha256).hexdigest()
    assert sign("key", body) == f"sha256={expected}"
    assert verify("key", body, sign("key", body))
    assert not verify("other", body, sign("key", body))
    assert not verify("key", body + b" ", sign("key", body))


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff(0, 0.5, 10.0) == 0.5


def test_envelope_is_distributions() -> None:
    target = Target(
        "team/app", "sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json", 42, "v1"
    )
    event = make_event(PUSH, target, source={"addr": "127.0.0.1:5000", "instanceID": "i1"}, now=0.5)
    data = json.loads(envelope(event))
    (got,) = data["events"]
    assert got["action"] == "push" and got["timestamp"] == "1970-01-01T00:00:00.500000Z"
    assert got["target"] == {
        "repository": "team/app",
        "digest": "sha256:" + "a" * 64,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "size": 42,
        "length": 42,
        "tag": "v1",
    }
    assert got["source"] == {"addr": "127.0.0.1:5000", "instanceID": "i1"}
    assert set(got) == {"id", "timestamp", "action", "target", "request", "actor", "source"}


@pytest.mark.parametrize(
    ("url", "events", "pattern", "secret", "field"),
    [
        ("ftp://host/x", ["push"], "", "", "url"),
        ("http:///nohost", ["push"], "", "", "url"),
        ("http://host/x", [], "", "", "events"),
        ("http://host/x", ["pull"], "", "", "events"),
        ("http://host/x", ["push"], "a b", "", "repository_pattern"),
        ("http://host/x", ["push"], "", "x" * 257, "secret"),
    ],
)
def test_bad_specs_name_their_field(
    url: str, events: list[str], pattern: str, secret: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_spec(url, events, pattern, secret)
    assert caught.value.details.reason == "WEBHOOK_INVALID"
    assert caught.value.details.field_violations[0][0] == field
