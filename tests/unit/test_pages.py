"""berthd.common.pages: the one page size rule and page token of every List and Search."""

from __future__ import annotations

import pytest

from berth.cluster.v1 import cluster_pb2
from berthd.common.errors import InvalidArgument
from berthd.common.pages import (
    decode_token,
    encode_token,
    page_size,
    paginate,
    request_scope,
    scope_of,
)


def test_tokens_round_trip_and_belong_to_their_scope() -> None:
    assert decode_token(encode_token("tags:a", "v1"), "tags:a") == ["v1"]
    assert decode_token(encode_token("s", 3, "lib/a"), "s") == [3, "lib/a"]
    assert decode_token("", "s") is None
    for garbage in ("%%%", "bm90IGpzb24", encode_token("s")):
        with pytest.raises(InvalidArgument, match="page_token") as failed:
            decode_token(garbage, "s")
        assert failed.value.reason == "INVALID_PAGE_TOKEN"
        assert failed.value.details.field_violations[0][0] == "page_token"
    with pytest.raises(InvalidArgument, match="another call or other filters"):
        decode_token(encode_token("tags:a", "v1"), "tags:b")


def test_page_size_defaults_caps_and_refuses_negatives() -> None:
    assert page_size(0) == 100 and page_size(7) == 7 and page_size(5000) == 1000
    with pytest.raises(InvalidArgument) as failed:
        page_size(-1)
    assert failed.value.details.field_violations[0][0] == "page_size"


def test_scopes_tell_filters_apart() -> None:
    assert scope_of("registry.Search", "a", {"k": "v"}) == scope_of(
        "registry.Search", "a", {"k": "v"}
    )
    assert scope_of("registry.Search", "a") != scope_of("registry.Search", "b")
    one = cluster_pb2.ListContainersRequest(all=True, page_size=5, page_token="x")
    same = cluster_pb2.ListContainersRequest(all=True)
    other = cluster_pb2.ListContainersRequest(all=False)
    assert request_scope("c", one) == request_scope("c", same) != request_scope("c", other)


def test_paginate_walks_a_listing_and_refuses_a_token_of_other_filters() -> None:
    items = list(range(7))
    request = cluster_pb2.ListContainersRequest(all=True, page_size=3)
    seen: list[int] = []
    while True:
        page, token = paginate("cluster.ListContainers", request, items)
        seen += page
        if not token:
            break
        request.page_token = token
    assert seen == items
    _, token = paginate(
        "cluster.ListContainers", cluster_pb2.ListContainersRequest(page_size=3), items
    )
    with pytest.raises(InvalidArgument, match="other filters"):
        paginate(
            "cluster.ListContainers",
            cluster_pb2.ListContainersRequest(all=True, page_size=3, page_token=token),
            items,
        )
