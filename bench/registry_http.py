"""The same client against two servers: `skopeo copy` of one image to and from berth's OCI
HTTP API (`/v2/` of `berthd registry`) and Debian's `docker-registry` (CNCF Distribution 2.8),
on loopback.

Each round starts both registries empty: a fresh `berthd up --state-dir` cluster (its registry
serves /v2/ on base+5, plain HTTP on loopback; skopeo logs in with a berth token made by
`berth token create`, so the bearer-token flow is part of the figure) and a fresh
`docker-registry serve` with its own storage (no auth). skopeo runs with an empty blob-info
cache every time (bench.registry.skopeo). Figures are medians over the rounds, in MB/s
(10^6 bytes per second) of blob bytes moved by one skopeo command, start to exit.

    .venv/bin/python -m bench.registry_http [--rounds 3] [--layers 4] [--layer-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.registry import (
    BERTH,
    BERTHD,
    SOURCE_REF,
    BenchError,
    Timings,
    blob_bytes,
    check_same_image,
    check_stored,
    manifest_digest,
    peer_round,
    port_is_free,
    rate,
    run,
    skopeo,
    stop_berth,
)
from berthd.localcluster import use_state_credentials
from scripts.docker_registry import free_port
from scripts.oci_images import make_random_image

REPO = "bench/random:1"
SETTLE_SECONDS = 5.0
# etcd, the registry's HTTP API, the services' gRPC, metrics and public ports.
UP_OFFSETS = (0, 1, 5, *range(10, 20), *range(30, 35))


def free_base_port() -> int:
    for _ in range(200):
        base = free_port()
        if base + max(UP_OFFSETS) > 65535:
            continue
        if all(port_is_free(base + offset) for offset in UP_OFFSETS):
            return base
    raise BenchError("found no free range of ports for `berthd up`")


def berth_round(work: Path, source: Path, expected: str, size: int) -> tuple[float, float]:
    state = work / "berth-state"
    pulled = work / "berth-pulled"
    try:
        run(
            [BERTHD, "up", "--state-dir", str(state), "--base-port", str(free_base_port())],
            "berthd up",
        )
        use_state_credentials(state)
        # The services' start-up work (caches, watches, the node's first reports) is not the
        # registry's: let it pass before the clock runs, as docker-registry has none.
        time.sleep(SETTLE_SECONDS)
        cluster = json.loads((state / "cluster.json").read_text())
        host = cluster["services"]["registry"]["http_url"].removeprefix("http://")
        token = subprocess.run(
            [BERTH, "token", "create", "--name", "bench", "--role", "developer", "--quiet"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "BERTH_STATE_DIR": str(state)},
        ).stdout.strip()
        creds = f"bench:{token}"
        remote = f"docker://{host}/{REPO}"
        push = skopeo(
            [
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                creds,
                f"oci:{source}:{SOURCE_REF}",
                remote,
            ],
            work / "skopeo-push",
            "skopeo copy to berth",
        )
        check_stored(state / "registry", size, "berth")
        pull = skopeo(
            [
                "copy",
                "--src-tls-verify=false",
                "--src-creds",
                creds,
                remote,
                f"oci:{pulled}:{SOURCE_REF}",
            ],
            work / "skopeo-pull",
            "skopeo copy from berth",
        )
        check_same_image(pulled, SOURCE_REF, expected, "berth /v2/")
        return push, pull
    finally:
        stop_berth(state)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(pulled, ignore_errors=True)


def report(size: int, args: argparse.Namespace, berth: Timings, peer: Timings) -> None:
    print()
    print(
        f"skopeo copy, image: {args.layers} layers x {args.layer_mb:g} MiB, {size / 1e6:.1f} MB"
        f" of blobs; {args.rounds} round(s), median; loopback"
    )
    header = f"{'':6}{'berth /v2/ MB/s':>17}{'docker-registry MB/s':>23}{'berth/peer':>12}"
    print(header)
    print("-" * len(header))
    for name in ("push", "pull"):
        ours = rate(size, statistics.median(getattr(berth, name)))
        theirs = rate(size, statistics.median(getattr(peer, name)))
        print(f"{name:6}{ours:>17.1f}{theirs:>23.1f}{ours / theirs:>11.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    work = Path(tempfile.mkdtemp(prefix="berth-bench-http-"))
    berth, peer = Timings(), Timings()
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
                round_of = berth_round if who == "berth" else peer_round
                push, pull = round_of(work, source, expected, size)
                timings = berth if who == "berth" else peer
                timings.push.append(push)
                timings.pull.append(pull)
                label = "berth /v2/" if who == "berth" else "docker-registry"
                print(
                    f"round {number}: {label:16} push {push:6.2f}s ({rate(size, push):6.1f} MB/s)"
                    f"  pull {pull:6.2f}s ({rate(size, pull):6.1f} MB/s)",
                    flush=True,
                )
        report(size, args, berth, peer)
    except (BenchError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"bench FAILED: {exc}\n{detail}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
