"""The chaos test's logic without servers: the seeded schedule and the invariant checks."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from tests.chaos.invariants import (
    Acknowledged,
    check_containers,
    check_errors,
    check_pushes,
    check_registry_files,
    check_service,
)
from tests.chaos.schedule import COMPONENTS, CUT, HOSTS, KILL, generate


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    assert generate(7, 600) == generate(7, 600)
    assert generate(7, 600) != generate(8, 600)
    # A longer run begins with the shorter one's faults: CHAOS_MINUTES does not reshuffle.
    short, long = generate(7, 120), generate(7, 600)
    assert long[: len(short)] == short


def test_faults_come_one_after_another_within_the_length() -> None:
    for seed in range(50):
        faults = generate(seed, 300)
        assert faults and all(f.at < 300 for f in faults)
        for before, after in itertools.pairwise(faults):
            assert after.at > before.end
        for f in faults:
            assert f.duration > 0
            assert (f.action, f.target) in [(KILL, c) for c in COMPONENTS] + [
                (CUT, h) for h in HOSTS
            ]


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
]


def test_acknowledged_from_the_journal() -> None:
    acked = Acknowledged.from_journal(JOURNAL)
    assert acked.pushes == {"chaos/p1:1": "sha256:a", "chaos/p2:1": "sha256:b"}
    assert set(acked.runs) == {"c1", "c2", "c3"} and acked.removed == {"c3"}
    assert acked.error_codes() == {"run:UNAVAILABLE": 1}


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
