"""Docker's COPY/ADD source rules over a file tree (the build context or an image), and the
sources' part of a step's cache key.

A source is a path relative to the tree's root (a leading `/` changes nothing; `..` may not climb
out), possibly with wildcards in Go's `filepath.Match` syntax (`*`, `?`, `[a-z]`, `[^a]`, `\\`
escapes), matched one path component at a time as BuildKit does: `*` never crosses a `/`, and
names starting with `.` are matched like any other. A source naming a symlink is followed; a
directory source stands for its contents.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from berthd.builder.errors import COPY_FAILED
from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import quoted

from .fstree import Entry, Parts, SymlinkLoop, Tree, clean_parts, escapes, join

_META = "*?["


@dataclass(frozen=True)
class SourceMatch:
    """One path a COPY/ADD source matched, and what is to be copied from there."""

    source: str  # the source as written in the Dockerfile
    path: str  # the matched path relative to the root ("" is the root); names a copied file
    # The match itself first (path ""; symlinks followed), then, for a directory, everything
    # under it, sorted, with paths relative to the match. Symlinks inside are not followed.
    entries: tuple[tuple[str, Entry], ...]
    line: int  # the instruction's Dockerfile line, for errors found later (copy_layer)
    instruction: str  # COPY or ADD

    @property
    def entry(self) -> Entry:
        return self.entries[0][1]


def step_error(line: int, instruction: str, message: str) -> InvalidArgument:
    """An error of a COPY/ADD step, in Docker's words: `Dockerfile:<line>: COPY failed: ...`
    (reason COPY_FAILED; WORKDIR's --chown-like lookup of USER uses it too)."""
    return InvalidArgument(
        f"Dockerfile:{line}: {instruction} failed: {message}",
        reason=COPY_FAILED if instruction in ("COPY", "ADD") else "",
        metadata={"line": line},
    )


def match_sources(
    tree: Tree, sources: Sequence[str], line: int, instruction: str, where: str
) -> list[SourceMatch]:
    """The matches of every source, in order; `where` names the tree in errors ("build
    context"). A source that matches nothing, or climbs out of the root, is InvalidArgument."""
    matches: list[SourceMatch] = []
    for source in sources:
        relative = source.lstrip("/")
        if escapes(relative):
            raise step_error(line, instruction, f"forbidden path outside the {where}: {source}")
        parts = clean_parts(relative)
        pattern = _has_meta(relative)
        try:
            paths = _glob(tree, parts, source, line, instruction) if pattern else [parts]
            found = [
                SourceMatch(source, "/".join(path), entries, line, instruction)
                for path in paths
                if (entries := _entries(tree, path))
            ]
        except SymlinkLoop as e:
            raise step_error(line, instruction, f"{source}: {e}") from None
        if not found:
            raise step_error(line, instruction, f"file not found in {where}: {source}")
        matches.extend(found)
    return matches


def sources_digest(matches: Iterable[SourceMatch]) -> str:
    """sha256 over what the matches copy: paths, types, modes, owners, link targets, xattrs and
    content digests, in match order (a later source overwrites an earlier one). Modification
    times are left out, like BuildKit: touching a file does not invalidate the cache."""
    h = hashlib.sha256()
    for match in matches:
        for path, e in match.entries:
            record = [
                join(match.path, path),
                e.type.decode(),
                e.mode,
                e.uid,
                e.gid,
                e.linkname,
                e.devmajor,
                e.devminor,
                e.xattrs,
                e.data.digest() if e.data is not None else "",
            ]
            h.update(json.dumps(record, separators=(",", ":")).encode() + b"\n")
    return f"sha256:{h.hexdigest()}"


def _entries(tree: Tree, path: Parts) -> tuple[tuple[str, Entry], ...]:
    try:
        _, node = tree.resolve(path)
    except NotADirectoryError:
        return ()
    return tuple(tree.walk(node)) if node is not None else ()


def _glob(tree: Tree, parts: Parts, source: str, line: int, instruction: str) -> list[Parts]:
    """Paths matching `parts` component by component, sorted, as BuildKit's wildcards do."""
    patterns = []
    for name in parts:
        try:
            patterns.append(compile_pattern(name) if _has_meta(name) else None)
        except ValueError:
            raise step_error(
                line, instruction, f"invalid pattern {quoted(source)}: syntax error in pattern"
            ) from None
    found: list[Parts] = [()]
    for name, pattern in zip(parts, patterns, strict=True):
        if pattern is None:
            found = [(*path, name) for path in found]
            continue
        matched: list[Parts] = []
        for path in found:
            try:
                _, node = tree.resolve(path)
            except NotADirectoryError:
                continue
            if node is not None and node.children is not None:
                names = sorted(n for n in node.children if pattern.fullmatch(n))
                matched.extend((*path, n) for n in names)
        found = matched
    return found


def _has_meta(pattern: str) -> bool:
    escaped = False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in _META:
            return True
    return False


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A regex equivalent to Go's `filepath.Match(pattern, name)` for one path component.
    Raises ValueError where Go returns ErrBadPattern."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i + 1 == n:
                raise ValueError("trailing backslash")
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            cls, i = _char_class(pattern, i + 1)
            out.append(cls)
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _char_class(pattern: str, i: int) -> tuple[str, int]:
    """The regex of a `[...]` class starting after its `[`, and the index after its `]`."""
    negate = pattern.startswith("^", i)
    if negate:
        i += 1
    ranges: list[str] = []
    first = True
    while True:
        if i < len(pattern) and pattern[i] == "]" and not first:
            i += 1
            break
        lo, i = _class_char(pattern, i)
        hi = lo
        if pattern.startswith("-", i):
            hi, i = _class_char(pattern, i + 1)
        if lo <= hi:  # Go accepts an inverted range, which matches nothing
            ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
        first = False
    if not ranges:
        return ("[^/]" if negate else "(?!)"), i
    return f"[{'^' if negate else ''}{''.join(ranges)}]", i


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    """One possibly escaped character of a class, as Go's getEsc reads it."""
    if i >= len(pattern) or pattern[i] in "-]":
        raise ValueError("bad character class")
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise ValueError("bad escape in character class")
    return pattern[i], i + 1
