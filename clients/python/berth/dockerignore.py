"""Which files of a build context count: `.dockerignore` as Docker reads and applies it. The
client uses it to send less; the builder applies the same rules to the context it received
(berthd.builder.context), so what a client sent beyond them is never seen.

Written from the behaviour of moby/patternmatcher (the pattern language, `!` exceptions, the last
matching rule wins, a pattern that matches a directory matches everything in it) and of
BuildKit's context walker (tonistiigi/fsutil): an excluded directory is skipped unless an
exception may re-include something inside it; then it is walked, and sent only when something
inside it is. Paths are relative to the context and `/`-separated, without a leading `/`.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from berth.errors import BerthClientError

IGNORE_FILE = ".dockerignore"
DEFAULT_DOCKERFILE = "Dockerfile"
_BOM = "\ufeff"
# Characters that make an exception pattern more than a plain path (fsutil's patternChars):
# with one of them, any excluded directory may hold something it re-includes.
_GLOB_CHARS = frozenset("*[]?^\\")


class _BadPattern(ValueError):
    """A pattern Go's filepath.Match would reject (ErrBadPattern)."""


# --- reading ----------------------------------------------------------------------------------


def clean(path: str) -> str:
    """Go's filepath.Clean on a `/` path: no `.`, `..` resolved, no doubled or trailing `/`."""
    cleaned = posixpath.normpath(path)
    # POSIX keeps a leading "//"; Go does not.
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def read_patterns(text: str) -> list[str]:
    """The patterns of a .dockerignore file, normalized as Docker does (ignorefile.ReadAll):
    `#` comment lines and blank lines dropped, whitespace trimmed, paths cleaned, a leading `/`
    removed (patterns are relative to the context), `!` kept in front."""
    patterns = []
    for line in text.removeprefix(_BOM).splitlines():
        if line.startswith("#"):  # only at the very start: "  #x" is a pattern
            continue
        pattern = line.strip()
        if not pattern:
            continue
        exception = pattern.startswith("!")
        if exception:
            pattern = pattern[1:].strip()
        if pattern:
            pattern = clean(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append("!" + pattern if exception else pattern)
    return patterns


# --- patterns ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """One rule: `text` is the cleaned pattern without its `!`."""

    text: str
    exception: bool
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        return self.regex.fullmatch(path) is not None

    @property
    def plain_prefix(self) -> str:
        """The pattern without a trailing `/**` or `/*` (fsutil's patternWithoutTrailingGlob)."""
        return self.text.removesuffix("/**").removesuffix("/*")


def compile_pattern(rule: str) -> Pattern:
    """A rule as Docker reads it: `*` and `?` never cross a `/`, `**` crosses any number of
    directories (also none), `[...]` is a class (`^` negates), `\\` escapes the next character.
    Raises BerthClientError for a malformed pattern, as Docker refuses to build with one."""
    text = clean(rule.strip())
    exception = text.startswith("!")
    if exception:
        if text == "!":
            raise BerthClientError(
                'invalid .dockerignore pattern "!": it names nothing to re-include',
                "INVALID_ARGUMENT",
            )
        text = text[1:]
    try:
        regex = re.compile(_translate(text), re.DOTALL)
    except (_BadPattern, re.error) as err:
        raise BerthClientError(
            f'invalid .dockerignore pattern "{rule.strip()}": {err}', "INVALID_ARGUMENT"
        ) from None
    return Pattern(text, exception, regex)


def _translate(pattern: str) -> str:
    """The pattern as a regular expression for re.fullmatch."""
    rest = pattern[2:]
    if pattern.startswith("**") and not rest.startswith("/") and not set("*?[]\\") & set(rest):
        # moby matches "**" and a plain rest as a suffix: "**file" also matches "dirfile".
        return ".*" + re.escape(rest)
    out: list[str] = []
    i, end = 0, len(pattern)
    while i < end:
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < end and pattern[i] == "/":
                i += 1  # "**/" is "**": it may also stand for no directory at all
            out.append(".*" if i == end else "(?:.*/)?")
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            i, char_class = _char_class(pattern, i)
            out.append(char_class)
            continue
        elif ch == "\\":
            i += 1
            if i == end:
                raise _BadPattern("it ends with an unescaped \\")
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _char_class(pattern: str, start: int) -> tuple[int, str]:
    """The `[...]` at start, by filepath.Match's grammar: the index after it and its regex."""
    i = start + 1
    negate = pattern.startswith("^", i)
    if negate:
        i += 1
    parts: list[str] = []
    while True:
        if i >= len(pattern):
            raise _BadPattern("a [ is not closed")
        if pattern[i] == "]" and parts:
            return i + 1, "[" + ("^" if negate else "") + "".join(parts) + "]"
        low, i = _class_char(pattern, i)
        if pattern.startswith("-", i):
            high, i = _class_char(pattern, i + 1)
            if high < low:
                raise _BadPattern(f"the range {low}-{high} is reversed")
            parts.append(f"{re.escape(low)}-{re.escape(high)}")
        else:
            parts.append(re.escape(low))


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern):
        raise _BadPattern("a [ is not closed")
    ch = pattern[i]
    if ch in "-]":
        raise _BadPattern(f"unexpected {ch} in a [...] class")
    if ch == "\\":
        i += 1
        if i >= len(pattern):
            raise _BadPattern("a [ is not closed")
        ch = pattern[i]
    return ch, i + 1


