"""Rollouts' state machine: the failure ratio, the failure actions, the parallelism bound, the
previous spec swapped back, and the events a rollback makes. Pure functions, no etcd."""

from __future__ import annotations

import re

import pytest

from berthd.cluster.controller import DRAIN_SECONDS, REMOVE, SURGE, UPDATE, WITHDRAW, reconcile
from berthd.cluster.core import ClusterNode, ContainerView
from berthd.cluster.events import (
    SERVICE_ROLLBACK_COMPLETED,
    SERVICE_ROLLBACK_PAUSED,
    SERVICE_ROLLBACK_STARTED,
    EventTracker,
)
from berthd.cluster.rollout import (
    CONTINUE,
    ROLLBACK,
    ROLLBACK_COMPLETED,
    ROLLBACK_PAUSED,
    ROLLBACK_STARTED,
    START_FIRST,
    RolloutConfig,
    remember_previous,
    swap_to_previous,
)
from berthd.cluster.services import COMPLETED, PAUSED, UPDATING, ServiceRecord, validate
from berthd.common.containers import ContainerConfig
from berthd.common.errors import FailedPrecondition, InvalidArgument
from berthd.common.state.containers import ContainerStatus, service_of_name
from berthd.common.state.nodes import NodeRecord
from berthd.common.store import WatchEvent

NOW = 1000.0


def service(replicas: int = 4, **kw) -> ServiceRecord:
    template = ContainerConfig(
        image=kw.pop("image", "app:1"), restart_policy="always", network_mode="front"
    )
    kw.setdefault("monitor_seconds", 1.0)
    return ServiceRecord(id="s" * 64, name="web", template=template, replicas=replicas, **kw)


def updated(record: ServiceRecord, **spec) -> ServiceRecord:
    """`record` after UpdateService to version+1 with the spec fields in `spec`."""
    new = ServiceRecord.from_json(record.to_json())
    remember_previous(new)
    for name, value in spec.items():
        setattr(new, name, value)
    new.version += 1
    new.update_state = UPDATING
    return new


def replica(record: ServiceRecord, slot: int, version: int, state: str = "running", **status):
    desired = record.replica(slot, "a")
    desired.service_version = version
    return ContainerView(desired, ContainerStatus(state=state, started_at=NOW - 60, **status))


# What takes a replica out of service: the drain's first step or the replacement itself.
STOPS = (UPDATE, WITHDRAW)
NODES = {
    "a": ClusterNode(id="a", record=NodeRecord("a", cpus=64, memory_bytes=1 << 40), ready=True)
}


def test_failures_under_the_ratio_go_on_and_over_it_pause() -> None:
    # 4 replicas, ratio 0.3: one failure (0.25) is tolerated, a second (0.5) pauses.
    record = updated(service(max_failure_ratio=0.3, parallelism=2), template=ContainerConfig("x"))
    views = [
        replica(record, 1, 2, state="exited", exit_code=1),
        replica(record, 2, 2),
        replica(record, 3, 1),
        replica(record, 4, 1),
    ]
    plan = reconcile([record], views, NODES, NOW)
    assert plan.update_states[record.id] == (UPDATING, "")
    assert plan.failures[record.id] == [views[0].id]
    # The failed replica holds no slot of the batch: two outdated replicas roll.
    assert sorted(a.slot for a in plan.actions if a.kind in STOPS) == [3, 4]
    record.update_failures = plan.failures[record.id]
    views[1] = replica(record, 2, 2, state="exited", exit_code=2)
    plan = reconcile([record], views, NODES, NOW)
    assert plan.update_states[record.id] == (PAUSED, "replica web.2 exited with code 2")
    assert not [a for a in plan.actions if a.kind in STOPS]


def test_continue_goes_on_past_every_failure() -> None:
    record = updated(service(failure_action=CONTINUE), template=ContainerConfig("x"))
    views = [replica(record, 1, 2, state="exited", exit_code=1)]
    views += [replica(record, s, 1) for s in (2, 3, 4)]
    plan = reconcile([record], views, NODES, NOW)
    assert plan.update_states[record.id][0] == UPDATING
    assert [a.slot for a in plan.actions if a.kind in STOPS] == [2]


