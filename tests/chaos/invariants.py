"""The invariants a chaos run must end with, as functions of plain data: the workload's journal
(what was acknowledged), snapshots (tests/chaos/observe.py) and the registry's data directory.
Each returns the violations it finds, one readable line each; none means the invariant holds."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Raw exception text that must never reach a user in a status message.
RAW_TEXT = ("AioRpcError", "Traceback", "[Errno", "_InactiveRpcError", "StatusCode.")
HEX64 = re.compile(r"[0-9a-f]{64}")
BUILD_CONTAINER = "build-"  # how the builder names a RUN step's container (its runner)


@dataclass
class Acknowledged:
    """What the workload was told succeeded, from its journal."""

    pushes: dict[str, str] = field(default_factory=dict)  # reference -> digest (builds too)
    builds: list[dict] = field(default_factory=list)  # acknowledged builds, as journaled
    failed_builds: list[dict] = field(default_factory=list)  # their tags may hold anything whole
    runs: dict[str, str] = field(default_factory=dict)  # container id -> name
    removed: set[str] = field(default_factory=set)
    bad_reads: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    @classmethod
    def from_journal(cls, records: list[dict]) -> Acknowledged:
        acked = cls()
        for r in records:
            if r["op"] in ("push", "build"):
                acked.pushes[r["ref"]] = r["digest"]
                if r["op"] == "build":
                    acked.builds.append(r)
            elif r["op"] == "run":
                acked.runs[r["id"]] = r["name"]
            elif r["op"] == "removed":
                acked.removed.add(r["id"])
            elif r["op"] == "bad_read":
                acked.bad_reads.append(r)
            elif r["op"] == "error":
                acked.errors.append(r)
                if r["what"] == "build":
                    acked.failed_builds.append(r)
        return acked

    def error_codes(self) -> dict[str, int]:
        return dict(Counter(f"{e['what']}:{e['code']}" for e in self.errors))

    def error_samples(self) -> dict[str, str]:
        """One message for each kind of failed call, for the run's summary."""
        return {f"{e['what']}:{e['code']}": e["message"] for e in reversed(self.errors)}


def check_pushes(pushes: dict[str, str], read: dict[str, object]) -> list[str]:
    """Every acknowledged push reads back whole, with the digest it was acknowledged with."""
    found = []
    for reference, digest in sorted(pushes.items()):
        got = read.get(reference)
        if got != digest:
            found.append(f"push {reference} acknowledged as {digest} reads back as {got}")
    return found


def check_reads(bad_reads: list[dict]) -> list[str]:
    """A read during the run may fail, but never answer with the wrong content."""
    return [f"read of {r['ref']} gave {r['got']}, pushed as {r['want']}" for r in bad_reads]


def check_rebuilds(builds: list[dict]) -> list[str]:
    """A rebuild of an acknowledged build's context is all cached: the very same image."""
    return [
        f"build {b['ref']} rebuilt {b['rebuild_of']} ({b['want']}) as {b['digest']}"
        for b in builds
        if "rebuild_of" in b and b["digest"] != b["want"]
    ]


def check_failed_builds(failed: list[dict], read: dict[str, object], deadline: float) -> list[str]:
    """A build may fail under faults, but not hang past the workload's guard, and its tag then
    names nothing or a whole image (a build whose answer was lost may have finished); never a
    half-written one."""
    found = [
        f"build {b['ref']} hung: no answer in {b['seconds']:g}s"
        for b in failed
        if b.get("seconds", 0) >= deadline
    ]
    for reference, got in sorted(read.items()):
        whole = isinstance(got, str) and got.startswith("sha256:")
        absent = isinstance(got, dict) and got.get("code") == "NOT_FOUND"
        if not (whole or absent):
            found.append(f"failed build {reference} left a tag that reads back as {got}")
    return found


def check_image_records(records: dict, cache_repository: str) -> list[str]:
    """No half-written image record: every manifest the registry holds has every blob it
    names; every build record (builds/<digest>) decodes and names a manifest the registry
    holds; every build cache record decodes, and the intermediate image it holds (if any) is
    in the cache repository."""
    found = []
    held = {m["digest"] for m in records["manifests"]}
    cached = {m["digest"] for m in records["manifests"] if m["repository"] == cache_repository}
    for m in records["manifests"]:
        if m["missing"]:
            missing = ", ".join(d[7:19] for d in m["missing"])
            found.append(f"manifest {m['repository']}@{m['digest'][7:19]} lacks blobs {missing}")
    for digest, record in sorted(records["builds"].items()):
        if isinstance(record, str):
            found.append(f"build record {digest[7:19]} {record}")
        elif digest not in held:
            found.append(f"build record {digest[7:19]} names an image the registry lacks")
    for key, record in sorted(records["cache"].items()):
        if isinstance(record, str):
            found.append(f"build cache record {key[:12]} {record}")
        elif record["image"] and record["image"] not in cached:
            found.append(
                f"build cache record {key[:12]} holds image {record['image'][7:19]}, "
                f"which {cache_repository} lacks"
            )
    return found