# --- matching ---------------------------------------------------------------------------------

MatchInfo = tuple[bool, ...]  # per pattern: whether it matched the path (so its children too)


class Matcher:
    """The rules of one .dockerignore, in order; later rules win."""

    def __init__(self, rules: Iterable[str]) -> None:
        self.patterns = [compile_pattern(rule) for rule in rules if rule.strip()]
        exceptions = [p for p in self.patterns if p.exception]
        self._exception_prefixes = [p.plain_prefix + "/" for p in exceptions]
        self._has_exceptions = bool(exceptions)
        self._glob_exceptions = any(_GLOB_CHARS & set(p.plain_prefix) for p in exceptions)

    def match(self, path: str, parent: MatchInfo | None = None) -> tuple[bool, MatchInfo]:
        """Whether path is excluded, and what its children need to know of it.

        `parent` is what matching the path's directory returned (None at the top, or when
        unknown: then every parent directory is tried). A rule that matched a directory
        matches everything inside it (moby's MatchesUsingParentResults)."""
        excluded = False
        info = [False] * len(self.patterns)
        for i, pattern in enumerate(self.patterns):
            hit = bool(parent and parent[i])
            if not hit:
                # An exclusion cannot change an excluded path, nor an exception a kept one.
                if pattern.exception != excluded:
                    continue
                hit = pattern.matches(path)
                if not hit and parent is None:
                    hit = any(pattern.matches(d) for d in _ancestors(path))
            info[i] = hit
            if hit:
                excluded = not pattern.exception
        return excluded, tuple(info)

    def excluded(self, path: str) -> bool:
        """Whether path (relative, `/`-separated) is left out of the context."""
        return self.match(clean(path))[0]

    def may_include_under(self, directory: str) -> bool:
        """Whether an exception may re-include something inside an excluded directory: then
        the walk goes into it. Plain exceptions say exactly where; a glob may match anywhere."""
        if not self._has_exceptions:
            return False
        if self._glob_exceptions:
            return True
        prefix = directory + "/"
        return any(p.startswith(prefix) for p in self._exception_prefixes)


def _ancestors(path: str) -> Iterator[str]:
    """The directories above a path: "a" and "a/b" for "a/b/c"."""
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


# --- the context ------------------------------------------------------------------------------


def escape(path: str) -> str:
    """A path as a pattern that matches just it."""
    return "".join("\\" + ch if ch in _GLOB_CHARS else ch for ch in path)


