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

from berth.client.builder import write_context_tar
from berth.dockerignore import Matcher, context_paths
from berthd.builder import fstree
from berthd.builder.context import BuildContext, SourceMatch, filter_tree, sources_digest
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


async def receive(
    data: bytes, scratch: Path, max_bytes: int = MAX, max_files: int = 1000
) -> BuildContext:
    # Several chunks, as the gRPC stream delivers them.
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    return await BuildContext.receive(stream(*chunks), scratch, max_bytes, max_files)


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
    with pytest.raises(ResourceExhausted, match="larger than the limit of 50000 bytes") as e:
        await receive(data, tmp_path, max_bytes=50_000)
    assert e.value.reason == "CONTEXT_TOO_LARGE"
    assert e.value.details.metadata == {"limit_bytes": "50000"}
    # A small gzip stream that inflates past the limit is refused as well.
    with pytest.raises(ResourceExhausted) as e:
        await receive(gzip.compress(data), tmp_path, max_bytes=50_000)
    assert e.value.reason == "CONTEXT_TOO_LARGE"
    assert list(tmp_path.iterdir()) == []


async def test_a_context_with_too_many_files_is_refused(tmp_path: Path) -> None:
    data = make_tar(*(entry(f"f{i}", data=b"x") for i in range(11)))
    with pytest.raises(ResourceExhausted, match="more than 10 files") as e:
        await receive(data, tmp_path, max_files=10)
    assert e.value.reason == "CONTEXT_TOO_LARGE"
    assert e.value.details.metadata == {"limit_files": "10"}
    assert list(tmp_path.iterdir()) == []
    with await receive(data, tmp_path, max_files=11) as ctx:
        assert ctx.files == 11


