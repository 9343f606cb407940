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

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.registry import (
    BERTH,
    BERTHD,
    SOURCE_REF,
    BenchError,
    Side,
    check_same_image,
    check_stored,
    compare,
    peer_round,
    port_is_free,
    run,
    skopeo,
    stop_berth,
)
from berthd.localcluster import use_state_credentials
from scripts.docker_registry import free_port

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


def main(argv: list[str] | None = None) -> int:
    return compare(
        argv,
        __doc__.split("\n\n")[0],
        "skopeo copy, image",
        Side("berth /v2/", berth_round),
        Side("docker-registry", peer_round),
        (BenchError, RuntimeError, subprocess.CalledProcessError),
    )


if __name__ == "__main__":
    sys.exit(main())