def test_rollback_action_asks_for_the_previous_spec_and_a_failed_rollback_pauses() -> None:
    record = updated(service(failure_action=ROLLBACK), template=ContainerConfig("bad:2"))
    views = [replica(record, 1, 2, state="exited", exit_code=1)]
    views += [replica(record, s, 1) for s in (2, 3, 4)]
    plan = reconcile([record], views, NODES, NOW)
    assert plan.rollbacks == {record.id: (2, "rolled back: replica web.1 exited with code 1")}
    assert plan.actions == []  # nothing more of the bad version rolls
    # The swap: the previous spec is the spec, at a new version, rolled with rollback_config.
    swap_to_previous(record, "rolled back: replica web.1 exited with code 1")
    assert (record.template.image, record.version, record.update_state) == (
        "app:1",
        3,
        ROLLBACK_STARTED,
    )
    assert record.previous is not None and record.previous["template"]["image"] == "bad:2"
    # Replicas still on version 1 run the restored spec: only the failed one is replaced.
    plan = reconcile([record], views, NODES, NOW)
    assert [(a.kind, a.slot) for a in plan.actions] == [(UPDATE, 1)]
    # A replica of the restored spec that fails too pauses the rollback (no rollback loop).
    views[0] = replica(record, 1, 3, state="exited", exit_code=1)
    plan = reconcile([record], views, NODES, NOW)
    assert plan.rollbacks == {}
    assert plan.update_states[record.id] == (ROLLBACK_PAUSED, "replica web.1 exited with code 1")


def test_rollback_completes_and_uses_the_rollback_config() -> None:
    # As Swarm: the rollback config of the spec returned to.
    base = service(rollback_config=RolloutConfig(parallelism=3, monitor_seconds=0))
    record = updated(base, template=ContainerConfig("bad:2"), rollback_config=RolloutConfig())
    swap_to_previous(record, "manually requested rollback")
    views = [replica(record, s, 2) for s in (1, 2, 3, 4)]
    plan = reconcile([record], views, NODES, NOW)
    assert sorted(a.slot for a in plan.actions if a.kind in STOPS) == [1, 2, 3]
    done = [replica(record, s, 3) for s in (1, 2)] + [replica(record, s, 1) for s in (3, 4)]
    plan = reconcile([record], done, NODES, NOW)
    assert plan.actions == []
    assert plan.update_states[record.id] == (ROLLBACK_COMPLETED, "rollback completed")


@pytest.mark.parametrize("parallelism", [1, 2])
def test_at_most_parallelism_replicas_are_out_of_service(parallelism: int) -> None:
    """From any state the rollout can be in (up to `parallelism` new replicas still within
    their monitor time), a pass never brings the replicas updating or not yet counted past
    `parallelism`: each UPDATE takes one out of service."""
    record = updated(service(parallelism=parallelism), template=ContainerConfig("x"))
    for settled_new in range(5):
        for starting_new in range(min(5 - settled_new, parallelism + 1)):
            views = [replica(record, s, 2) for s in range(1, settled_new + 1)]
            for s in range(settled_new + 1, settled_new + starting_new + 1):
                view = replica(record, s, 2)
                assert view.status is not None
                view.status.started_at = NOW  # not settled: still within monitor
                views.append(view)
            views += [replica(record, s, 1) for s in range(len(views) + 1, 5)]
            plan = reconcile([record], views, NODES, NOW)
            updates = sum(1 for a in plan.actions if a.kind in STOPS)
            assert starting_new + updates <= parallelism


def test_no_previous_spec_and_bad_configs_are_refused() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        swap_to_previous(service(), "manually requested rollback")
    assert caught.value.reason == "NO_PREVIOUS_SPEC"
    for bad in (
        service(max_failure_ratio=1.5),
        service(rollback_config=RolloutConfig(parallelism=0)),
        service(failure_action="explode"),
    ):
        with pytest.raises(InvalidArgument):
            validate(bad)


def test_a_rollback_swaps_back_and_forth_keeping_spec_versions() -> None:
    v1 = service()
    v2 = updated(v1, template=ContainerConfig("app:2"))
    swap_to_previous(v2, "manually requested rollback")  # version 3 = version 1's spec
    assert v2.spec_versions == [1] and v2.previous_versions == [2]
    swap_to_previous(v2, "manually requested rollback")  # version 4 = version 2's spec
    assert v2.template.image == "app:2" and v2.spec_versions == [2]
    assert ServiceRecord.from_json(v2.to_json()) == v2  # survives its JSON


def test_events_say_rollback() -> None:
    tracker = EventTracker()
    tracker.load([])
    key = f"cluster/services/{'s' * 64}"
    record = updated(service(), template=ContainerConfig("bad:2"))
    tracker.feed(WatchEvent("put", key, record.to_json()))
    swap_to_previous(record, "rolled back: replica web.1 is unhealthy")
    (event,) = tracker.feed(WatchEvent("put", key, record.to_json()))
    assert event.type == SERVICE_ROLLBACK_STARTED and "unhealthy" in event.message
    record.update_state = ROLLBACK_COMPLETED
    (event,) = tracker.feed(WatchEvent("put", key, record.to_json()))
    assert (event.type, event.version) == (SERVICE_ROLLBACK_COMPLETED, 3)
    record.update_state, record.update_message = ROLLBACK_PAUSED, "replica web.1 exited"
    (event,) = tracker.feed(WatchEvent("put", key, record.to_json()))
    assert event.type == SERVICE_ROLLBACK_PAUSED
    record.update_state = COMPLETED  # not a rollback's outcome: no rollback event
    assert all(e.type != SERVICE_ROLLBACK_COMPLETED for e in tracker.feed(
        WatchEvent("put", key, record.to_json())
    ))  # fmt: skip


