"""Pure parts of the registry core: search ranking, page tokens, etcd key layout, flags."""

from __future__ import annotations

import argparse

import pytest

from berthd.common.config import add_flag, env_name, split_host_port
from berthd.common.errors import InvalidArgument
from berthd.registry.core import decode_token, encode_token, page_size, rank_repositories
from berthd.registry.metadata import TAGS, RepoRecord, split_child_key, tag_key


def repo(name: str, description: str = "", **labels: str) -> RepoRecord:
    return RepoRecord(name, 0.0, 0.0, description, labels)


def test_search_ranks_name_prefix_then_name_then_description_then_labels() -> None:
    records = [
        repo("z/uses-redis-client", "talks to redis"),
        repo("db/redis"),
        repo("cache/store", "a Redis-compatible store"),
        repo("tools/misc", team="redis-ops"),
        repo("web/nginx"),
    ]
    names = [r.name for r in rank_repositories(records, "Redis", {}, 0)]
    assert names == ["db/redis", "z/uses-redis-client", "cache/store", "tools/misc"]


def test_search_label_filter_and_limit() -> None:
    records = [repo(f"r/{n}", os="linux" if n % 2 else "windows") for n in range(10)]
    found = rank_repositories(records, "", {"os": "linux"}, 3)
    assert [r.name for r in found] == ["r/1", "r/3", "r/5"]


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    assert decode_token(encode_token("lib/a@v1")) == "lib/a@v1"
    assert decode_token("") is None
    with pytest.raises(InvalidArgument, match="page token"):
        decode_token("%%%")
    assert page_size(0) == 100 and page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


def test_child_keys_are_unambiguous_for_nested_repositories() -> None:
    assert tag_key("a/b", "v1") == f"{TAGS}a/b@v1"
    assert split_child_key(tag_key("a/b", "v1"), TAGS) == ("a/b", "v1")
    # `a@` is not a prefix of `a/b@...`: one repository's tags never include a nested one's.
    assert not tag_key("a/b", "v1").startswith(f"{TAGS}a@")


def test_flags_take_defaults_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("--data-dir", "registry") == "BERTH_REGISTRY_DATA_DIR"
    monkeypatch.setenv("BERTH_LEASE_TTL", "42")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--lease-ttl", default=10, type=int, help="ttl")
    assert parser.parse_args([]).lease_ttl == 42
    assert parser.parse_args(["--lease-ttl", "7"]).lease_ttl == 7
    assert split_host_port("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="host:port"):
        split_host_port("nohost")
