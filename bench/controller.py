"""What the cluster's controller costs while other services work: the cluster service's CPU
seconds (from /proc/<pid>/stat) while --images tiny images are pushed to the registry, and the
etcd Range calls per RunContainer (etcd's own request counter, grpc_server_handled_total).

One plaintext `berthd up` (BERTH_INSECURE_PLAINTEXT_FOR_BENCHMARKS=1, so etcd's /metrics answers
over http), its node cordoned and 3 fake nodes registered (as bench.security): placements are
recorded but nothing starts, so the Range calls are the cluster's alone (its placement
snapshot, its controller, and the idle cost of whatever runs meanwhile).

    .venv/bin/python -m bench.controller [--images 300] [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from bench.cluster import spec
from bench.registry import BenchError
from bench.security import TAG, Image, berth_cluster, make_image
from berth.client.registry import RegistryClient
from berth.cluster.v1 import cluster_pb2 as cpb
from berth.errors import BerthClientError
from berth.tls import PLAINTEXT_ENV

RANGE = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="Range"[^}]*\} (\S+)$', re.M)
# Time the cluster is given to finish what the last call woke (its controller's pass).
SETTLE_SECONDS = 2.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def etcd_ranges(endpoint: str) -> float:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(v) for v in RANGE.findall(text))


def push(client: RegistryClient, image: Image, repository: str) -> None:
    """Its blobs (mounted from another repository after the first push: registry work and
    etcd writes, no bytes) and its manifest."""
    for blob in image.layout.blobs_for(image.manifest):
        client.push_blob(repository, image.layout.blob_path(blob.digest), blob.digest, blob.size)
    client.put_manifest(repository, TAG, image.manifest.media_type, image.manifest.content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="tiny images pushed")
    parser.add_argument("--runs", type=int, default=50, help="sequential RunContainer calls")
    args = parser.parse_args(argv)
    if os.environ.get(PLAINTEXT_ENV):
        print(f"bench: unset {PLAINTEXT_ENV}: the bench sets it itself", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="berth-bench-controller-"))
    try:
        warm_up, tiny = make_image(work / "warm", 0.01, 1), make_image(work / "tiny", 0.001, 2)
        with berth_cluster(work, True, warm_up) as cluster:
            pid = int(cluster.info["services"]["cluster"]["pid"])
            etcd = cluster.info["etcd"]["endpoint"]
            address = cluster.info["services"]["registry"]["address"]
            time.sleep(SETTLE_SECONDS)
            idle_cpu, idle_ranges = cpu_seconds(pid), etcd_ranges(etcd)
            time.sleep(SETTLE_SECONDS)
            idle_cpu = (cpu_seconds(pid) - idle_cpu) / SETTLE_SECONDS
            idle_ranges = (etcd_ranges(etcd) - idle_ranges) / SETTLE_SECONDS

            cpu, began = cpu_seconds(pid), time.perf_counter()
            with RegistryClient(address) as client:
                for i in range(args.images):
                    push(client, tiny, f"bench/tiny-{i}")
            pushed = time.perf_counter() - began
            cpu = cpu_seconds(pid) - cpu
            print(
                f"push {args.images} tiny images: {pushed / args.images * 1000:.1f} ms each; "
                f"cluster CPU {cpu:.2f} s ({cpu / pushed * 100:.1f} % of a core; idle "
                f"{idle_cpu * 100:.1f} %)"
            )

            before = etcd_ranges(etcd)
            began = time.perf_counter()
            placed = [
                cluster.stub.RunContainer(cpb.RunContainerRequest(spec=spec(["true"])), timeout=30)
                for _ in range(args.runs)
            ]
            time.sleep(SETTLE_SECONDS)
            elapsed = time.perf_counter() - began
            ranges = etcd_ranges(etcd) - before - idle_ranges * elapsed
            print(
                f"RunContainer x{args.runs}: {ranges / args.runs:.1f} etcd Range calls each "
                f"(idle {idle_ranges:.1f}/s subtracted)"
            )
            cluster.remove_all([r.container.id for r in placed])
    except (BenchError, BerthClientError, grpc.RpcError, RuntimeError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"bench FAILED: {detail}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
