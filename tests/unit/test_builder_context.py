"""berthd.builder.context and .sources: receiving a build context, and Docker's COPY source rules
(paths, globs, directories, symlinks, escapes) with the sources' cache digest."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from berthd.builder.context import BuildContext, SourceMatch, sources_digest
from berthd.builder.sources import compile_pattern
from berthd.common.errors import InvalidArgument, ResourceExhausted

from .test_tarsafe import Entry, d, entry, hardlink, make_tar, symlink

MAX = 1 << 30

# A context like the one `berth build` sends: owners of the client's user, files in dirs.
TREE = (
    entry("Dockerfile", data=b"FROM scratch\n", uid=1000, gid=1000),
    entry(".hidden", data=b"h"),
    d("src", mode=0o750),
    entry("src/a.txt", data=b"alpha", uid=1000, mtime=1_500_000_000),
    entry("src/b.txt", data=b"beta", mode=0o600),
    entry("src/c.py", data=b"print()"),
    d("src/sub"),
    entry("src/sub/a.txt", data=b"deep"),
    entry("x*y", data=b"literal star"),
    symlink("to-src", "src"),
    symlink("to-a", "/src/a.txt"),
    symlink("escape", "../../../src/b.txt"),
    symlink("loop", "loop2"),
    symlink("loop2", "loop"),
    hardlink("hard", "src/a.txt"),
)


async def stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def receive(data: bytes, scratch: Path, max_bytes: int = MAX) -> BuildContext:
    # Several chunks, as the gRPC stream delivers them.
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    return await BuildContext.receive(stream(*chunks), scratch, max_bytes)


@pytest.fixture
def context(tmp_path: Path):
    with BuildContext.from_file(_write(tmp_path / "ctx.tar", make_tar(*TREE)), MAX) as ctx:
        yield ctx


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def paths(matches: list[SourceMatch]) -> list[tuple[str, list[str]]]:
    return [(m.path, [rel for rel, _ in m.entries]) for m in matches]


def content(match: SourceMatch, rel: str = "") -> bytes:
    data = dict(match.entries)[rel].data
    assert data is not None
    with data.open() as f:
        return f.read()


# --- receiving -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compress",
    [lambda b: b, gzip.compress, bz2.compress, lzma.compress],
    ids=["plain", "gzip", "bzip2", "xz"],
)
async def test_receive_reads_plain_and_compressed_contexts(tmp_path: Path, compress) -> None:
    ctx = await receive(compress(make_tar(*TREE)), tmp_path)
    assert ctx.read_text("Dockerfile") == "FROM scratch\n"
    assert ctx.read_text("./src/../Dockerfile") == "FROM scratch\n"
    assert ctx.read_text("missing") is None and ctx.read_text("src") is None
    assert ctx.files == len(TREE)
    assert len(list(tmp_path.iterdir())) == 1  # one uncompressed spool
    ctx.close()
    assert list(tmp_path.iterdir()) == []


async def test_an_empty_stream_is_an_empty_context(tmp_path: Path) -> None:
    with await receive(b"", tmp_path) as ctx:
        assert ctx.files == 0 and ctx.read_text("Dockerfile") is None
        with pytest.raises(InvalidArgument, match="file not found in build context: a"):
            ctx.match(["a"], 2)


async def test_a_context_over_the_limit_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    data = make_tar(entry("big", data=b"x" * 100_000))
    with pytest.raises(ResourceExhausted, match="larger than the limit of 50000 bytes"):
        await receive(data, tmp_path, max_bytes=50_000)
    # A small gzip stream that inflates past the limit is refused as well.
    with pytest.raises(ResourceExhausted):
        await receive(gzip.compress(data), tmp_path, max_bytes=50_000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (entry("/etc/passwd", data=b"x"), r'member "/etc/passwd" has an absolute path'),
        (entry("a/../../x", data=b"x"), r'member "a/../../x" points outside the archive'),
        (hardlink("h", "nowhere"), r'hardlink "h" points to "nowhere", which is not an earlier'),
    ],
)
async def test_hostile_members_are_refused_by_name(
    tmp_path: Path, member: Entry, message: str
) -> None:
    data = make_tar(entry("ok", data=b"ok"), member)
    with pytest.raises(InvalidArgument, match=f"^build context: {message}"):
        await receive(gzip.compress(data), tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_garbage_is_not_a_context(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a valid tar archive"):
        await receive(b"this is not a tar file" * 100, tmp_path)
    with pytest.raises(InvalidArgument, match="not valid gzip data"):
        await receive(gzip.compress(make_tar(*TREE))[:-100], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_dockerfile_must_be_utf8(tmp_path: Path) -> None:
    data = make_tar(entry("Dockerfile", data=b"FROM \xff\n"))
    with (
        BuildContext.from_file(_write(tmp_path / "c.tar", data), MAX) as ctx,
        pytest.raises(InvalidArgument, match='"Dockerfile" in the build context is not UTF-8'),
    ):
        ctx.read_text("Dockerfile")


def test_context_owners_are_dropped_modes_and_times_kept(context: BuildContext) -> None:
    [match] = context.match(["src/a.txt"], 1)
    assert (match.entry.uid, match.entry.gid) == (0, 0)
    assert match.entry.mode == 0o644 and match.entry.mtime == 1_500_000_000
    assert content(match) == b"alpha"
    [hard] = context.match(["hard"], 1)
    assert content(hard) == b"alpha"


# --- matching ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (["Dockerfile"], [("Dockerfile", [""])]),
        (["/Dockerfile"], [("Dockerfile", [""])]),  # relative to the context root
        (["./src/../Dockerfile"], [("Dockerfile", [""])]),
        # A directory stands for everything under it, sorted.
        (["src"], [("src", ["", "a.txt", "b.txt", "c.py", "sub", "sub/a.txt"])]),
        (["src/"], [("src", ["", "a.txt", "b.txt", "c.py", "sub", "sub/a.txt"])]),
        # `*` stays within one component and matches dot files.
        (["src/*.txt"], [("src/a.txt", [""]), ("src/b.txt", [""])]),
        (["*hidden"], [(".hidden", [""])]),
        (["src/*/a.txt"], [("src/sub/a.txt", [""])]),
        (["src/?.py"], [("src/c.py", [""])]),
        (["src/[ab].txt"], [("src/a.txt", [""]), ("src/b.txt", [""])]),
        (["src/[^a].txt"], [("src/b.txt", [""])]),
        (["src/[a-b]*"], [("src/a.txt", [""]), ("src/b.txt", [""])]),
        # A class quotes a wildcard character (a backslash makes the source literal, as in
        # BuildKit, which then looks for a name with a backslash).
        (["x[*]y"], [("x*y", [""])]),
        # Symlinks are followed, inside the context: through a dir, absolute, clamped `..`.
        (["to-src/c.py"], [("to-src/c.py", [""])]),
        (["to-a"], [("to-a", [""])]),
        (["escape"], [("escape", [""])]),
        (["to-src/*.py"], [("to-src/c.py", [""])]),
        # Several sources keep their order.
        (["src/c.py", "Dockerfile"], [("src/c.py", [""]), ("Dockerfile", [""])]),
    ],
)
def test_match_follows_dockers_source_rules(
    context: BuildContext, sources: list[str], expected: list[tuple[str, list[str]]]
) -> None:
    assert paths(context.match(sources, 7)) == expected


def test_symlinks_resolve_to_their_targets_content(context: BuildContext) -> None:
    assert content(context.match(["to-a"], 1)[0]) == b"alpha"
    assert content(context.match(["escape"], 1)[0]) == b"beta"  # ../../../ stops at the root
    [root] = context.match(["."], 1)
    assert root.path == "" and len(root.entries) == len(TREE) + 1  # the root entry too
    assert dict(root.entries)["to-src"].is_symlink  # links inside a directory are kept


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (["missing"], "file not found in build context: missing"),
        (["Dockerfile", "src/nope.txt"], "file not found in build context: src/nope.txt"),
        (["src/*.md"], r"file not found in build context: src/\*.md"),
        (["Dockerfile/x"], "file not found in build context: Dockerfile/x"),
        (["../secret"], r"forbidden path outside the build context: ../secret"),
        (["src/../../secret"], r"forbidden path outside the build context: src/../../secret"),
        (["/../secret"], r"forbidden path outside the build context: /../secret"),
        (["src/[a"], r'invalid pattern "src/\[a": syntax error in pattern'),
        (["src/[]a]"], r'invalid pattern "src/\[\]a\]": syntax error in pattern'),
        (["loop"], "loop: too many levels of symbolic links in /loop"),
        (["lo*/x"], "lo\\*/x: too many levels of symbolic links in /loop/x"),
    ],
)
def test_match_errors_name_the_line_and_the_source(
    context: BuildContext, sources: list[str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^Dockerfile:12: COPY failed: {message}$"):
        context.match(sources, 12)
    with pytest.raises(InvalidArgument, match=r"^Dockerfile:3: ADD failed: "):
        context.match(sources, 3, "ADD")


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*", ".git", True),
        ("a*b", "ab", True),
        ("a*b", "axxb", True),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("[a-c]x", "bx", True),
        ("[a-c]x", "dx", False),
        ("[^a-c]x", "dx", True),
        ("[^a-c]x", "ax", False),
        (r"[\]]", "]", True),
        (r"\?", "?", True),
        (r"\?", "a", False),
        ("[z-a]", "m", False),  # an inverted range matches nothing, as in Go
        ("a.b", "axb", False),  # regex characters are literal
        ("(x)+", "(x)+", True),
    ],
)
def test_patterns_match_like_go_filepath_match(pattern: str, name: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(name)) is matches


@pytest.mark.parametrize("pattern", ["[", "[a", "[]", "[a-]", "[-a]", "a\\", "[\\"])
def test_bad_patterns_are_errors_like_in_go(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_pattern(pattern)


# --- sources digest ------------------------------------------------------------------------


def _digest_of(tmp_path: Path, *members: Entry, sources: tuple[str, ...] = ("src",)) -> str:
    path = tmp_path / f"d{len(list(tmp_path.iterdir()))}.tar"
    with BuildContext.from_file(_write(path, make_tar(*members)), MAX) as ctx:
        return sources_digest(ctx.match(list(sources), 1))


def test_sources_digest_follows_content_and_modes_not_times_or_owners(tmp_path: Path) -> None:
    files = [d("src"), entry("src/a", data=b"one"), entry("src/b", data=b"two")]
    base = _digest_of(tmp_path, *files)
    assert base == _digest_of(tmp_path, *files)
    touched = [replace_info(m, mtime=1) for m in files]
    assert _digest_of(tmp_path, *touched) == base
    owned = [replace_info(m, uid=42, gid=42) for m in files]  # context owners mean nothing
    assert _digest_of(tmp_path, *owned) == base
    # Content, modes, names, additions and link targets all change it.
    assert _digest_of(tmp_path, *files[:2], entry("src/b", data=b"TWO")) != base
    assert _digest_of(tmp_path, *files[:2], entry("src/b", data=b"two", mode=0o755)) != base
    assert _digest_of(tmp_path, *files[:2], entry("src/c", data=b"two")) != base
    assert _digest_of(tmp_path, *files, entry("src/new", data=b"")) != base
    linked = [*files, symlink("src/l", "a")]
    assert _digest_of(tmp_path, *linked) != _digest_of(tmp_path, *files, symlink("src/l", "b"))
    # Unrelated files of the context do not matter.
    assert _digest_of(tmp_path, *files, entry("other", data=b"x")) == base
    # Order of sources matters (the later one wins at the destination).
    ab = _digest_of(tmp_path, *files, sources=("src/a", "src/b"))
    assert ab != _digest_of(tmp_path, *files, sources=("src/b", "src/a"))


def test_sources_digest_reads_data_once_per_file(context: BuildContext) -> None:
    matches = context.match(["src"], 1)
    first = sources_digest(matches)
    # The digest is remembered by the data: a second digest does not read the spool again.
    context.close()
    assert sources_digest(matches) == first


def replace_info(member: Entry, **attrs) -> Entry:
    info, data = member
    copy = tarfile.TarInfo(info.name)
    for key in ("type", "size", "mode", "mtime", "uid", "gid", "linkname"):
        setattr(copy, key, getattr(info, key))
    for key, value in attrs.items():
        setattr(copy, key, value)
    return copy, data


def test_source_match_entry_is_the_matched_path(context: BuildContext) -> None:
    [match] = context.match(["src"], 1)
    assert match.entry.is_dir and match.entry.mode == 0o750
    assert replace(match, line=2).line == 2  # frozen, comparable value
    assert io.BytesIO(content(match, "sub/a.txt")).read() == b"deep"
