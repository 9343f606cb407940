"""Pure helpers of the cluster core: joining desired state with node status, resolving
references, building node views, allocation arithmetic, list filters, endpoints."""

from __future__ import annotations

import pytest

from berthd.cluster.core import (
    CORDONED,
    ContainerView,
    allocation_after,
    build_nodes,
    endpoint_view,
    filter_containers,
    join_status,
    resolve,
)
from berthd.common.containers import ContainerConfig
from berthd.common.errors import InvalidArgument, NotFound
from berthd.common.state.containers import STOPPED, ContainerStatus, DesiredContainer
from berthd.common.state.endpoints import ENDPOINTS
from berthd.common.state.nodes import NodeRecord


def desired(cid: str, name: str, node: str = "n1", at: float = 0.0, **kw) -> DesiredContainer:
    config = ContainerConfig(image="busybox", name=name, labels=kw.pop("labels", {}))
    return DesiredContainer(id=cid, name=name, node=node, config=config, scheduled_at=at, **kw)


def test_join_status_pairs_by_id_newest_first() -> None:
    old, new = desired("a" * 64, "old", at=1), desired("b" * 64, "new", at=2)
    views = join_status([old, new], {"a" * 64: ContainerStatus(state="running")})
    assert [v.name for v in views] == ["new", "old"]
    assert views[0].status is None and views[1].state == "running"


def test_join_status_says_whether_the_node_is_ready() -> None:
    up, down = desired("a" * 64, "up", node="n1"), desired("b" * 64, "down", node="n2")
    running = ContainerStatus(state="running")
    views = join_status([up, down], {"a" * 64: running, "b" * 64: running}, {"n1"})
    assert {v.name: v.node_ready for v in views} == {"up": True, "down": False}
    assert all(v.node_ready for v in join_status([up, down], {}))  # not known: ready


def test_resolve_by_id_then_name_then_unique_prefix() -> None:
    views = [
        ContainerView(desired("ab" + "0" * 62, "web")),
        ContainerView(desired("ac" + "0" * 62, "ab")),  # a name that looks like a prefix
    ]
    assert resolve("ab" + "0" * 62, views).name == "web"
    assert resolve("ab", views).name == "ab"  # a name wins over an id prefix
    assert resolve("ac", views).name == "ab"
    with pytest.raises(InvalidArgument, match="ambiguous"):
        resolve("a", views)
    with pytest.raises(NotFound, match="no such container: zz"):
        resolve("zz", views)
    with pytest.raises(InvalidArgument):
        resolve("", views)


def test_build_nodes_marks_lost_nodes_not_ready_and_counts_containers() -> None:
    nodes = build_nodes(
        {"n1": NodeRecord("n1", cpus=2, memory_bytes=1000, labels={"zone": "a"})},
        {"n1": {"cpu_millis": 500, "memory_bytes": 100}, "gone": {"cpu_millis": 1}},
        {"n1": CORDONED},
        [desired("a" * 64, "x", "n1"), desired("b" * 64, "y", "n1"), desired("c" * 64, "z", "n3")],
    )
    assert sorted(nodes) == ["gone", "n1", "n3"]
    n1 = nodes["n1"].view()
    assert (n1.ready, n1.cordoned, n1.container_count) == (True, True, 2)
    assert (n1.cpus_millis, n1.free_cpu_millis, n1.free_memory_bytes) == (2000, 1500, 900)
    assert n1.labels == {"zone": "a"}
    assert not nodes["gone"].ready and nodes["n3"].container_count == 1
    assert nodes["gone"].record == NodeRecord("gone") and nodes["gone"].address == ""


def test_allocation_after_adds_and_never_goes_negative() -> None:
    added = allocation_after(None, 250, 64, 1)
    assert added == {"cpu_millis": 250, "memory_bytes": 64, "containers": 1}
    assert allocation_after(added, -500, -64, -1) == {
        "cpu_millis": 0,
        "memory_bytes": 0,
        "containers": 0,
    }


def test_filter_containers() -> None:
    running = ContainerView(
        desired("a" * 64, "web-1", "n1", labels={"app": "web"}), ContainerStatus(state="running")
    )
    exited = ContainerView(desired("b" * 64, "web-2", "n2"), ContainerStatus(state="exited"))
    pending = ContainerView(desired("c" * 64, "db", "n2"))
    stopped_pending = ContainerView(desired("d" * 64, "old", "n2", desired=STOPPED))
    views = [running, exited, pending, stopped_pending]
    assert filter_containers(views) == [running, pending]
    assert len(filter_containers(views, include_stopped=True)) == 4
    assert filter_containers(views, include_stopped=True, name="web", node_id="n2") == [exited]
    assert filter_containers(views, labels={"app": "web"}) == [running]
    assert filter_containers(views, include_stopped=True, state="exited") == [exited]


def test_endpoint_view() -> None:
    raw = b'{"address":"10.0.0.1:5050","metrics":"http://x/metrics","version":"0.1"}'
    endpoint = endpoint_view(ENDPOINTS.decode("registry/host-1", raw))
    assert (endpoint.kind, endpoint.instance, endpoint.address) == (
        "registry",
        "host-1",
        "10.0.0.1:5050",
    )
    assert endpoint.metrics_url == "http://x/metrics"
