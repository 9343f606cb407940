"""The cost of security: push, pull and RunContainer with TLS against the same build without.

Three modes, on this machine, in one run, one cluster at a time:
  plaintext          `berthd up` with BERTH_INSECURE_PLAINTEXT_FOR_BENCHMARKS=1 (test-only:
                     plaintext ports and etcd, every caller the administrator; the
                     authorization checks still run), this process dialling plaintext too;
  TLS (certificate)  a normal cluster (mutual TLS everywhere), the admin certificate on the
                     services' main ports;
  TLS (token)        the same cluster, a developer token on the services' public ports.

Each round starts a fresh plaintext cluster and a fresh secured one (which goes first
alternates, and so does certificate or token within the secured one); each cluster first
pushes and pulls a warm-up image. In each mode the bench pushes a one-layer image of --size MiB
of random data with the typed RegistryClient, pulls it back (digests checked) and times
--samples sequential RunContainer calls (every other one with a request_id) on 3 fake nodes,
as bench.cluster does. The table shows medians over the rounds and the ratios with TLS to
without, above 1 meaning slower (for throughput: plaintext MB/s / TLS MB/s).

    .venv/bin/python -m bench.security [--rounds 3] [--size 64] [--samples 100]
    .venv/bin/python -m bench.security --quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.cluster import (
    Cluster,
    cluster_base_port,
    pct,
    read_node,
    register_fakes,
    scrape,
    spec,
    stop_cluster,
    wait_for,
)
from bench.registry import BERTHD, BenchError, rate, run
from berth.client.access import AccessClient
from berth.client.registry import RegistryClient
from berth.cluster.v1 import cluster_pb2 as cpb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.errors import BerthClientError
from berth.oci_layout import Descriptor, ImageLayout, Manifest
from berth.tls import PLAINTEXT_ENV, secure_channel
from berthd import localcluster
from scripts.oci_images import make_random_image

PLAIN, CERT, TOKEN = "plaintext", "TLS cert", "TLS token"
MODES = (PLAIN, CERT, TOKEN)
FAKES = ["fake-1", "fake-2", "fake-3"]
READY = cpb.NODE_STATE_READY
REF, TAG = "bench", "1"
MIB = 1024 * 1024
# Rows of the table: (figure, unit, higher is better).
ROWS = (
    ("push", "MB/s", True),
    ("pull", "MB/s", True),
    ("RunContainer p50", "ms", False),
    ("RunContainer p95", "ms", False),
    ("RunContainer + request_id p50", "ms", False),
    ("scheduler, mean", "ms", False),
)
WARMUP = 10  # untimed RunContainer calls per mode
SCHEDULING = "berth_cluster_scheduling_seconds"  # the cluster's own time per placement
GOAL = 1.10  # the goal: security costs under 10 %


@dataclass(frozen=True)
class Image:
    layout: ImageLayout
    manifest: Manifest
    size: int  # blob bytes: what a push or pull moves


def make_image(path: Path, size_mib: float, seed: int) -> Image:
    make_random_image(path, REF, 1, int(size_mib * MIB), seed)
    layout = ImageLayout.open(path)
    manifest = layout.read_manifest(layout.resolve(REF))
    return Image(layout, manifest, sum(b.size for b in layout.blobs_for(manifest)))


# --- clusters and callers ------------------------------------------------------------------------


@contextmanager
def berth_cluster(work: Path, plaintext: bool, warm_up: Image) -> Iterator[Cluster]:
    """A fresh `berthd up` (plaintext: with PLAINTEXT_ENV, for it and for this process), its one
    real node cordoned and 3 fake nodes registered, `warm_up` pushed and pulled once (a new
    registry's first transfer is slower, whoever makes it); stopped and removed afterwards."""
    state = work / "state"
    if plaintext:
        os.environ[PLAINTEXT_ENV] = "1"  # inherited by `berthd up` and `berthd down`
    cluster = None
    try:
        for attempt in range(3):
            base = cluster_base_port(1)
            try:
                run([BERTHD, "up", "--state-dir", str(state), "--base-port", str(base)], "up")
                break
            except BenchError as exc:
                # A port the check found free was taken meanwhile (the ephemeral range is shared
                # with every outgoing connection on the machine): once more on other ports.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                stop_cluster(state)
                shutil.rmtree(state, ignore_errors=True)
        cluster = Cluster(state)  # the admin certificate, for setup and removals
        etcd, prefix = cluster.info["etcd"]["endpoint"], cluster.info["prefix"]
        template = asyncio.run(read_node(etcd, prefix, "node-1"))
        asyncio.run(register_fakes(etcd, prefix, template, FAKES))
        for node in cluster.info["nodes"]:
            cluster.stub.CordonNode(cpb.CordonNodeRequest(node_id=node), timeout=10)
        states = cluster.node_states
        wait_for(lambda: all(states().get(n) == READY for n in FAKES), 10, "fake nodes ready")
        transfer(cluster.info["services"]["registry"]["address"], warm_up, "bench/warm-up", work)
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.close()
            stop_cluster(state)
        finally:
            os.environ.pop(PLAINTEXT_ENV, None)
            localcluster.unmount_under(state)
            shutil.rmtree(state, ignore_errors=True)


@contextmanager
def token_caller(token: str) -> Iterator[None]:
    """Clients made inside send `token` (berth.tls reads BERTH_TOKEN); "" means none."""
    os.environ["BERTH_TOKEN"] = token
    try:
        yield
    finally:
        os.environ["BERTH_TOKEN"] = ""


# --- one mode ------------------------------------------------------------------------------------


def push(client: RegistryClient, image: Image, repository: str) -> None:
    for blob in image.layout.blobs_for(image.manifest):
        path = image.layout.blob_path(blob.digest)
        result = client.push_blob(repository, path, blob.digest, blob.size)
        if result.outcome != "pushed":
            raise BenchError(f"blob {blob.digest} was {result.outcome}, not sent")
    media_type = image.manifest.media_type
    client.put_manifest(repository, TAG, media_type, image.manifest.content)


def pull(client: RegistryClient, image: Image, repository: str, dest: Path) -> None:
    """The manifest by tag, then every blob (pull_blob checks each digest)."""
    data = client.get_manifest(repository, TAG)
    expected = image.manifest.descriptor.digest
    if data.digest != expected:
        raise BenchError(f"pulled manifest {data.digest}, pushed {expected}")
    descriptor = Descriptor(data.media_type, expected, len(data.content))
    manifest = Manifest.parse(descriptor, data.content)  # checks the bytes against the digest
    for blob in ImageLayout.blobs_for(manifest):
        client.pull_blob(repository, blob.digest, dest / blob.digest.split(":")[1])


def latency(
    cluster: Cluster, stub: cluster_pb2_grpc.ClusterServiceStub, samples: int
) -> dict[str, float]:
    """Sequential RunContainer round trips; every other call carries a request_id, as berth's
    own clients send. Also the scheduler's own mean time per placement (snapshot, choice and
    transaction in etcd: the part of a round trip spent in the cluster's core). The containers
    (on fake nodes: nothing starts) are removed afterwards."""
    request = cpb.RunContainerRequest(spec=spec(["true"]))
    placed = [stub.RunContainer(request, timeout=30) for _ in range(WARMUP)]
    metrics = cluster.metrics
    before = [scrape(metrics, f"{SCHEDULING}_{kind}") for kind in ("sum", "count")]
    plain: list[float] = []
    keyed: list[float] = []
    for i in range(samples):
        request = cpb.RunContainerRequest(spec=spec(["true"]))
        if i % 2:
            request.request_id = uuid.uuid4().hex
        began = time.perf_counter()
        reply = stub.RunContainer(request, timeout=30)
        (keyed if i % 2 else plain).append(time.perf_counter() - began)
        placed.append(reply)
        if reply.container.node_id not in FAKES:
            raise BenchError(f"placed on {reply.container.node_id}, not on a fake node")
    after = [scrape(metrics, f"{SCHEDULING}_{kind}") for kind in ("sum", "count")]
    cluster.remove_all([r.container.id for r in placed])  # untimed, with the admin certificate
    return {
        "RunContainer p50": statistics.median(plain) * 1000,
        "RunContainer p95": pct(plain, 0.95) * 1000,
        "RunContainer + request_id p50": statistics.median(keyed) * 1000,
        "scheduler, mean": (after[0] - before[0]) / (after[1] - before[1]) * 1000,
    }


def transfer(address: str, image: Image, repository: str, work: Path) -> tuple[float, float]:
    """Push the image, then pull it back: (push MB/s, pull MB/s)."""
    dest = work / "pulled"
    dest.mkdir()
    try:
        with RegistryClient(address) as client:
            began = time.perf_counter()
            push(client, image, repository)
            pushed = time.perf_counter() - began
            began = time.perf_counter()
            pull(client, image, repository, dest)
            pulled = time.perf_counter() - began
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return rate(image.size, pushed), rate(image.size, pulled)


def measure(
    mode: str, cluster: Cluster, image: Image, samples: int, work: Path
) -> dict[str, float]:
    """Every figure of one mode; the caller has set the environment (plaintext, token)."""
    services = cluster.info["services"]
    port = "public_address" if mode == TOKEN else "address"
    with AccessClient(services["cluster"][port]) as access:
        who = access.identity()
    expected = ("user:bench", "token") if mode == TOKEN else ("user:admin", "certificate")
    if (who.principal, who.credential) != expected:
        raise BenchError(f"{mode}: calls are made as {who.principal} ({who.credential})")
    repository = f"bench/{mode.replace(' ', '-').lower()}"
    figures: dict[str, float] = {}
    figures["push"], figures["pull"] = transfer(services["registry"][port], image, repository, work)
    with secure_channel(services["cluster"][port]) as channel:
        stub = cluster_pb2_grpc.ClusterServiceStub(channel)
        figures.update(latency(cluster, stub, samples))
    return figures


def secured_modes(cluster: Cluster, first: str) -> list[tuple[str, str]]:
    """(mode, token) of the secured cluster: a new developer token, made with the admin's
    certificate; `first` goes first."""
    with AccessClient(cluster.info["services"]["cluster"]["address"]) as access:
        _, token = access.create_token("bench", "developer")
    modes = [(CERT, ""), (TOKEN, token)]
    return modes if first == CERT else modes[::-1]


# --- report --------------------------------------------------------------------------------------


def report(figures: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.rounds} round(s), median; image {args.size:g} MiB (one random layer),"
        f" {args.samples} RunContainer calls per round (half with a request_id) on 3 fake nodes"
    )
    header = (
        f"{'':36}{'plaintext':>11}{'TLS cert':>10}{'TLS token':>11}"
        f"{'cert/plain':>12}{'token/plain':>13}  cost, goal under {(GOAL - 1) * 100:.0f}%"
    )
    print(header)
    print("-" * len(header))
    for name, unit, higher_better in ROWS:
        plain, cert, token = (statistics.median(figures[mode][name]) for mode in MODES)
        # Above 1 always means: security costs this much (time with TLS / time without).
        ratios = [plain / v if higher_better else v / plain for v in (cert, token)]
        goal = ", ".join(f"{(r - 1) * 100:+.1f}% {'met' if r < GOAL else 'MISSED'}" for r in ratios)
        print(
            f"{f'{name} ({unit})':36}{plain:>11.1f}{cert:>10.1f}{token:>11.1f}"
            f"{ratios[0]:>11.2f}x{ratios[1]:>12.2f}x  {goal}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--size", type=float, default=64, help="MiB of random data in the image")
    parser.add_argument("--samples", type=int, default=100, help="RunContainer calls per round")
    parser.add_argument("--quick", action="store_true", help="1 round, 8 MiB, 20 calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.size, args.samples = 1, 8, 20
    if args.rounds < 1 or args.size <= 0 or args.samples < 2:
        parser.error("--rounds and --size must be positive, --samples at least 2")
    if os.environ.get(PLAINTEXT_ENV):
        print(f"bench: unset {PLAINTEXT_ENV}: the bench sets it itself", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="berth-bench-security-"))
    figures: dict[str, dict[str, list[float]]] = {mode: defaultdict(list) for mode in MODES}
    try:
        # One image per mode and one to warm up each cluster, each of its own seed: a cluster
        # must not find a blob it already has.
        names = [*MODES, "warm-up"]
        images = {m: make_image(work / f"image-{i}", args.size, i) for i, m in enumerate(names)}
        for number in range(1, args.rounds + 1):
            # Alternate who goes first, so neither always meets a warmer or cooler machine.
            for plaintext in (True, False) if number % 2 else (False, True):
                with berth_cluster(work, plaintext, images["warm-up"]) as cluster:
                    first = CERT if number % 2 else TOKEN
                    modes = [(PLAIN, "")] if plaintext else secured_modes(cluster, first)
                    for mode, token in modes:
                        with token_caller(token):
                            result = measure(mode, cluster, images[mode], args.samples, work)
                        for name, value in result.items():
                            figures[mode][name].append(value)
                        shown = (f"{name} {result[name]:.1f} {unit}" for name, unit, _ in ROWS)
                        print(f"round {number}: {mode:9}  {', '.join(shown)}", flush=True)
        report(figures, args)
    except (BenchError, BerthClientError, grpc.RpcError, RuntimeError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"bench FAILED: {detail}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
