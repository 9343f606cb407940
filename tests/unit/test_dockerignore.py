""".dockerignore as Docker applies it: reading, the pattern language, exceptions, and which
paths of a context are sent. Cases marked "moby" come from moby/patternmatcher's own tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.dockerignore import (
    Matcher,
    compile_pattern,
    context_matcher,
    context_paths,
    read_patterns,
    walk_context,
)
from berth.errors import BerthClientError


def make_tree(root: Path, files: dict[str, str]) -> Path:
    """Files (and directories, for names ending in /) under root."""
    for name, content in files.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return root


# --- reading ----------------------------------------------------------------------------------


def test_read_patterns_normalizes_like_docker() -> None:
    text = (
        "\ufefftest1\n"
        "/test2\n"
        "/a/file/here\n"
        "\n"
        "lastfile\n"
        "# this is a comment\n"
        "! /inverted/abs/path\n"
        "  #not a comment  \n"
        "./dir//sub/../x/\n"
        "build/\r\n"
        "/\n"
    )
    assert read_patterns(text) == [
        "test1",
        "test2",
        "a/file/here",
        "lastfile",
        "!inverted/abs/path",
        "#not a comment",
        "dir/x",
        "build",
        "/",
    ]


@pytest.mark.parametrize("rule", ["!", "[", "a[", "[^bc", "[]a]", "[-x]", "[x-]", "[a-b-c]", "\\"])
def test_malformed_patterns_are_refused(rule: str) -> None:
    with pytest.raises(BerthClientError) as caught:
        compile_pattern(rule)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "invalid .dockerignore pattern" in caught.value.message


# --- one pattern ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "path", "excluded"),
    [
        # * and ? stay within one path component
        ("*.log", "a.log", True),
        ("*.log", "dir/a.log", False),
        ("a*/b", "abc/b", True),
        ("a*/b", "a/c/b", False),
        ("abc?def", "abcZdef", True),
        ("abc?def", "abcdef", False),
        ("a?b", "a/b", False),
        # ** crosses any number of directories, also none (moby)
        ("**", "dir/file", True),
        ("**/*.txt", "file.txt", True),
        ("**/**/*.txt", "dir/dir/file.txt", True),
        ("**/**/*.txt2", "dir/dir/file.txt", False),
        ("**/dir2/*", "dir/dir2/file", True),
        ("**/foo/bar", "foo/bar", True),
        ("**/foo/bar", "dir/dir2/foo/bar", True),
        ("**/.foo", "bar.foo", False),
        ("**file", "dir/dir/file", True),
        ("**file", "dirfile", True),  # moby's suffix match
        ("a**/*.txt", "a/dir/dir/file.txt", True),
        ("abc/**", "abc", False),
        ("abc/**", "abc/def/ghi", True),
        ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
        # classes and escapes
        ("a[b-d]e", "ace", True),
        ("a[b-d]e", "aae", False),
        ("a[^b-d]e", "aze", True),
        ("ab[^c]", "abc", False),
        ("[\\]a]", "]", True),
        ("[x\\-]", "-", True),
        ("[x\\-]", "z", False),
        ("[a-\u03b6]*", "\u03b1", True),  # a Greek range and letter
        ("a\\*b", "a*b", True),
        ("a\\*b", "ab", False),
        # regex characters are literal
        (".*", ".foo", True),
        (".*", "foo", False),
        ("abc.def", "abcZdef", False),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
        # a pattern that matches a directory matches what is inside it
        ("docs", "docs/README.md", True),
        ("docs/", "docs/a/b", True),
        ("a*", "ab/c", True),
        ("**/dir", "dir/file", True),
        # leading / and ./ are relative to the context
        ("/build", "build/out", True),
        ("./build", "build/out", True),
        ("/build", "src/build", False),
    ],
)
def test_single_pattern(rule: str, path: str, excluded: bool) -> None:
    assert Matcher(read_patterns(rule)).excluded(path) is excluded


# --- several patterns -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        (["*.go", "!fileutils.go"], "fileutils.go", False),
        (["!fileutils.go", "*.go"], "fileutils.go", True),  # the later rule wins
        (["docs", "!docs/README.md"], "docs/README.md", False),
        (["docs", "!docs/README.md"], "docs/other.md", True),
        (["docs/*", "!docs/README.md"], "docs/README.md", False),
        (["**", "!util/docker/web"], "util/docker/web/foo", False),
        (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
        (["**", "!dist/*.whl"], "dist/x-1.0-py3-none-any.whl", False),
        (["*.md", "!README*.md", "README-secret.md"], "README.md", False),
        (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
    ],
)
def test_exceptions(rules: list[str], path: str, excluded: bool) -> None:
    assert Matcher(rules).excluded(path) is excluded


def test_walking_into_an_excluded_directory_needs_an_exception_inside_it() -> None:
    plain = Matcher(["build", "!build/keep", "!other/x"])
    assert plain.may_include_under("build")
    assert not plain.may_include_under("dist")
    assert not Matcher(["build"]).may_include_under("build")
    # an exception with a glob may match anywhere: every excluded directory is walked
    assert Matcher(["build", "!**/*.keep"]).may_include_under("dist")


# --- the context ------------------------------------------------------------------------------


def test_walk_sends_sorted_entries_and_excluded_dirs_only_for_what_they_hold(
    tmp_path: Path,
) -> None:
    make_tree(
        tmp_path,
        {
            "Dockerfile": "FROM scratch\n",
            ".dockerignore": "build\n*.log\n!keep.log\ncache\n!cache/**/*.keep\n",
            "app.py": "",
            "debug.log": "",
            "keep.log": "",
            "build/out.bin": "",
            "build/sub/deep": "",
            "cache/a/b.keep": "",
            "cache/a/c.tmp": "",
            "cache/empty/": "",
            "src/z.py": "",
            "src/a.py": "",
            "src/nested.log": "",
        },
    )
    assert context_paths(tmp_path) == [
        ".dockerignore",
        "Dockerfile",
        "app.py",
        "cache",
        "cache/a",
        "cache/a/b.keep",
        "keep.log",
        "src",
        "src/a.py",
        "src/nested.log",  # *.log is for the top level only
        "src/z.py",
    ]


def test_an_included_child_reincludes_its_excluded_parents(tmp_path: Path) -> None:
    make_tree(tmp_path, {"Dockerfile": "", "a/b/c": "", "a/b/d": "", "a/e": ""})
    (tmp_path / ".dockerignore").write_text("a\n!a/b/c\n")
    assert context_paths(tmp_path) == [".dockerignore", "Dockerfile", "a", "a/b", "a/b/c"]


def test_dockerfile_and_ignore_file_are_always_sent(tmp_path: Path) -> None:
    make_tree(tmp_path, {"docker/app.Dockerfile": "", "docker/other": "", "src/x": ""})
    (tmp_path / ".dockerignore").write_text("*\n")
    assert context_paths(tmp_path, "docker/app.Dockerfile") == [
        ".dockerignore",
        "docker",
        "docker/app.Dockerfile",
    ]
    # a Dockerfile sent as text (None) is not forced in
    assert context_paths(tmp_path, None) == [".dockerignore"]


def test_a_dockerfile_specific_ignore_file_wins(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {
            "Dockerfile": "",
            "app.Dockerfile": "",
            "app.Dockerfile.dockerignore": "a\n",
            ".dockerignore": "b\n",
            "a": "",
            "b": "",
        },
    )
    assert "a" not in context_paths(tmp_path, "app.Dockerfile")
    assert "b" in context_paths(tmp_path, "app.Dockerfile")
    assert "a" in context_paths(tmp_path, "Dockerfile")
    assert "b" not in context_paths(tmp_path, "Dockerfile")


def test_no_ignore_file_sends_everything_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    make_tree(tmp_path, {"Dockerfile": "", "real/file": ""})
    (tmp_path / "link").symlink_to("real")
    entries = list(walk_context(tmp_path, context_matcher(tmp_path)))
    assert [e.path for e in entries] == ["Dockerfile", "link", "real", "real/file"]
    link = entries[1]
    assert not link.is_dir and Path(link.source).is_symlink()


def test_a_bad_pattern_in_the_ignore_file_fails(tmp_path: Path) -> None:
    make_tree(tmp_path, {"Dockerfile": "", ".dockerignore": "ok\nsrc/[a\n"})
    with pytest.raises(BerthClientError, match=r'pattern "src/\[a"'):
        context_matcher(tmp_path)
