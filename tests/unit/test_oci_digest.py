"""Tests for berthd.common.oci.digest."""

from __future__ import annotations

import hashlib

import pytest

from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import (
    Digester,
    digest_bytes,
    digest_file,
    hex_of,
    parse_digest,
    quoted,
)

# Well-known vectors: sha256 of b"", b"abc" and of the OCI empty descriptor's `{}`.
EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ABC = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
EMPTY_JSON = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


@pytest.mark.parametrize("value", [EMPTY, ABC, "sha256:" + "0" * 64, "sha256:" + "f" * 64])
def test_parse_digest_accepts_sha256(value):
    assert parse_digest(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "sha512:" + "a" * 128,
        "sha384:" + "a" * 96,
        "blake3:" + "a" * 64,
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
    ],
)
def test_parse_digest_rejects_other_algorithms(value):
    with pytest.raises(InvalidArgument, match="unsupported digest algorithm") as e:
        parse_digest(value)
    assert value.split(":")[0] in str(e.value)
    assert "only sha256" in str(e.value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "A" * 64,  # uppercase hex is not canonical
        "sha256:" + "g" * 64,
        "SHA256:" + "a" * 64,
        " sha256:" + "a" * 64,
        "sha256:" + "a" * 64 + "\n",
        "a" * 64,
        ":" + "a" * 64,
        "sha256:" + "a" * 32 + ":" + "a" * 31,
    ],
)
def test_parse_digest_rejects_malformed(value):
    with pytest.raises(InvalidArgument) as e:
        parse_digest(value)
    msg = str(e.value)
    assert msg.startswith(f"invalid digest {quoted(value)}")
    assert "sha256:<64 lowercase hex>" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", [None, 5, b"sha256:" + b"a" * 64, ["sha256:" + "a" * 64]])
def test_parse_digest_rejects_non_strings(value):
    with pytest.raises(InvalidArgument, match="invalid digest"):
        parse_digest(value)


def test_digest_bytes_known_vectors():
    assert digest_bytes(b"") == EMPTY
    assert digest_bytes(b"abc") == ABC
    assert digest_bytes(b"{}") == EMPTY_JSON


def test_hex_of():
    assert hex_of(ABC) == ABC.removeprefix("sha256:")
    with pytest.raises(InvalidArgument, match='invalid digest "abc"'):
        hex_of("abc")


def test_digest_file_matches_bytes(tmp_path):
    # Larger than one 1 MiB read, and not a multiple of it, to cover the chunk loop.
    data = bytes(range(256)) * (5 * 4096 + 3)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert digest_file(path) == (digest_bytes(data), len(data))
    assert digest_file(str(path)) == (digest_bytes(data), len(data))


def test_digest_file_empty(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert digest_file(path) == (EMPTY, 0)


def test_digest_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        digest_file(tmp_path / "nope")


def test_digester_fresh_is_empty():
    d = Digester()
    assert (d.digest, d.size) == (EMPTY, 0)


def test_digester_incremental_equals_one_shot():
    d = Digester()
    for part in (b"a", b"", b"bc"):
        d.update(part)
    assert (d.digest, d.size) == (ABC, 3)
    # Reading the digest does not finalize: more data can follow.
    d.update(b"def")
    assert (d.digest, d.size) == (digest_bytes(b"abcdef"), 6)


def test_digester_accepts_bytes_like():
    d = Digester()
    d.update(bytearray(b"ab"))
    d.update(memoryview(b"c"))
    assert (d.digest, d.size) == (ABC, 3)


def test_digester_copy_is_independent():
    d = Digester()
    d.update(b"ab")
    c = d.copy()
    d.update(b"c")
    assert (d.digest, d.size) == (ABC, 3)
    assert (c.digest, c.size) == (digest_bytes(b"ab"), 2)
    c.update(b"x")
    assert (c.digest, c.size) == (digest_bytes(b"abx"), 3)
    assert (d.digest, d.size) == (ABC, 3)


def test_digester_large_stream():
    chunk = b"x" * 65536
    d = Digester()
    h = hashlib.sha256()
    for _ in range(40):
        d.update(chunk)
        h.update(chunk)
    assert d.digest == "sha256:" + h.hexdigest()
    assert d.size == 40 * 65536


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Foo/bar", '"Foo/bar"'),
        ("a\nb", '"a\\nb"'),  # stays on one line
        ('say "hi"', '"say \\"hi\\""'),
        ("é", '"é"'),
        (None, "null"),
        (-1, "-1"),
        ({"a": 1}, '{"a": 1}'),
        (b"x", "b'x'"),  # not JSON: falls back to repr
    ],
)
def test_quoted(value, expected):
    assert quoted(value) == expected


def test_quoted_truncates_long_values():
    text = quoted("a" * 1000)
    assert len(text) < 250
    assert text.endswith("...(1002 chars)")
