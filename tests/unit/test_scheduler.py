"""berthd.cluster.scheduler without servers: filter, score, the aggregated refusal, replicas."""

from __future__ import annotations

import dataclasses
import random

import pytest

from berthd.cluster.scheduler import (
    NodeView,
    Request,
    filter_nodes,
    format_bytes,
    format_cpus,
    parse_constraint,
    parse_constraints,
    place,
    place_replicas,
)
from berthd.common.errors import FailedPrecondition, InvalidArgument

MiB = 1 << 20
GiB = 1 << 30


def node(
    node_id: str,
    *,
    labels: dict[str, str] | None = None,
    cpu: int = 4000,
    memory: int = 8 * GiB,
    used_cpu: int = 0,
    used_memory: int = 0,
    ready: bool = True,
    cordoned: bool = False,
    layers: dict[str, int] | None = None,
    containers: int = 0,
) -> NodeView:
    return NodeView(
        id=node_id,
        labels=labels or {},
        cpus_millis=cpu,
        memory_bytes=memory,
        allocated_cpu_millis=used_cpu,
        allocated_memory_bytes=used_memory,
        ready=ready,
        cordoned=cordoned,
        layer_bytes=layers or {},
        container_count=containers,
    )


def busy(node_id: str, fraction: float, **kwargs) -> NodeView:
    """A 4-CPU, 8 GiB node with `fraction` of both allocated."""
    return node(
        node_id, used_cpu=int(4000 * fraction), used_memory=int(8 * GiB * fraction), **kwargs
    )


def request(*constraints: str, cpu: int = 0, memory: int = 0, layers=None) -> Request:
    return Request(
        cpu_millis=cpu,
        memory_bytes=memory,
        constraints=parse_constraints(constraints),
        image_layers=layers or {},
    )


def ids(nodes: list[NodeView]) -> list[str]:
    return [n.id for n in nodes]


# --- spread ---------------------------------------------------------------------------------


def test_place_picks_the_least_allocated_node():
    nodes = [busy("a", 0.5), busy("b", 0.1), busy("c", 0.3)]
    assert place(nodes, request(cpu=500, memory=256 * MiB)).id == "b"


def test_allocation_is_compared_as_a_fraction_of_capacity():
    # "big" has more allocated in absolute terms but is far less full.
    small = node("small", cpu=1000, memory=1 * GiB, used_cpu=500, used_memory=512 * MiB)
    big = node("big", cpu=16000, memory=64 * GiB, used_cpu=2000, used_memory=4 * GiB)
    assert place([small, big], request(cpu=100, memory=64 * MiB)).id == "big"


def test_requests_without_resources_spread_by_container_count():
    nodes = [node("a", containers=2), node("b", containers=0), node("c", containers=1)]
    assert place(nodes, request()).id == "b"


def test_ties_go_to_the_smallest_node_id_whatever_the_order():
    nodes = [node("c"), node("a"), node("b")]
    for _ in range(5):
        random.shuffle(nodes)
        assert place(nodes, request(cpu=100)).id == "a"


def test_successive_placements_spread_over_three_nodes():
    nodes = [node("a"), node("b"), node("c")]
    placed = []
    for _ in range(3):
        chosen = place(nodes, request(cpu=1000, memory=1 * GiB))
        chosen.allocated_cpu_millis += 1000
        chosen.allocated_memory_bytes += 1 * GiB
        placed.append(chosen.id)
    assert placed == ["a", "b", "c"]


# --- constraints ------------------------------------------------------------------------------


ZONED = [
    node("a", labels={"zone": "a", "disk": "ssd"}),
    node("b", labels={"zone": "b", "disk": "hdd"}),
    node("c", labels={"zone": "a"}),
    node("d", labels={}),
]


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        (["zone==a"], ["a", "c"]),
        (["node.labels.zone==a"], ["a", "c"]),
        (["zone!=a"], ["b", "d"]),  # a missing label is "not a"
        (["disk==ssd"], ["a"]),  # a missing label is not "ssd"
        (["disk!=hdd"], ["a", "c", "d"]),
        (["zone==a", "disk!=hdd", "node.id!=a"], ["c"]),
        (["node.id==b"], ["b"]),
        (["rack==1"], []),
    ],
)
def test_label_constraints(constraints, expected):
    fit, rejections = filter_nodes(ZONED, request(*constraints))
    assert ids(fit) == expected
    assert sorted(rejections) == sorted({"a", "b", "c", "d"} - set(expected))


