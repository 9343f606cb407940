"""Semantic versions in tags, and the ranges a service follows (`--follow 'semver:~1.4'`).

The range grammar is npm's (what Flux's image automation and Keel take): comparators
`=`, `>`, `>=`, `<`, `<=`, `~`, `^` and bare versions, joined by `,` or spaces (all must hold),
alternatives joined by `||`. A partial version fills in zeros (`>=1.2` is `>=1.2.0`), `~1.4` is
`>=1.4.0,<1.5.0`, `^2` is `>=2.0.0,<3.0.0`, `^0.4` is `>=0.4.0,<0.5.0`. A tag is a version when
it parses as SemVer 2.0 with an optional `v` (`v1.4.3`, `1.4.3-rc.1+build.5`); other tags are
passed over. A pre-release matches only a range whose comparator names a pre-release of the same
`major.minor.patch` (npm's rule: `>=1.5.0-rc.1` takes `1.5.0-rc.2`, never `1.6.0-rc.1`), so a
release range never picks a release candidate. Build metadata is ignored in order and matching.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from berth.errors import InvalidArgumentError

_NUM = r"0|[1-9][0-9]*"
_IDENT = r"[0-9A-Za-z-]+"
_VERSION_RE = re.compile(
    rf"v?(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?:\+{_IDENT}(?:\.{_IDENT})*)?"
)
# A comparator's version may be partial: `1`, `1.4`, `v1.4.2-rc.1`.
_PARTIAL_RE = re.compile(
    rf"v?(?P<major>{_NUM})(?:\.(?P<minor>{_NUM})(?:\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?)?)?(?:\+{_IDENT}(?:\.{_IDENT})*)?"
)
_COMPARATOR_RE = re.compile(r"(?P<op>>=|<=|>|<|=|~|\^)?\s*(?P<version>\S+)")
MAX_RANGE_LENGTH = 256


class InvalidRange(InvalidArgumentError):
    """A semver range that does not parse."""


@dataclass(frozen=True, order=True)
class Version:
    """A SemVer 2.0 version, ordered by its precedence (`pre` = () for a release)."""

    major: int
    minor: int
    patch: int
    # SemVer's pre-release order: a release sorts after its pre-releases; numeric
    # identifiers sort numerically and before alphanumeric ones.
    key: tuple[tuple[int, int | str], ...] = ((2, 0),)
    pre: str = ""

    @property
    def core(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        return f"{text}-{self.pre}" if self.pre else text


def _version(major: int, minor: int, patch: int, pre: str | None) -> Version:
    if not pre:
        return Version(major, minor, patch)
    key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return Version(major, minor, patch, key, pre)


def parse_version(tag: str) -> Version | None:
    """The version a tag names (`1.4.3`, `v1.4.3`, `2.0.0-rc.1`), or None for other tags."""
    m = _VERSION_RE.fullmatch(tag)
    if m is None:
        return None
    return _version(int(m["major"]), int(m["minor"]), int(m["patch"]), m["pre"])


@dataclass(frozen=True)
class _Comparator:
    op: str  # one of >=, >, <, <=, =
    version: Version

    def holds(self, v: Version) -> bool:
        if self.op == "=":
            return v == self.version
        if self.op == ">=":
            return v >= self.version
        if self.op == ">":
            return v > self.version
        if self.op == "<":
            return v < self.version
        return v <= self.version


@dataclass(frozen=True)
class Range:
    """A parsed range: any of `alternatives`, each a set of comparators that must all hold."""

    text: str
    alternatives: tuple[tuple[_Comparator, ...], ...]

    def matches(self, version: Version) -> bool:
        return any(self._set_matches(s, version) for s in self.alternatives)

    @staticmethod
    def _set_matches(comparators: tuple[_Comparator, ...], version: Version) -> bool:
        if not all(c.holds(version) for c in comparators):
            return False
        if not version.pre:
            return True
        # npm: a pre-release only through a comparator naming one of the same core version.
        return any(c.version.pre and c.version.core == version.core for c in comparators)

    def pick(self, tags: Iterable[str]) -> tuple[str, Version] | None:
        """The tag with the highest matching version; None when no tag matches. Two tags of
        one version (`1.4.3`, `v1.4.3`) pick the one without `v` (then the first by name)."""
        best: tuple[Version, bool, str] | None = None
        for tag in sorted(tags):
            version = parse_version(tag)
            if version is None or not self.matches(version):
                continue
            candidate = (version, not tag.startswith("v"), tag)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
        return None if best is None else (best[2], best[0])


def parse_range(text: str) -> Range:
    """A Range from npm's grammar; InvalidRange (INVALID_ARGUMENT) naming what is wrong."""
    if not text.strip():
        raise InvalidRange("invalid semver range: it is empty (e.g. semver:~1.4)")
    if len(text) > MAX_RANGE_LENGTH:
        raise InvalidRange(f"invalid semver range: over {MAX_RANGE_LENGTH} characters")
    alternatives = []
    for part in text.split("||"):
        comparators: list[_Comparator] = []
        items = [i for i in re.split(r"[,\s]+", _join_operators(part.strip())) if i]
        if not items:
            raise InvalidRange(f'invalid semver range "{text}": an empty alternative around ||')
        for item in items:
            comparators += _comparators(item, text)
        alternatives.append(tuple(comparators))
    return Range(text, tuple(alternatives))


def _join_operators(part: str) -> str:
    """`>= 1.2` -> `>=1.2`: an operator may be followed by spaces."""
    return re.sub(r"(>=|<=|>|<|=|~|\^)\s+", r"\1", part)


def _comparators(item: str, text: str) -> list[_Comparator]:
    m = _COMPARATOR_RE.fullmatch(item)
    version = _PARTIAL_RE.fullmatch(m["version"]) if m else None
    if m is None or version is None:
        raise InvalidRange(
            f'invalid semver range "{text}": "{item}" is not a version comparator '
            "(use e.g. ~1.4, ^2, >=1.2,<2)"
        )
    op = m["op"] or "="
    major = int(version["major"])
    minor = None if version["minor"] is None else int(version["minor"])
    patch = None if version["patch"] is None else int(version["patch"])
    low = _version(major, minor or 0, patch or 0, version["pre"])
    if op == "~":
        # ~1 is 1.x; ~1.4 and ~1.4.2 stay in 1.4.
        high = (major + 1, 0, 0) if minor is None else (major, minor + 1, 0)
        return [_Comparator(">=", low), _Comparator("<", _version(*high, None))]
    if op == "^":
        # The first non-zero part of the version given stays fixed.
        if major or minor is None:
            high = (major + 1, 0, 0)
        elif minor or patch is None:
            high = (0, minor + 1, 0)
        else:
            high = (0, 0, patch + 1)
        return [_Comparator(">=", low), _Comparator("<", _version(*high, None))]
    if minor is None or patch is None:
        # A partial version with an operator is the range it stands for (npm's x-ranges).
        high = (
            _version(major + 1, 0, 0, None)
            if minor is None
            else _version(major, minor + 1, 0, None)
        )
        return {
            "=": [_Comparator(">=", low), _Comparator("<", high)],
            ">=": [_Comparator(">=", low)],
            ">": [_Comparator(">=", high)],
            "<": [_Comparator("<", low)],
            "<=": [_Comparator("<", high)],
        }[op]
    return [_Comparator(op, low)]
