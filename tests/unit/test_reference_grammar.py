"""The image reference grammar is written once (berth.reference): client and server agree."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from berth import reference as grammar
from berth.client.image import parse_external_reference
from berth.client.registry import ImageReference, parse_image_reference
from berth.errors import BerthClientError
from berth.reference import InvalidReference, names_registry
from berthd.common.errors import InvalidArgument
from berthd.common.oci import digest as server_digest
from berthd.common.oci import reference as server
from berthd.common.oci.reference import parse_reference

D = "sha256:" + "ab" * 32
D512 = "sha512:" + "cd" * 64
CLIENT_PACKAGE = Path(__file__).parents[2] / "clients" / "python" / "berth"

GOOD = [
    "alpine",
    "alpine:3.19",
    "library/alpine:3",
    f"alpine@{D}",
    f"alpine:3@{D}",
    "a" * 255,
    "a_b-c__e/x.y:_x-y.z",
    "docker.io/library/alpine",
    "my.org/team_a/app-1",
    "localhost/app:v1",
    "localhost:5000/a/b:1",
    "registry:5000/app",
    "10.0.0.1:5000/app",
    "[::1]:5000/app:x",
    f"ghcr.io/o/r:t@{D}",
    "Registry.Example.com/app",
    "myhost/app",
    "localhostx/app",
    "localhost:5000",
    "x:" + "t" * 128,
]
BAD = [
    "",
    "Alpine",
    "Foo_-bar",
    "docker.io/Library/alpine",
    "alpine:",
    "alpine@",
    "alpine@sha256:abc",
    f"alpine@{D512}",
    "alpine:-x",
    "a:b:c",
    f"alpine@{D}@{D}",
    "/alpine",
    "a//b",
    "a/",
    "localhost/",
    "a b",
    "a  b:c",  # a run of spaces survives into the message unchanged
    "a" * 256,
    "x:" + "t" * 129,
    "bad_host.com/app",
    "-x.com/app",
    "host.com:99999/app",
    "host.com:0/app",
    "host.com:/app",
    "é",
]


def server_parts(text: str) -> tuple[str | None, ...]:
    try:
        ref = parse_reference(text, default_tag=None)
    except InvalidArgument as exc:
        return ("error", str(exc))
    return (ref.registry, ref.repository, ref.tag, ref.digest)


def client_parts(text: str) -> tuple[str | None, ...]:
    try:
        ref = parse_external_reference(text)
    except BerthClientError as exc:
        assert exc.code == "INVALID_ARGUMENT"
        assert str(exc) == exc.message
        return ("error", exc.message)
    return (ref.host, ref.name.repository, ref.name.tag, ref.name.digest)


def has_host(text: str) -> bool:
    first, slash, _ = text.partition("@")[0].partition("/")
    return bool(slash) and names_registry(first)


@pytest.mark.parametrize("text", GOOD + BAD)
def test_client_and_server_parse_identically(text: str) -> None:
    expected = server_parts(text)
    assert (expected[0] == "error") == (text in BAD)
    assert client_parts(text) == expected


@pytest.mark.parametrize("text", [t for t in GOOD + BAD if not has_host(t)])
def test_names_without_a_host_parse_identically_in_the_cli(text: str) -> None:
    expected = server_parts(text)
    try:
        ref = parse_image_reference(text)
    except InvalidReference as exc:
        assert ("error", exc.message) == expected
    else:
        assert (None, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Alpine", 'invalid repository name "Alpine": names must be lowercase (try "alpine")'),
        (
            "a:-x",
            'invalid tag "-x": use letters, digits, _ . and - only, and do not start with . or -',
        ),
        (
            f"a@{D512}",
            f'unsupported digest algorithm "sha512" in "{D512}": only sha256 is supported',
        ),
        (
            "host.com:0/app",
            'invalid registry host "host.com:0": expected host[:port] with port 1-65535',
        ),
        (
            "a  b",
            'invalid repository name "a  b": components must be lowercase letters, digits '
            "and separators . _ __ - (a separator cannot start or end a component)",
        ),
    ],
)
def test_messages_are_the_servers_wording(text: str, message: str) -> None:
    assert client_parts(text) == server_parts(text) == ("error", message)


@pytest.mark.parametrize(
    ("check", "server_check", "values"),
    [
        ("validate_repository", server.validate_repository, ["a/b", "A", "", "a" * 256, None]),
        ("validate_tag", server.validate_tag, ["t", ".t", "", "t" * 129, 5]),
        ("validate_reference", server.validate_reference, ["t", D, D512, "a:b", ""]),
        ("validate_digest", server_digest.parse_digest, [D, D512, "sha256:x", "", None]),
    ],
)
def test_part_validators_agree(check: str, server_check, values: list) -> None:
    for value in values:
        try:
            expected = ("ok", server_check(value))
        except InvalidArgument as exc:
            expected = ("error", str(exc))
        try:
            got = ("ok", getattr(grammar, check)(value))
        except InvalidReference as exc:
            got = ("error", exc.message)
        assert got == expected, value


def test_cli_names_refuse_a_registry_host_with_a_port() -> None:
    with pytest.raises(InvalidReference, match="registry host is not allowed here"):
        parse_image_reference("localhost:5000/app:1")
    # Without a port the first component is an ordinary repository component here.
    assert parse_image_reference("localhost/app") == ImageReference("localhost/app")


def test_image_reference_validates_its_parts() -> None:
    with pytest.raises(InvalidReference, match="names must be lowercase"):
        ImageReference("Bad")
    with pytest.raises(InvalidReference, match='invalid tag "a b"'):
        ImageReference("ok", "a b")
    with pytest.raises(InvalidReference, match='invalid digest "sha256:x"'):
        ImageReference("ok", None, "sha256:x")


def test_server_reference_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="names must be lowercase"):
        server.Reference(None, "Bad", None, None)
    assert isinstance(parse_reference("a"), server.Reference)


def test_client_package_never_imports_berthd() -> None:
    for path in CLIENT_PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "berthd" for n in names), path
    code = "import sys, berth.reference; sys.exit(any(m.startswith('berthd') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