def test_constraint_rejection_names_the_constraint_as_written():
    _, rejections = filter_nodes(ZONED, request("disk!=hdd", "node.labels.zone == a"))
    assert str(rejections["b"]) == "does not match constraint disk!=hdd"
    assert str(rejections["d"]) == "does not match constraint node.labels.zone==a"


def test_constraints_beat_spread():
    nodes = [busy("a", 0.9, labels={"zone": "a"}), busy("b", 0.0, labels={"zone": "b"})]
    assert place(nodes, request("zone==a", cpu=100)).id == "a"


def test_parse_constraint_forms():
    c = parse_constraint("  node.labels.zone  ==  a ")
    assert (c.key, c.op, c.value, str(c)) == ("zone", "==", "a", "node.labels.zone==a")
    c = parse_constraint("node.id!=n1")
    assert (c.key, c.op, c.value) == ("node.id", "!=", "n1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zone=a", r'"zone=a": use == or != \(a single = is not an operator\)'),
        ("", r'invalid placement constraint "": expected key==value or key!=value'),
        ("zone==", r'"zone==": expected key==value or key!=value, for example zone==a'),
        ("==a", r'"==a": expected key==value'),
        ("zone==a==b", r'"zone==a==b": expected key==value'),
        ("zone<>a", r'"zone<>a": expected key==value'),
        ("zone==a b", r'"zone==a b": expected key==value'),
        ("node.labels.==a", r"node.labels. needs a label key"),
        ("node.hostname==h1", r'unsupported placement constraint key "node.hostname"'),
    ],
)
def test_invalid_constraints_are_rejected_clearly(text, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_constraint(text)


# --- resources and the refusal message --------------------------------------------------------


def test_resources_must_fit_exactly_up_to_free():
    full = node("a", memory=1 * GiB, used_memory=512 * MiB, cpu=1000, used_cpu=500)
    assert place([full], request(cpu=500, memory=512 * MiB)).id == "a"
    with pytest.raises(FailedPrecondition):
        place([full], request(cpu=500, memory=512 * MiB + 1))
    with pytest.raises(FailedPrecondition):
        place([full], request(cpu=501, memory=1))


def test_refusal_aggregates_reasons_like_kubernetes():
    nodes = [
        node("a", labels={"zone": "a"}, memory=1 * GiB, used_memory=768 * MiB),
        node("b", labels={"zone": "a"}, memory=1 * GiB, used_memory=900 * MiB),
        node("c", labels={"zone": "b"}),
    ]
    with pytest.raises(FailedPrecondition) as info:
        place(nodes, request("zone==a", memory=512 * MiB))
    assert str(info.value) == (
        "0/3 nodes are available: 2 insufficient memory (need 512MiB, free 256MiB on the best), "
        "1 does not match constraint zone==a"
    )
    # For programs: reason NO_SUITABLE_NODE and one NODE_UNSUITABLE violation per node.
    details = info.value.details
    assert (details.reason, details.metadata) == (
        "NO_SUITABLE_NODE", {"nodes": "3", "available": "0"},
    )  # fmt: skip
    assert [(v.type, v.subject, v.description) for v in details.violations] == [
        ("NODE_UNSUITABLE", "node/a", "insufficient memory (need 512MiB, free 256MiB)"),
        ("NODE_UNSUITABLE", "node/b", "insufficient memory (need 512MiB, free 124MiB)"),
        ("NODE_UNSUITABLE", "node/c", "does not match constraint zone==a"),
    ]


def test_refusal_lists_every_kind_of_reason():
    nodes = [
        node("a", ready=False),
        node("b", cordoned=True),
        node("c", cpu=2000, used_cpu=1500),
        node("d", memory=1 * GiB, used_memory=1 * GiB),
    ]
    _, rejections = filter_nodes(nodes, request(cpu=1500, memory=1))
    assert {k: str(v) for k, v in rejections.items()} == {
        "a": "not ready",
        "b": "cordoned",
        "c": "insufficient cpu (need 1.5 CPUs, free 0.5 CPUs)",
        "d": "insufficient memory (need 1B, free 0B)",
    }
    with pytest.raises(FailedPrecondition) as info:
        place(nodes, request(cpu=1500, memory=1))
    assert str(info.value) == (
        "0/4 nodes are available: 1 cordoned, 1 insufficient cpu (need 1.5 CPUs, free 0.5 CPUs), "
        "1 insufficient memory (need 1B, free 0B), 1 not ready"
    )


def test_refusal_without_nodes():
    with pytest.raises(FailedPrecondition, match="0/0 nodes are available: no node has joined"):
        place([], request())


def test_negative_requests_are_invalid():
    with pytest.raises(InvalidArgument, match="cannot be negative"):
        Request(memory_bytes=-1)


def test_units():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536 * MiB, 3 << 40)] == [
        "0B",
        "1023B",
        "1KiB",
        "1.5GiB",
        "3TiB",
    ]
    assert [format_cpus(n) for n in (250, 1000, 2000)] == ["0.25 CPUs", "1 CPU", "2 CPUs"]