def test_a_stack_sees_no_change_in_the_rollout_defaults_the_cluster_fills_in() -> None:
    """A second `stack deploy` compares its spec with the cluster's: the update and rollback
    configs the cluster returns (stop-first, pause, parallelism 1) are no difference."""
    from berth.cluster.v1 import cluster_pb2 as pb
    from berth.stack.deploy import differences
    from berth.types.v1 import container_pb2
    from berthd.cluster.service import record_from_spec, service_message

    desired = pb.ServiceSpec(
        name="web", replicas=2, template=container_pb2.ContainerSpec(image="app:1")
    )
    desired.placement.request.SetInParent()  # as a stack's plan sends it
    desired.update_config.max_failure_ratio = 0.2
    current = service_message(record_from_spec(desired), 0).spec
    assert differences(desired, current) == []
    desired.update_config.failure_action = pb.UPDATE_FAILURE_ACTION_ROLLBACK
    assert differences(desired, current) != []


def test_start_first_starts_beside_the_old_replica_and_stops_it_once_the_new_one_serves() -> None:
    template = ContainerConfig("app:2", network_mode="front")  # drained: the mesh reaches it
    record = updated(service(2, update_order=START_FIRST), template=template)
    old1, old2 = replica(record, 1, 1), replica(record, 2, 1)
    plan = reconcile([record], [old1, old2], NODES, NOW)
    # The new replica for slot 1 starts beside the old one (no container leaves).
    assert [(a.kind, a.slot, a.container) for a in plan.actions] == [(SURGE, 1, "")]
    new1 = replica(record, 1, 2, health={"status": "starting"})
    new1.desired.name = record.replica(1, "a", beside=True).name
    assert new1.status is not None
    new1.status.started_at = NOW
    # Starting: the old replica keeps serving, and slot 2 waits (parallelism 1).
    assert reconcile([record], [old1, new1, old2], NODES, NOW).actions == []
    # Healthy: the old one is taken out of traffic, then removed once drained.
    new1.status.health = {"status": "healthy"}
    plan = reconcile([record], [old1, new1, old2], NODES, NOW)
    assert [(a.kind, a.container) for a in plan.actions] == [(WITHDRAW, old1.id)]
    old1.desired.withdrawn_at = NOW - DRAIN_SECONDS
    plan = reconcile([record], [old1, new1, old2], NODES, NOW)
    assert [(a.kind, a.container) for a in plan.actions] == [(REMOVE, old1.id)]
    # Slot 2 rolls once slot 1's new replica counts as updated (monitor), not before.
    assert reconcile([record], [new1, old2], NODES, NOW).actions == []
    new1.status.started_at = NOW - 2
    plan = reconcile([record], [new1, old2], NODES, NOW)
    assert [(a.kind, a.slot) for a in plan.actions] == [(SURGE, 2)]
    assert record.id not in plan.update_states or plan.update_states[record.id][0] == UPDATING


def test_start_first_keeps_the_old_replica_when_the_new_one_fails() -> None:
    record = updated(
        service(2, update_order=START_FIRST, failure_action=ROLLBACK),
        template=ContainerConfig("bad:2"),
    )
    old1, old2 = replica(record, 1, 1), replica(record, 2, 1)
    new1 = replica(record, 1, 2, health={"status": "unhealthy"})
    plan = reconcile([record], [old1, new1, old2], NODES, NOW)
    assert plan.rollbacks == {record.id: (2, "rolled back: replica web.1 is unhealthy")}
    # The old replica was never out of traffic, nor is it now.
    assert all(a.container != old1.id and a.kind != WITHDRAW for a in plan.actions)
    # Rolled back: the old replica is current again; the failed new one goes, no drain (it
    # served nothing), the old one untouched.
    swap_to_previous(record, "rolled back")
    plan = reconcile([record], [old1, new1, old2], NODES, NOW)
    assert [(a.kind, a.container) for a in plan.actions] == [(REMOVE, new1.id)]


def test_a_start_first_replica_has_a_name_of_its_own() -> None:
    name = service().replica(2, "a", beside=True).name
    assert re.fullmatch(r"web\.2\.[0-9a-f]{12}", name)
    assert service_of_name(name) == service_of_name("web.2") == "web"
    assert service_of_name("web") == service_of_name("my.app") == ""
