"""The chaos test's logic without servers: the seeded schedule and the invariant checks."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from tests.chaos.invariants import (
    Acknowledged,
    check_build_containers,
    check_containers,
    check_errors,
    check_failed_builds,
    check_image_records,
    check_pushes,
    check_rebuilds,
    check_registry_files,
    check_scratch,
    check_service,
)
from tests.chaos.schedule import COMPONENTS, CUT, HOSTS, KILL, Fault, can_overlap, generate


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    assert generate(7, 600) == generate(7, 600)
    assert generate(7, 600) != generate(8, 600)
    # A longer run begins with the shorter one's faults: CHAOS_MINUTES does not reshuffle.
    short, long = generate(7, 120), generate(7, 600)
    assert long[: len(short)] == short


def groups(faults: list[Fault]) -> list[list[Fault]]:
    """Faults grouped by overlap: a fault that begins before the one before ends joins it."""
    found: list[list[Fault]] = []
    for fault in faults:
        if found and fault.at < max(f.end for f in found[-1]):
            found[-1].append(fault)
        else:
            found.append([fault])
    return found


def test_groups_of_faults_come_one_after_another_within_the_length() -> None:
    for seed in range(50):
        faults = generate(seed, 300)
        assert faults and faults == sorted(faults, key=lambda f: f.at)
        for before, after in itertools.pairwise(groups(faults)):
            assert after[0].at > max(f.end for f in before)
            assert after[0].at < 300
        for f in faults:
            assert f.duration > 0
            assert (f.action, f.target) in [(KILL, c) for c in COMPONENTS] + [
                (CUT, h) for h in HOSTS
            ]


def test_some_faults_overlap_and_each_recovery_still_works_during_the_other() -> None:
    found = [g for seed in range(50) for g in groups(generate(seed, 300))]
    pairs = [g for g in found if len(g) == 2]
    assert all(len(g) <= 2 for g in found)
    assert 0.15 < len(pairs) / len(found) < 0.45
    for first, second in pairs:
        assert first.at < second.at < first.end
        assert can_overlap((first.action, first.target), (second.action, second.target))
    kinds = {(a.action, b.action) for a, b in pairs}
    assert kinds == {(KILL, KILL), (KILL, CUT), (CUT, KILL), (CUT, CUT)}
    # A link cut while etcd is down; never another restart that would need etcd.
    assert any((KILL, "etcd") in {(a.action, a.target), (b.action, b.target)} for a, b in pairs)


def test_what_may_not_overlap() -> None:
    assert not can_overlap((KILL, "etcd"), (KILL, "registry"))
    assert not can_overlap((KILL, "builder"), (KILL, "etcd"))
    assert can_overlap((KILL, "etcd"), (CUT, "host2"))
    assert not can_overlap((KILL, "node-host2"), (CUT, "host2"))
    assert not can_overlap((CUT, "host2"), (KILL, "node-host2"))
    assert can_overlap((CUT, "host1"), (KILL, "node-host2"))
    assert not can_overlap((CUT, "host1"), (CUT, "host1"))
    assert can_overlap((CUT, "host1"), (CUT, "host3"))
    assert can_overlap((KILL, "builder"), (KILL, "cluster-1"))


def test_every_kind_of_fault_is_drawn() -> None:
    drawn = {(f.action, f.target) for seed in range(20) for f in generate(seed, 600)}
    assert drawn == {(KILL, c) for c in COMPONENTS} | {(CUT, h) for h in HOSTS}
    assert any(f.duration > 30 for seed in range(20) for f in generate(seed, 600))


JOURNAL = [
    {"op": "push", "ref": "chaos/p1:1", "digest": "sha256:a"},
    {"op": "push", "ref": "chaos/p2:1", "digest": "sha256:b"},
    {"op": "run", "id": "c1", "name": "chaos-run-1", "image": "x"},
    {"op": "run", "id": "c2", "name": "chaos-run-2", "image": "x"},
    {"op": "run", "id": "c3", "name": "chaos-run-3", "image": "x"},
    {"op": "removed", "id": "c3"},
    {"op": "error", "what": "run", "code": "UNAVAILABLE", "message": "etcd is unreachable"},
    {"op": "build", "ref": "chaos/b1:1", "digest": "sha256:c", "context": "/c/b1"},
    {
        "op": "build",
        "ref": "chaos/b3:1",
        "digest": "sha256:c",
        "context": "/c/b1",
        "rebuild_of": "chaos/b1:1",
        "want": "sha256:c",
    },
    {
        "op": "error",
        "what": "build",
        "code": "UNAVAILABLE",
        "message": "cannot reach the builder",
        "ref": "chaos/b2:1",
        "seconds": 3.0,
    },
]


def test_acknowledged_from_the_journal() -> None:
    acked = Acknowledged.from_journal(JOURNAL)
    # An acknowledged build is a push the registry must honor.
    assert acked.pushes == {
        "chaos/p1:1": "sha256:a",
        "chaos/p2:1": "sha256:b",
        "chaos/b1:1": "sha256:c",
        "chaos/b3:1": "sha256:c",
    }
    assert [b["ref"] for b in acked.builds] == ["chaos/b1:1", "chaos/b3:1"]
    assert [b["ref"] for b in acked.failed_builds] == ["chaos/b2:1"]
    assert set(acked.runs) == {"c1", "c2", "c3"} and acked.removed == {"c3"}
    assert acked.error_codes() == {"run:UNAVAILABLE": 1, "build:UNAVAILABLE": 1}


def test_a_rebuild_must_give_the_same_image() -> None:
    acked = Acknowledged.from_journal(JOURNAL)
    assert check_rebuilds(acked.builds) == []
    acked.builds[1]["digest"] = "sha256:d"
    assert check_rebuilds(acked.builds) == [
        "build chaos/b3:1 rebuilt chaos/b1:1 (sha256:c) as sha256:d"
    ]


def test_a_failed_build_leaves_its_tag_absent_or_whole_and_does_not_hang() -> None:
    failed = Acknowledged.from_journal(JOURNAL).failed_builds
    absent = {"chaos/b2:1": {"code": "NOT_FOUND", "message": "no such tag"}}
    assert check_failed_builds(failed, absent, 240) == []
    assert check_failed_builds(failed, {"chaos/b2:1": "sha256:e"}, 240) == []  # answer lost
    broken = {"chaos/b2:1": {"code": "DATA_LOSS", "message": "blob gone"}}
    assert check_failed_builds(failed, broken, 240) == [
        "failed build chaos/b2:1 left a tag that reads back as "
        "{'code': 'DATA_LOSS', 'message': 'blob gone'}"
    ]
    mismatch = {"chaos/b2:1": "manifest bytes do not match sha256:e"}
    assert len(check_failed_builds(failed, mismatch, 240)) == 1
    hung = [{**failed[0], "code": "DEADLINE_EXCEEDED", "seconds": 240.2}]
    assert check_failed_builds(hung, {}, 240) == ["build chaos/b2:1 hung: no answer in 240.2s"]


D1, D2, D3 = (f"sha256:{c * 64}" for c in "123")


def test_image_records_whole_and_pointing_at_what_the_registry_holds() -> None:
    records = {
        "manifests": [
            {"repository": "chaos/b1", "digest": D1, "missing": []},
            {"repository": "berth/build-cache", "digest": D2, "missing": []},
        ],
        "builds": {D1: {"dockerfile": "Dockerfile"}},
        "cache": {"k" * 64: {"layer": D3, "image": D2}, "j" * 64: {"layer": "", "image": ""}},
    }
    assert check_image_records(records, "berth/build-cache") == []
    records["manifests"][0]["missing"] = [D3]
    records["builds"][D3] = {"dockerfile": "Dockerfile"}
    records["builds"][D2] = "does not decode: Expecting value"
    records["cache"]["k" * 64]["image"] = D1  # not an intermediate image
    assert check_image_records(records, "berth/build-cache") == [
        "manifest chaos/b1@111111111111 lacks blobs 333333333333",
        "build record 222222222222 does not decode: Expecting value",
        "build record 333333333333 names an image the registry lacks",
        "build cache record kkkkkkkkkkkk holds image 111111111111, which berth/build-cache lacks",
    ]


def test_no_build_container_outlives_its_build(tmp_path: Path) -> None:
    snap = snapshot(WHOLE, WHOLE_ON_NODES)
    assert check_build_containers(snap) == []
    snap["containers"]["x"] = {"name": "build-0123abcd-3", "state": "exited"}
    snap["on_nodes"]["host3"] = [{"name": "build-0123abcd-3", "state": "exited"}]
    assert check_build_containers(snap) == [
        "build container build-0123abcd-3 (exited) outlived its build",
        "build container build-0123abcd-3 (exited) is left on node host3",
    ]
    assert check_scratch(tmp_path / "missing") == [] and check_scratch(tmp_path) == []
    (tmp_path / "build-0123abcd").mkdir()
    assert check_scratch(tmp_path) == [
        "the builder's scratch directory still holds ['build-0123abcd']"
    ]


def test_pushes_must_read_back_with_their_digest() -> None:
    pushes = {"chaos/p1:1": "sha256:a", "chaos/p2:1": "sha256:b"}
    assert check_pushes(pushes, {"chaos/p1:1": "sha256:a", "chaos/p2:1": "sha256:b"}) == []
    lost = {"chaos/p1:1": "sha256:a", "chaos/p2:1": {"code": "NOT_FOUND", "message": "gone"}}
    assert [v.split()[1] for v in check_pushes(pushes, lost)] == ["chaos/p2:1"]


def test_unmapped_codes_and_raw_exception_text_are_violations() -> None:
    honest = {"what": "run", "code": "UNAVAILABLE", "message": "etcd is unreachable"}
    raw = {"what": "run", "code": "INTERNAL", "message": "<AioRpcError of RPC ...>"}
    raw_text = {"what": "pull", "code": "UNAVAILABLE", "message": "[Errno 111] refused"}
    leaked = {"what": "push", "code": "KeyError", "message": "'digest'"}
    assert check_errors([honest]) == []
    assert check_errors([honest, raw, raw_text, leaked]) == [
        "run failed with INTERNAL: <AioRpcError of RPC ...>",
        "pull failed with UNAVAILABLE: [Errno 111] refused",
        "push failed with KeyError: 'digest'",
    ]


def snapshot(replicas: list[tuple[str, int, str, str]], on_nodes: dict) -> dict:
    return {
        "nodes": {"host1": "ready", "host2": "ready", "host3": "ready"},
        "replicas": [{"name": n, "slot": s, "node": h, "state": st} for n, s, h, st in replicas],
        "on_nodes": on_nodes,
        "containers": {},
    }


WHOLE = [("web.1", 1, "host1", "running"), ("web.2", 2, "host2", "running")]
WHOLE_ON_NODES = {
    "host1": [{"name": "web.1", "state": "running"}, {"name": "chaos-run-1", "state": "exited"}],
    "host2": [{"name": "web.2", "state": "running"}],
    "host3": [],
}


def test_service_with_exactly_its_replicas_holds() -> None:
    assert check_service(snapshot(WHOLE, WHOLE_ON_NODES), "web", 2) == []


def test_a_duplicate_on_a_node_is_a_violation_even_when_the_cluster_lists_the_right_count() -> None:
    on_nodes = {**WHOLE_ON_NODES, "host3": [{"name": "web.1", "state": "running"}]}
    (found,) = check_service(snapshot(WHOLE, on_nodes), "web", 2)
    assert "not 2 distinct replicas" in found


def test_missing_or_stopped_replicas_and_unready_nodes_are_violations() -> None:
    snap = snapshot([("web.1", 1, "host1", "running"), ("web.2", 2, "host2", "exited")], {})
    snap["nodes"]["host3"] = "down"
    found = check_service(snap, "web", 2)
    assert found[0] == "node host3 is down"
    assert any("not 2 running replicas" in v for v in found)


def test_acknowledged_containers_must_run_or_have_a_reason() -> None:
    acked = Acknowledged.from_journal(JOURNAL)
    snap = snapshot(WHOLE, WHOLE_ON_NODES)
    base = {"exit_code": 0, "failure_reason": "", "node_ready": True}
    snap["containers"] = {
        "c1": {**base, "name": "chaos-run-1", "state": "running"},
        "c2": {**base, "name": "chaos-run-2", "state": "exited", "exit_code": 3},
    }
    assert check_containers(snap, acked.runs, acked.removed) == []
    snap["containers"]["c2"]["state"] = "pending"
    del snap["containers"]["c1"]
    found = check_containers(snap, acked.runs, acked.removed)
    assert found == [
        "container chaos-run-1 (c1) was acknowledged and is gone",
        "container chaos-run-2 is pending",
    ]


def blob(root: Path, content: bytes) -> Path:
    hex_digest = hashlib.sha256(content).hexdigest()
    path = root / "blobs" / "sha256" / hex_digest[:2] / hex_digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_registry_files_whole_blobs_and_sessions(tmp_path: Path) -> None:
    blob(tmp_path, b"whole")
    session = tmp_path / "uploads" / "u1"
    session.mkdir(parents=True)
    (session / "info.json").write_text(json.dumps({"repository": "r", "started_at": 1}))
    (tmp_path / "uploads" / ".new-u2").mkdir()
    assert check_registry_files(tmp_path, after_gc=False) == []
    # GC removes a half-created session: one still there afterwards is a violation.
    assert check_registry_files(tmp_path, after_gc=True) == [
        "upload session .new-u2 left half-created after GC"
    ]


def test_registry_files_half_written(tmp_path: Path) -> None:
    blob(tmp_path, b"whole").write_bytes(b"who")  # truncated under its name
    (tmp_path / "blobs" / "sha256" / "tmp-upload").write_bytes(b"x")
    session = tmp_path / "uploads" / "u1"
    session.mkdir(parents=True)
    (session / "info.json").write_bytes(b"")
    found = check_registry_files(tmp_path, after_gc=False)
    assert len(found) == 3
    assert "does not hash to its name" in found[0]
    assert found[1] == "stray file in the blob store: sha256/tmp-upload"
    assert found[2] == "upload session u1 has no valid info.json"