def ignore_file_names(dockerfile: str | None) -> list[str]:
    """The ignore files BuildKit looks for, in order, as paths in the context: the first that
    exists is used. `<Dockerfile>.dockerignore` next to the Dockerfile, then `.dockerignore`
    at the top of the context."""
    return [f"{dockerfile}{IGNORE_FILE}", IGNORE_FILE] if dockerfile else [IGNORE_FILE]


def ignore_file(context_dir: Path, dockerfile: str | None) -> Path:
    """The ignore file BuildKit uses: `<Dockerfile>.dockerignore` next to the Dockerfile when
    there is one, else `.dockerignore` at the top of the context."""
    *specific, default = ignore_file_names(dockerfile)
    for name in specific:
        if (context_dir / name).is_file():
            return context_dir / name
    return context_dir / default


def ignore_matcher(text: str, ignore_path: str, dockerfile: str | None) -> Matcher:
    """The rules of an ignore file's `text`, plus exceptions that always keep the Dockerfile
    (its path in the context; None when it comes from elsewhere) and the ignore file itself
    (`ignore_path`, in the context), as Docker does. The client (what to send) and the
    builder (what a context it received holds) both use it."""
    always = [ignore_path, *([dockerfile] if dockerfile else [])]
    return Matcher([*read_patterns(text), *("!" + escape(clean(p)) for p in always)])


def context_matcher(context_dir: Path, dockerfile: str | None = DEFAULT_DOCKERFILE) -> Matcher:
    """The rules for sending context_dir: its ignore file's, plus exceptions that always send
    the Dockerfile (its path in the context; None when it comes from elsewhere) and the ignore
    file itself, as the Docker CLI does."""
    path = ignore_file(context_dir, dockerfile)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Matcher([])
    except UnicodeDecodeError as err:
        raise BerthClientError(
            f"{path} is not UTF-8 text: {err.reason}", "INVALID_ARGUMENT"
        ) from None
    return ignore_matcher(text, path.relative_to(context_dir).as_posix(), dockerfile)


@dataclass(frozen=True)
class ContextEntry:
    """One file, directory or symlink to send: its path in the context and its lstat."""

    path: str
    source: str  # where it is on disk
    lstat: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.lstat.st_mode)


def walk_context(context_dir: Path, matcher: Matcher) -> Iterator[ContextEntry]:
    """What the context holds after the rules, in lexical order, each directory before its
    contents. Symlinks are entries of their own, never followed."""
    yield from _walk(str(context_dir), "", matcher, None, [], False)


def _walk(
    directory: str,
    prefix: str,
    matcher: Matcher,
    parent: MatchInfo | None,
    pending: list[ContextEntry],
    excluded_dir: bool,
) -> Iterator[ContextEntry]:
    """Entries under directory. `pending` holds the excluded directories walked into, above
    this point and not yet sent: they go out just before the first entry sent inside them."""
    try:
        with os.scandir(directory) as scan:
            children = sorted(scan, key=lambda e: e.name)
    except PermissionError:
        if excluded_dir:  # nothing of an unreadable excluded directory was wanted anyway
            return
        raise
    for child in children:
        entry = ContextEntry(prefix + child.name, child.path, child.stat(follow_symlinks=False))
        excluded, info = matcher.match(entry.path, parent)
        if excluded:
            if entry.is_dir and matcher.may_include_under(entry.path):
                pending.append(entry)
                yield from _walk(child.path, entry.path + "/", matcher, info, pending, True)
                if pending and pending[-1] is entry:  # nothing inside it was sent
                    pending.pop()
            continue
        yield from pending
        pending.clear()
        yield entry
        if entry.is_dir:
            yield from _walk(child.path, entry.path + "/", matcher, info, pending, False)


def context_paths(context_dir: Path, dockerfile: str | None = DEFAULT_DOCKERFILE) -> list[str]:
    """The paths `berth build` would send from context_dir."""
    return [e.path for e in walk_context(context_dir, context_matcher(context_dir, dockerfile))]