async def test_receive_reports_the_bytes_received_as_they_arrive(tmp_path: Path) -> None:
    seen: list[int] = []
    chunks = [b"x" * 1000, b"", b"y" * 24]  # not a tar: the count comes first anyway
    with pytest.raises(InvalidArgument):
        await BuildContext.receive(stream(*chunks), tmp_path, MAX, received=seen.append)
    assert seen == [1000, 1000, 1024]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a" * 256, "has a name longer than 255 bytes"),
        ("/".join(["d" * 200] * 21), "has a path longer than 4096 bytes"),
    ],
)
async def test_paths_past_linuxs_limits_are_refused(
    tmp_path: Path, name: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as e:
        await receive(make_tar(entry(name, data=b"x")), tmp_path)
    assert e.value.reason == "CONTEXT_INVALID"


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
    with pytest.raises(InvalidArgument, match=f"^build context: {message}") as e:
        await receive(gzip.compress(data), tmp_path)
    assert e.value.reason == "CONTEXT_INVALID"
    assert e.value.details.field_violations[0][0] == "context"
    assert list(tmp_path.iterdir()) == []


async def test_garbage_is_not_a_context(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a valid tar archive") as e:
        await receive(b"this is not a tar file" * 100, tmp_path)
    assert e.value.reason == "CONTEXT_INVALID"
    with pytest.raises(InvalidArgument, match="not valid gzip data") as e:
        await receive(gzip.compress(make_tar(*TREE))[:-100], tmp_path)
    assert e.value.reason == "CONTEXT_INVALID"
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
    with pytest.raises(InvalidArgument, match=f"^Dockerfile:12: COPY failed: {message}$") as e:
        context.match(sources, 12)
    assert (e.value.reason, e.value.details.metadata) == ("COPY_FAILED", {"line": "12"})
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


# --- .dockerignore, applied by the builder ------------------------------------------------------


def ignored(tmp_path: Path, files: dict[str, str], dockerfile: str | None = "Dockerfile"):
    """A context of `files` (a name ending in / is a directory) sent whole, with the builder's
    .dockerignore applied: what is left of it."""
    members = [
        d(name.rstrip("/")) if name.endswith("/") else entry(name, data=text.encode())
        for name, text in files.items()
    ]
    ctx = BuildContext.from_file(_write(tmp_path / "c.tar", make_tar(*members)), MAX)
    ctx.apply_dockerignore(dockerfile)
    return ctx


def tree_paths(ctx: BuildContext) -> list[str]:
    out: list[str] = []
    pending = [("", ctx.tree.root)]
    while pending:
        prefix, node = pending.pop()
        for name, child in (node.children or {}).items():
            out.append(prefix + name)
            if child.children is not None:
                pending.append((prefix + name + "/", child))
    return sorted(out)


def test_the_builder_drops_what_dockerignore_excludes(tmp_path: Path) -> None:
    ctx = ignored(
        tmp_path,
        {
            "Dockerfile": "FROM scratch\n",
            ".dockerignore": "secret.txt\nbuild\n*.log\n!keep.log\n",
            "secret.txt": "password",
            "app.py": "",
            "debug.log": "",
            "keep.log": "",
            "build/out.bin": "",
            "src/nested.log": "",
        },
    )
    assert tree_paths(ctx) == [
        ".dockerignore",
        "Dockerfile",
        "app.py",
        "keep.log",
        "src",
        "src/nested.log",
    ]
    # Invisible to COPY, by name and by glob.
    with pytest.raises(InvalidArgument, match=r"file not found in build context: secret\.txt"):
        ctx.match(["secret.txt"], 2)
    assert [m.path for m in ctx.match(["*"], 2)] == [
        ".dockerignore",
        "Dockerfile",
        "app.py",
        "keep.log",
        "src",
    ]
    [match] = ctx.match(["."], 2)
    assert "secret.txt" not in [rel for rel, _ in match.entries]


def test_the_dockerfile_and_the_ignore_file_always_stay(tmp_path: Path) -> None:
    files = {"docker/app.Dockerfile": "FROM scratch\n", "docker/other": "", ".dockerignore": "*"}
    assert tree_paths(ignored(tmp_path, files, "docker/app.Dockerfile")) == [
        ".dockerignore",
        "docker",
        "docker/app.Dockerfile",
    ]
    # A Dockerfile sent as text keeps nothing in.
    assert tree_paths(ignored(tmp_path, files, None)) == [".dockerignore"]


def test_a_dockerfile_specific_ignore_file_wins_on_the_builder_too(tmp_path: Path) -> None:
    files = {
        "app.Dockerfile": "",
        "app.Dockerfile.dockerignore": "a\n",
        ".dockerignore": "b\n",
        "a": "",
        "b": "",
    }
    assert tree_paths(ignored(tmp_path, files, "app.Dockerfile")) == [
        ".dockerignore",
        "app.Dockerfile",
        "app.Dockerfile.dockerignore",
        "b",
    ]


def test_an_exception_keeps_its_excluded_parents_and_nothing_else(tmp_path: Path) -> None:
    files = {"Dockerfile": "", ".dockerignore": "a\n!a/b/c\n", "a/b/c": "", "a/b/d": "", "a/e": ""}
    assert tree_paths(ignored(tmp_path, files)) == [
        ".dockerignore",
        "Dockerfile",
        "a",
        "a/b",
        "a/b/c",
    ]


def test_a_malformed_ignore_file_is_an_invalid_context(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r".dockerignore: invalid .dockerignore pattern") as e:
        ignored(tmp_path, {"Dockerfile": "", ".dockerignore": "ok\nsrc/[a\n"})
    assert e.value.reason == "CONTEXT_INVALID"


def test_no_ignore_file_keeps_everything(tmp_path: Path) -> None:
    ctx = BuildContext.from_file(_write(tmp_path / "ctx.tar", make_tar(*TREE)), MAX)
    before = tree_paths(ctx)
    assert ctx.apply_dockerignore("Dockerfile") == 0
    assert tree_paths(ctx) == before


def test_filtering_a_deep_tree_needs_no_recursion(tmp_path: Path) -> None:
    tree = fstree.Tree()
    parts = tuple(["d"] * 3000)
    tree.put((*parts, "file"), fstree.Entry(fstree.REGULAR, 0o644))
    tree.put(("keep",), fstree.Entry(fstree.REGULAR, 0o644))
    assert filter_tree(tree, Matcher(["d"])) == 1
    assert list(tree.root.children or {}) == ["keep"]


def test_the_builder_keeps_exactly_what_the_client_sends(tmp_path: Path) -> None:
    """The client filters to save bytes, the builder filters for correctness: the same rules,
    so a context sent whole and one the client filtered leave the same tree."""
    root = tmp_path / "ctx"
    layout = {
        "Dockerfile": "FROM scratch\n",
        ".dockerignore": "build\n*.log\n!keep.log\ncache\n!cache/**/*.keep\n**/*.tmp\n",
        "app.py": "",
        "debug.log": "",
        "keep.log": "",
        "build/out.bin": "",
        "build/sub/deep": "",
        "cache/a/b.keep": "",
        "cache/a/c.tmp": "",
        "cache/empty/": "",
        "src/z.py": "",
        "src/x.tmp": "",
        "src/nested.log": "",
    }
    for name, text in layout.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    whole = _write(tmp_path / "whole.tar", context_tar_of(root, Matcher([])))
    with BuildContext.from_file(whole, MAX) as ctx:
        ctx.apply_dockerignore("Dockerfile")
        assert tree_paths(ctx) == context_paths(root)


def context_tar_of(root: Path, matcher: Matcher) -> bytes:
    out = io.BytesIO()
    write_context_tar(out, root, matcher)
    return out.getvalue()
