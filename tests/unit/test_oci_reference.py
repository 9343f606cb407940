"""Tests for berthd.common.oci.reference (OCI distribution-spec names, tags, references)."""

from __future__ import annotations

import dataclasses

import pytest

from berthd.common.errors import InvalidArgument
from berthd.common.oci.reference import (
    Reference,
    is_digest,
    parse_reference,
    validate_reference,
    validate_repository,
    validate_tag,
)

D = "sha256:" + "ab" * 32
D512 = "sha512:" + "cd" * 64


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "0",
        "alpine",
        "library/alpine",
        "my.org/team_a/app-1",
        "a__b",
        "a---b",
        "a.b.c",
        "a_b-c.d__e",
        "x/y/z/w/v",
        "a" * 255,
        "/".join(["abc"] * 64),  # exactly 255 characters
    ],
)
def test_validate_repository_accepts(name):
    assert validate_repository(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must be a non-empty string"),
        ("a" * 256, "256 characters, the limit is 255"),
        ("/".join(["abcd"] * 52), "259 characters, the limit is 255"),
        ("/a", "must not be empty"),
        ("a/", "must not be empty"),
        ("a//b", "must not be empty"),
        ("Foo/bar", 'names must be lowercase (try "foo/bar")'),
        ("library/Alpine", 'names must be lowercase (try "library/alpine")'),
        ("-a", "separators . _ __ -"),
        ("a-", "separators . _ __ -"),
        (".a", "separators . _ __ -"),
        ("a.", "separators . _ __ -"),
        ("a..b", "separators . _ __ -"),
        ("a___b", "separators . _ __ -"),
        ("a_.b", "separators . _ __ -"),
        ("a b", "separators . _ __ -"),
        ("a:b", "separators . _ __ -"),
        ("a@b", "separators . _ __ -"),
        ("é", "separators . _ __ -"),
        ("Foo_-bar", "separators . _ __ -"),  # invalid even when lowercased: no "try"
    ],
)
def test_validate_repository_rejects(name, fragment):
    with pytest.raises(InvalidArgument) as e:
        validate_repository(name)
    msg = str(e.value)
    assert fragment in msg
    if len(name) < 100:
        assert f'invalid repository name "{name}"' in msg


def test_validate_repository_rejects_non_string():
    with pytest.raises(InvalidArgument, match="invalid repository name null"):
        validate_repository(None)


def test_validate_repository_names_value_in_example_form():
    with pytest.raises(InvalidArgument) as e:
        validate_repository("Foo_-bar/x")
    assert str(e.value) == (
        'invalid repository name "Foo_-bar/x": components must be lowercase letters, digits '
        "and separators . _ __ - (a separator cannot start or end a component)"
    )


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_", "A", "1", "_x-y.z", "UPPER", "a" * 128])
def test_validate_tag_accepts(tag):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    ("tag", "fragment"),
    [
        ("", "must be a non-empty string"),
        ("a" * 129, "129 characters, the limit is 128"),
        (".hidden", "do not start with . or -"),
        ("-x", "do not start with . or -"),
        ("a:b", "letters, digits, _ . and - only"),
        ("a/b", "letters, digits, _ . and - only"),
        ("a b", "letters, digits, _ . and - only"),
        ("a@b", "letters, digits, _ . and - only"),
        ("tag\n", "letters, digits, _ . and - only"),
    ],
)
def test_validate_tag_rejects(tag, fragment):
    with pytest.raises(InvalidArgument) as e:
        validate_tag(tag)
    msg = str(e.value)
    assert fragment in msg
    assert msg.startswith("invalid tag ")
    if len(tag) < 100:
        assert tag.replace("\n", "\\n") in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [(D, True), (D512, False), ("latest", False), ("sha256:abc", False), ("", False)],
)
def test_is_digest(text, expected):
    assert is_digest(text) is expected


