"""Push and pull one image through berth and through skopeo + docker-registry, on loopback.

Each round starts both registries empty: a fresh `berthd up --state-dir` cluster, and a fresh
`docker-registry serve` (CNCF Distribution) with its own storage directory. skopeo runs with
an empty blob-info cache every time, so it cannot skip or mount blobs it saw in an earlier run.
The printed figures are medians over the rounds, in MB/s (10^6 bytes per second) of blob bytes
(layers + config) moved by one client command, timed from its start to its exit.

    .venv/bin/python -m bench.registry [--rounds 3] [--layers 4] [--layer-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from berthd.localcluster import stop_process as stop_pid
from berthd.localcluster import use_state_credentials
from scripts.docker_registry import free_port, start_docker_registry, stop_process
from scripts.oci_images import make_random_image

BIN = Path(sys.executable).parent
BERTH = str(BIN / "berth")
BERTHD = str(BIN / "berthd")
SOURCE_REF = "bench"
BERTH_REPO = "bench/random:1"
PEER_REPO = "bench/random:1"
# Where containers/image keeps its blob-info cache when run as root. HOME and XDG_DATA_HOME
# only move it for other users, so for root a private mount namespace hides it (see below).
ROOT_BLOB_INFO_CACHE = Path("/var/lib/containers/cache")
STOP_TIMEOUT = 15.0


class BenchError(Exception):
    """A step failed: the message says which and why."""


@dataclass
class Timings:
    push: list[float] = field(default_factory=list)
    pull: list[float] = field(default_factory=list)


# --- helpers -------------------------------------------------------------------------------------


def run(argv: list[str], what: str, env: dict[str, str] | None = None) -> float:
    """Run argv to completion; return its wall-clock seconds, or raise with its output."""
    start = time.perf_counter()
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        output = "\n".join(part for part in (done.stdout.strip(), done.stderr.strip()) if part)
        raise BenchError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{output}")
    return elapsed


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base port for `berthd up` whose etcd (base, base+1) and registry ports are all free."""
    for _ in range(200):
        base = free_port()
        if base + 11 > 65535:
            continue
        if all(port_is_free(base + offset) for offset in (0, 1, 10, 11)):
            return base
    raise BenchError("found no free range of ports for `berthd up`")