def check_build_containers(snapshot: dict) -> list[str]:
    """A build's RUN containers go with the build: none is left once no build runs, neither
    in the cluster's list nor on a node."""
    found = [
        f"build container {c['name']} ({c['state']}) outlived its build"
        for c in snapshot["containers"].values()
        if c["name"].startswith(BUILD_CONTAINER)
    ]
    for node, containers in sorted(snapshot["on_nodes"].items()):
        if isinstance(containers, list):
            found += [
                f"build container {c['name']} ({c['state']}) is left on node {node}"
                for c in containers
                if c["name"].startswith(BUILD_CONTAINER)
            ]
    return found


def check_scratch(scratch: Path) -> list[str]:
    """Once no build runs, the builder's scratch directory is empty: every build, finished,
    failed or cancelled, took its context and layers with it."""
    left = sorted(p.name for p in scratch.iterdir()) if scratch.is_dir() else []
    return [f"the builder's scratch directory still holds {left}"] if left else []


# Status codes a failure under faults may honestly have: INTERNAL and UNKNOWN say that a failure
# went unmapped, and a name that is no status code is an exception the client let through.
HONEST_CODES = {
    "CANCELLED",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
}


def check_errors(errors: list[dict]) -> list[str]:
    """Failed calls are expected under faults; their codes and messages must still be honest."""
    return [
        f"{e['what']} failed with {e['code']}: {e['message']}"
        for e in errors
        if e["code"] not in HONEST_CODES or any(raw in e["message"] for raw in RAW_TEXT)
    ]


def check_service(snapshot: dict, name: str, replicas: int) -> list[str]:
    """Every node ready; the service has exactly `replicas` running replicas, one per slot, as
    the cluster lists them and as the node agents themselves report them (no duplicates)."""
    found = [f"node {n} is {s}" for n, s in sorted(snapshot["nodes"].items()) if s != "ready"]
    listed = snapshot["replicas"]
    running = [r for r in listed if r["state"] == "running"]
    if len(listed) != replicas or len(running) != replicas:
        states = sorted(f"{r['name']}@{r['node']}:{r['state']}" for r in listed)
        found.append(f"service {name} lists {states}, not {replicas} running replicas")
    slots = sorted(r["slot"] for r in listed)
    if slots != list(range(1, replicas + 1)):
        found.append(f"service {name} has slots {slots}")
    copies: list[str] = []
    for node, containers in sorted(snapshot["on_nodes"].items()):
        if isinstance(containers, dict):
            found.append(f"node agent {node} did not answer: {containers}")
            continue
        copies += [
            f"{c['name']}@{node}:{c['state']}"
            for c in containers
            if c["name"].startswith(f"{name}.")
        ]
    names = Counter(copy.split("@")[0] for copy in copies)
    if len(copies) != replicas or any(n > 1 for n in names.values()):
        found.append(f"the node agents run {sorted(copies)}, not {replicas} distinct replicas")
    elif any(not copy.endswith(":running") for copy in copies):
        found.append(f"the node agents report {sorted(copies)}")
    return found


# A container that has settled: running, exited (its exit code says why) or never created (its
# failure reason says why).
SETTLED = ("running", "exited", "create_failed")


def check_containers(snapshot: dict, runs: dict[str, str], removed: set[str]) -> list[str]:
    """Every acknowledged container still known is running or has an exit reason."""
    found = []
    containers = snapshot["containers"]
    for cid, name in sorted(runs.items(), key=lambda item: item[1]):
        if cid in removed:
            continue
        c = containers.get(cid)
        if c is None:
            found.append(f"container {name} ({cid[:12]}) was acknowledged and is gone")
        elif c["state"] not in SETTLED or not c["node_ready"]:
            ready = "" if c["node_ready"] else ", node not ready"
            found.append(f"container {name} is {c['state']}{ready}")
        elif c["state"] == "create_failed" and not c["failure_reason"]:
            found.append(f"container {name} failed to be created with no reason")
    return found


def check_registry_files(root: Path, after_gc: bool) -> list[str]:
    """No half-written blob or upload record in the registry's data directory: every blob is
    whole (its bytes hash to its name), every upload session has a valid info.json, and once
    GC has run no session is left half-created (`.new-*`)."""
    found = []
    blobs = root / "blobs"
    for path in sorted(p for p in blobs.rglob("*") if p.is_file()):
        relative = path.relative_to(blobs)
        parts = relative.parts
        if len(parts) != 3 or parts[0] != "sha256" or not HEX64.fullmatch(parts[2]):
            found.append(f"stray file in the blob store: {relative}")
        elif parts[1] != parts[2][:2] or hashlib.sha256(path.read_bytes()).hexdigest() != parts[2]:
            found.append(f"blob {parts[2][:12]} does not hash to its name (half-written?)")
    uploads = root / "uploads"
    for session in sorted(p for p in uploads.iterdir()) if uploads.is_dir() else []:
        if session.name.startswith(".new-"):
            if after_gc:
                found.append(f"upload session {session.name} left half-created after GC")
            continue
        try:
            info = json.loads((session / "info.json").read_bytes())
            valid = isinstance(info, dict) and bool(info)
        except (OSError, ValueError):
            valid = False
        if not valid:
            found.append(f"upload session {session.name} has no valid info.json")
    return found