@pytest.mark.parametrize("text", ["latest", "v1", D, "sha256"])
def test_validate_reference_accepts(text):
    assert validate_reference(text) == text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", 'invalid tag ""'),
        ("-bad", 'invalid tag "-bad"'),
        ("sha256:abc", 'invalid digest "sha256:abc"'),
        (D512, "unsupported digest algorithm"),
        ("a:b", 'unsupported digest algorithm "a" in "a:b"'),  # ':' means a digest
        ("a" * 129, "the limit is 128"),
    ],
)
def test_validate_reference_rejects(text, error):
    with pytest.raises(InvalidArgument) as e:
        validate_reference(text)
    assert error in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", Reference(None, "alpine", "latest", None)),
        ("alpine:3.19", Reference(None, "alpine", "3.19", None)),
        ("library/alpine:3", Reference(None, "library/alpine", "3", None)),
        (f"alpine@{D}", Reference(None, "alpine", None, D)),
        (f"alpine:3@{D}", Reference(None, "alpine", "3", D)),
        ("docker.io/library/alpine", Reference("docker.io", "library/alpine", "latest", None)),
        ("localhost/app:v1", Reference("localhost", "app", "v1", None)),
        ("localhost:5000/a/b:1", Reference("localhost:5000", "a/b", "1", None)),
        ("registry:5000/app", Reference("registry:5000", "app", "latest", None)),
        ("10.0.0.1:5000/app", Reference("10.0.0.1:5000", "app", "latest", None)),
        ("[::1]:5000/app:x", Reference("[::1]:5000", "app", "x", None)),
        (f"ghcr.io/o/r:t@{D}", Reference("ghcr.io", "o/r", "t", D)),
        ("Registry.Example.com/app", Reference("Registry.Example.com", "app", "latest", None)),
        # Docker's rule: without '.', ':' or "localhost" the first component is a path.
        ("myhost/app", Reference(None, "myhost/app", "latest", None)),
        ("localhostx/app", Reference(None, "localhostx/app", "latest", None)),
        # No '/', so "localhost:5000" is image "localhost" with tag "5000", as in Docker.
        ("localhost:5000", Reference(None, "localhost", "5000", None)),
    ],
)
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "alpine:3.19",
        f"alpine@{D}",
        f"alpine:3@{D}",
        "localhost:5000/a/b:1",
        f"[::1]:5000/x/y:z@{D}",
        "docker.io/library/alpine:latest",
    ],
)
def test_str_round_trips(text):
    ref = parse_reference(text)
    assert str(ref) == text
    assert parse_reference(str(ref)) == ref


def test_default_tag():
    assert parse_reference("alpine", default_tag="stable").tag == "stable"
    assert parse_reference("alpine:1", default_tag="stable").tag == "1"
    # A digest pins the content: no tag is invented.
    assert parse_reference(f"alpine@{D}", default_tag="stable").tag is None
    bare = parse_reference("alpine", default_tag=None)
    assert (bare.tag, bare.digest, bare.reference, str(bare)) == (None, None, None, "alpine")


def test_reference_property_prefers_digest():
    assert parse_reference("a:t").reference == "t"
    assert parse_reference(f"a@{D}").reference == D
    assert parse_reference(f"a:t@{D}").reference == D


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", 'invalid image reference "": must be a non-empty string'),
        ("Alpine", 'invalid repository name "Alpine": names must be lowercase'),
        ("docker.io/Library/alpine", 'invalid repository name "Library/alpine": names must be'),
        ("alpine:", 'invalid tag ""'),
        ("alpine@", 'invalid digest ""'),
        ("alpine@sha256:abc", 'invalid digest "sha256:abc"'),
        (f"alpine@{D512}", 'unsupported digest algorithm "sha512"'),
        ("alpine:-x", 'invalid tag "-x"'),
        ("a:b:c", 'invalid tag "b:c"'),
        (f"alpine@{D}@{D}", "invalid digest"),
        ("/alpine", 'invalid repository name "/alpine"'),
        ("localhost/", 'invalid repository name ""'),
        ("bad_host.com/app", 'invalid registry host "bad_host.com"'),
        ("-x.com/app", 'invalid registry host "-x.com"'),
        ("host.com:99999/app", 'invalid registry host "host.com:99999"'),
        ("host.com:0/app", 'invalid registry host "host.com:0"'),
        ("host.com:/app", 'invalid registry host "host.com:"'),
        ("a b", 'invalid repository name "a b"'),
    ],
)
def test_parse_reference_rejects(text, error):
    with pytest.raises(InvalidArgument) as e:
        parse_reference(text)
    assert error in str(e.value)


def test_parse_reference_rejects_non_string():
    with pytest.raises(InvalidArgument, match="invalid image reference null"):
        parse_reference(None)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"repository": "Bad"}, "names must be lowercase"),
        ({"tag": "bad tag"}, 'invalid tag "bad tag"'),
        ({"digest": "sha256:x"}, 'invalid digest "sha256:x"'),
        ({"registry": "bad host"}, 'invalid registry host "bad host"'),
    ],
)
def test_reference_constructor_validates(kwargs, error):
    fields = {"registry": None, "repository": "ok", "tag": "t", "digest": None} | kwargs
    with pytest.raises(InvalidArgument, match=error):
        Reference(**fields)


def test_reference_is_frozen_and_hashable():
    ref = parse_reference("a/b:c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "d"  # type: ignore[misc]
    assert {ref, parse_reference("a/b:c")} == {ref}
