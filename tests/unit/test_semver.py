"""Semver ranges a service follows: parse, match, pick (berth.semver)."""

from __future__ import annotations

import pytest

from berth.semver import InvalidRange, parse_range, parse_version

TAGS = ["1.4.2", "1.4.3", "1.5.0", "1.4.10-rc.1", "latest", "prod", "2.0.0", "v2.1.0", "0.4.7"]


def pick(range_text: str, tags: list[str] = TAGS) -> str | None:
    found = parse_range(range_text).pick(tags)
    return None if found is None else found[0]


@pytest.mark.parametrize(
    "range_text, expected",
    [
        ("~1.4", "1.4.3"),  # not 1.5.0, not the 1.4.10 pre-release
        ("~1.4.3", "1.4.3"),
        ("~1", "1.5.0"),
        ("^1", "1.5.0"),
        ("^1.4", "1.5.0"),
        ("^2", "v2.1.0"),  # the `v` prefix parses
        ("^0.4", "0.4.7"),
        (">=1.2,<2", "1.5.0"),
        (">=1.2 <2", "1.5.0"),
        (">= 1.2, < 1.5", "1.4.3"),
        ("<1.4 || >=2.1", "v2.1.0"),
        ("1.4.2", "1.4.2"),
        ("1.4", "1.4.3"),  # a partial version is its x-range
        (">1.4", "v2.1.0"),
        ("<=1.4", "1.4.3"),
        ("^3", None),
    ],
)
def test_pick_highest_matching(range_text: str, expected: str | None) -> None:
    assert pick(range_text) == expected


def test_prerelease_only_when_the_range_names_one_of_the_same_version() -> None:
    tags = ["1.4.9", "1.4.10-rc.1", "1.4.10-rc.2", "1.5.0-beta.1"]
    assert pick("~1.4", tags) == "1.4.9"
    assert pick(">=1.4.10-rc.1", tags) == "1.4.10-rc.2"  # never 1.5.0-beta.1
    assert pick(">=1.4.10-rc.1 <1.4.10-rc.2", tags) == "1.4.10-rc.1"


def test_prerelease_order_follows_semver() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11"]
    versions = [parse_version(t) for t in [*ordered, "1.0.0"]]
    assert versions == sorted(versions)  # type: ignore[type-var]


def test_same_version_prefers_the_plain_tag_and_ignores_build_metadata() -> None:
    assert pick("^1", ["v1.2.0", "1.2.0"]) == "1.2.0"
    assert pick("^1", ["1.2.0+build.7", "1.1.0"]) == "1.2.0+build.7"


@pytest.mark.parametrize("tag", ["latest", "1.4", "01.2.3", "1.2.3-", "V1.2.3", "1.2.3.4"])
def test_tags_that_are_not_versions(tag: str) -> None:
    assert parse_version(tag) is None


@pytest.mark.parametrize(
    "range_text, said",
    [
        ("", "it is empty"),
        ("~", '"~" is not a version comparator'),
        ("~1.x", '"~1.x" is not a version comparator'),
        (">=1.2,,foo", '"foo" is not a version comparator'),
        ("1.2 ||", "an empty alternative"),
        ("=>1", '"=>1" is not a version comparator'),
    ],
)
def test_invalid_ranges_are_refused_with_invalid_argument(range_text: str, said: str) -> None:
    with pytest.raises(InvalidRange) as caught:
        parse_range(range_text)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert said in caught.value.message
    assert "\n" not in caught.value.message