def manifest_digest(layout: Path, ref: str) -> str:
    """The digest index.json of an OCI layout gives for `ref`."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index.get("manifests", []):
        if (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref:
            return str(entry["digest"])
    raise BenchError(f"{layout} has no manifest tagged {ref!r}")


def blob_bytes(layout: Path, ref: str) -> int:
    """Bytes of the layers and config of `ref`: what a push or pull has to move."""
    digest = manifest_digest(layout, ref)
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text())
    return int(manifest["config"]["size"]) + sum(int(layer["size"]) for layer in manifest["layers"])


def tree_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def check_same_image(pulled: Path, ref: str, expected: str, who: str) -> None:
    got = manifest_digest(pulled, ref)
    if got != expected:
        raise BenchError(f"{who}: pulled manifest {got} differs from the source's {expected}")


def check_stored(storage: Path, size: int, who: str) -> None:
    """The registry holds at least every blob byte: the push really moved the data."""
    stored = tree_bytes(storage) if storage.exists() else 0
    if stored < size:
        raise BenchError(f"{who}: registry storage {storage} holds {stored} bytes < image {size}")


# --- berth ---------------------------------------------------------------------------------------


def berth_round(work: Path, source: Path, expected: str, size: int) -> tuple[float, float]:
    state = work / "berth-state"
    pulled = work / "berth-pulled"
    try:
        run(
            [BERTHD, "up", "--state-dir", str(state), "--base-port", str(free_base_port())],
            "berthd up",
        )
        use_state_credentials(state)  # the CLI below uses this cluster's CA and certificate
        cluster = json.loads((state / "cluster.json").read_text())
        address = cluster["services"]["registry"]["address"]
        push = run(
            [BERTH, "--registry", address, "oci", "push", f"{source}:{SOURCE_REF}", BERTH_REPO],
            "berth oci push",
        )
        check_stored(state / "registry", size, "berth")
        pull = run(
            [BERTH, "--registry", address, "oci", "pull", BERTH_REPO, f"{pulled}:{SOURCE_REF}"],
            "berth oci pull",
        )
        check_same_image(pulled, SOURCE_REF, expected, "berth")
        return push, pull
    finally:
        stop_berth(state)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(pulled, ignore_errors=True)


def stop_berth(state: Path) -> None:
    cluster_file = state / "cluster.json"
    if not cluster_file.exists():
        return
    cluster = json.loads(cluster_file.read_text())
    try:
        run([BERTHD, "down", "--state-dir", str(state)], "berthd down")
    finally:
        # Whatever `down` left running (it should be nothing), stopped by pid.
        entries = [*cluster.get("services", {}).values(), cluster.get("etcd") or {}]
        for entry in entries:
            if entry.get("pid") and entry.get("marker"):
                stop_pid(int(entry["pid"]), str(entry["marker"]))


# --- skopeo + docker-registry --------------------------------------------------------------------


def skopeo(args: list[str], scratch: Path, what: str) -> float:
    """Run skopeo with an empty blob-info cache of its own; return its wall-clock seconds."""
    scratch.mkdir(parents=True)
    cache = scratch / "cache"
    cache.mkdir(mode=0o700)
    # For other users, containers/image keeps the cache under $XDG_DATA_HOME (or $HOME).
    env = dict(os.environ, HOME=str(scratch), XDG_DATA_HOME=str(scratch / "data"))
    argv = ["skopeo", *args]
    if os.geteuid() == 0:
        # For root it is always /var/lib/containers/cache: hide it behind an empty directory
        # in a private mount namespace (unshare + bind mount add a few ms to skopeo's time).
        ROOT_BLOB_INFO_CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount --bind "$0" {ROOT_BLOB_INFO_CACHE} && exec "$@"',
            str(cache),
            *argv,
        ]
    try:
        return run(argv, what, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def peer_round(work: Path, source: Path, expected: str, size: int) -> tuple[float, float]:
    pulled = work / "peer-pulled"
    proc = None
    try:
        proc, address, storage = start_docker_registry(work)
        remote = f"docker://{address}/{PEER_REPO}"
        push = skopeo(
            ["copy", "--dest-tls-verify=false", f"oci:{source}:{SOURCE_REF}", remote],
            work / "skopeo-push",
            "skopeo copy (push)",
        )
        check_stored(storage, size, "docker-registry")
        pull = skopeo(
            ["copy", "--src-tls-verify=false", remote, f"oci:{pulled}:{SOURCE_REF}"],
            work / "skopeo-pull",
            "skopeo copy (pull)",
        )
        check_same_image(pulled, SOURCE_REF, expected, "skopeo + docker-registry")
        return push, pull
    finally:
        if proc is not None:
            stop_process(proc)
        for name in ("docker-registry-storage", "docker-registry.yml", "docker-registry.log"):
            path = work / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        shutil.rmtree(pulled, ignore_errors=True)


# --- report --------------------------------------------------------------------------------------


def rate(size: int, seconds: float) -> float:
    return size / 1e6 / seconds


Round = Callable[[Path, Path, str, int], tuple[float, float]]


@dataclass(frozen=True)
class Side:
    """One server of a comparison: its name in the figures, and one round against it."""

    label: str
    round: Round


def report(
    size: int, args: argparse.Namespace, title: str, berth: Side, peer: Side, timings: dict
) -> None:
    print()
    print(
        f"{title}: {args.layers} layers x {args.layer_mb:g} MiB, {size / 1e6:.1f} MB of blobs;"
        f" {args.rounds} round(s), median; loopback"
    )
    ours_head, theirs_head = f"{berth.label} MB/s", f"{peer.label} MB/s"
    ours_width, theirs_width = len(ours_head) + 2, len(theirs_head) + 3
    header = f"{'':6}{ours_head:>{ours_width}}{theirs_head:>{theirs_width}}{'berth/peer':>12}"
    print(header)
    print("-" * len(header))
    for name in ("push", "pull"):
        ours = rate(size, statistics.median(getattr(timings["berth"], name)))
        theirs = rate(size, statistics.median(getattr(timings["peer"], name)))
        print(f"{name:6}{ours:>{ours_width}.1f}{theirs:>{theirs_width}.1f}{ours / theirs:>11.2f}x")


def compare(
    argv: list[str] | None,
    description: str,
    title: str,
    berth: Side,
    peer: Side,
    errors: tuple[type[BaseException], ...] = (BenchError, RuntimeError),
) -> int:
    """The whole of a push/pull comparison: arguments, one random source image, rounds that
    alternate who goes first, and the report of medians with the ratio."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--layers", type=int, default=4, help="layers in the image")
    parser.add_argument("--layer-mb", type=float, default=64, help="MiB of data per layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random layer data")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.layers < 1 or args.layer_mb <= 0:
        parser.error("--rounds, --layers and --layer-mb must be positive")
    for tool in ("skopeo", "docker-registry", "etcd", "unshare"):
        if shutil.which(tool) is None:
            print(f"bench: `{tool}` is not installed (make deps)", file=sys.stderr)
            return 1

    work = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    sides = {"berth": berth, "peer": peer}
    timings = {"berth": Timings(), "peer": Timings()}
    width = max(len(berth.label), len(peer.label))
    try:
        source = work / "source"
        started = time.perf_counter()
        make_random_image(
            source, SOURCE_REF, args.layers, int(args.layer_mb * 1024 * 1024), args.seed
        )
        expected = manifest_digest(source, SOURCE_REF)
        size = blob_bytes(source, SOURCE_REF)
        print(
            f"source image {expected} ({size / 1e6:.1f} MB) built in"
            f" {time.perf_counter() - started:.1f}s"
        )
        for number in range(1, args.rounds + 1):
            # Alternate who goes first, so neither always meets a warmer or cooler machine.
            order = ["berth", "peer"] if number % 2 else ["peer", "berth"]
            for who in order:
                push, pull = sides[who].round(work, source, expected, size)
                timings[who].push.append(push)
                timings[who].pull.append(pull)
                print(
                    f"round {number}: {sides[who].label:{width}} push {push:6.2f}s"
                    f" ({rate(size, push):6.1f} MB/s)  pull {pull:6.2f}s"
                    f" ({rate(size, pull):6.1f} MB/s)",
                    flush=True,
                )
        report(size, args, title, berth, peer, timings)
    except errors as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"bench FAILED: {exc}" + (f"\n{detail}" if detail else ""), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return compare(
        argv,
        __doc__.split("\n\n")[0],
        "image",
        Side("berth", berth_round),
        Side("skopeo+docker-registry", peer_round),
    )


if __name__ == "__main__":
    sys.exit(main())