# --- node states ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [{"ready": False}, {"cordoned": True}])
def test_not_ready_and_cordoned_nodes_are_never_chosen(state):
    # The excluded node is the emptiest and holds the image: it would win otherwise.
    layers = {"sha256:l1": 2 * GiB}
    excluded = node("a", layers=layers, **state)
    other = busy("b", 0.9)
    assert place([excluded, other], request(cpu=100, layers=layers)).id == "b"
    assert place_replicas([excluded, other], request(cpu=100), 2) == [other, other]


# --- image locality ---------------------------------------------------------------------------


BIG_IMAGE = {"sha256:base": 800 * MiB, "sha256:app": 224 * MiB}  # 1 GiB


def test_locality_wins_when_allocations_are_close():
    nodes = [busy("a", 0.2), busy("b", 0.3, layers=dict(BIG_IMAGE))]
    assert place(nodes, request(cpu=100, layers=BIG_IMAGE)).id == "b"


def test_locality_loses_when_the_node_is_much_busier():
    nodes = [busy("a", 0.2), busy("b", 0.8, layers=dict(BIG_IMAGE))]
    assert place(nodes, request(cpu=100, layers=BIG_IMAGE)).id == "a"


def test_locality_of_a_small_image_barely_counts():
    small = {"sha256:tiny": 10 * MiB}
    nodes = [busy("a", 0.2), busy("b", 0.25, layers=dict(small))]
    assert place(nodes, request(cpu=100, layers=small)).id == "a"


def test_locality_counts_bytes_not_layers():
    # "a" holds one of two layers but most of the bytes.
    nodes = [
        busy("a", 0.3, layers={"sha256:base": 1}),
        busy("b", 0.3, layers={"sha256:app": 1}),
    ]
    nodes.reverse()
    assert place(nodes, request(cpu=100, layers=BIG_IMAGE)).id == "a"


# --- replicas ---------------------------------------------------------------------------------


def test_replicas_go_to_distinct_nodes_first():
    # "big" would win every single placement on spread alone.
    nodes = [node("big", cpu=64000, memory=256 * GiB), node("m1"), node("m2")]
    chosen = place_replicas(nodes, request(cpu=500, memory=512 * MiB), 3)
    assert sorted(ids(chosen)) == ["big", "m1", "m2"]
    assert ids(place_replicas(nodes, request(cpu=500), 6)).count("big") == 2


def test_replicas_of_a_large_image_do_not_pile_on_the_node_holding_it():
    nodes = [node("a", layers=dict(BIG_IMAGE)), node("b"), node("c")]
    chosen = place_replicas(nodes, request(layers=BIG_IMAGE), 4)
    assert ids(chosen)[0] == "a"
    assert sorted(ids(chosen)) == ["a", "a", "b", "c"]


def test_replicas_account_resources_and_leave_the_callers_nodes_alone():
    nodes = [node(n, memory=1 * GiB, used_memory=256 * MiB) for n in ("a", "b", "c")]
    before = [dataclasses.replace(n) for n in nodes]
    chosen = place_replicas(nodes, request(memory=512 * MiB), 3)
    assert ids(chosen) == ["a", "b", "c"]
    assert chosen[0] is nodes[0]
    assert nodes == before
    with pytest.raises(FailedPrecondition) as info:
        place_replicas(nodes, request(memory=512 * MiB), 4)
    assert str(info.value) == (
        "only 3 of 4 replicas fit: 0/3 nodes are available: "
        "3 insufficient memory (need 512MiB, free 256MiB on the best)"
    )


def test_replicas_account_cpu():
    """Three 600m replicas do not fit on two 1000m nodes: each placement takes its CPU."""
    nodes = [node(n, cpu=1000) for n in ("a", "b")]
    assert ids(place_replicas(nodes, request(cpu=600), 2)) == ["a", "b"]
    with pytest.raises(FailedPrecondition) as info:
        place_replicas(nodes, request(cpu=600), 3)
    assert str(info.value) == (
        "only 2 of 3 replicas fit: 0/2 nodes are available: "
        "2 insufficient cpu (need 0.6 CPUs, free 0.4 CPUs on the best)"
    )


def test_replica_count_validation():
    assert place_replicas([node("a")], request(), 0) == []
    with pytest.raises(InvalidArgument, match="cannot be negative"):
        place_replicas([node("a")], request(), -1)
