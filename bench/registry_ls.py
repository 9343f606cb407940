"""`registry ls` and `berth search` as the registry fills up: RPC time of ListRepositories (every
page) and of a Search, and the etcd Range calls each costs (etcd's own request counter,
grpc_server_handled_total).

One plaintext etcd and one `berthd registry` (BERTH_INSECURE_PLAINTEXT_FOR_BENCHMARKS=1, so
etcd's /metrics answers over http), nothing else: at each size the registry is filled up to that
many repositories, each with one tag of one tiny image (its blobs mounted from the first
repository: registry work and etcd writes, no bytes), then each figure is sampled: every page
of ListRepositories at the registry's default page size (100) and at the largest (1000), RPC
time, and the same through the typed client (as `berth registry ls` lists, 1000 a page: its
conversion of each message included), and a Search; the size of
etcd's database file (never compacted here) is printed with them.

    .venv/bin/python -m bench.registry_ls [--sizes 10,2000] [--samples 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc

from bench.controller import etcd_ranges
from bench.registry import BenchError, free_port
from berth.client import RegistryClient
from berth.errors import BerthClientError
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import registry_pb2_grpc
from berth.tls import PLAINTEXT_ENV
from berthd.common.security.ca import CA_CERT, CA_KEY, CertificateAuthority

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
PUSH_THREADS = 4


def digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def tiny_image() -> tuple[list[tuple[str, bytes]], bytes]:
    layer = b"tiny layer"
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [digest(layer)]}}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer), "size": len(layer)}],
    }).encode()  # fmt: skip
    return [(digest(config), config), (digest(layer), layer)], manifest


def wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{what} exited with {proc.returncode}:\n{tail}")
        if check():
            return
        time.sleep(0.1)
    raise BenchError(f"{what} not ready after 60 s")


def etcd_ready(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=1) as reply:
            return json.loads(reply.read()).get("health") == "true"
    except OSError:
        return False


@contextmanager
def registry(work: Path) -> Iterator[tuple[str, str]]:
    """(registry address, etcd endpoint) of a fresh etcd and registry; both stopped after."""
    env = {**os.environ, PLAINTEXT_ENV: "1"}
    client, peer = free_port(), free_port()
    etcd_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    procs: list[subprocess.Popen] = []
    try:
        with open(work / "etcd.log", "wb") as log:
            procs.append(subprocess.Popen([
                "etcd", "--name=bench", f"--data-dir={work / 'etcd'}",
                f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=bench={peer_url}", "--logger=zap",
            ], stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        endpoint = f"127.0.0.1:{client}"
        wait_for(lambda: etcd_ready(endpoint), "etcd", procs[0], work / "etcd.log")
        # Plaintext ports, but a service still holds a certificate (issued from its own CA).
        CertificateAuthority.create("bench CA").save(work / "tls")
        ready = work / "registry.json"
        with open(work / "registry.log", "wb") as log:
            procs.append(subprocess.Popen([
                sys.executable, "-m", "berthd.main", "registry", "--listen=127.0.0.1:0",
                "--metrics-listen=127.0.0.1:0", f"--etcd={endpoint}", f"--ready-file={ready}",
                f"--data-dir={work / 'blobs'}", f"--tls-ca={work / 'tls' / CA_CERT}",
                f"--tls-ca-key={work / 'tls' / CA_KEY}",
            ], stdout=log, stderr=subprocess.STDOUT, env=env))  # fmt: skip
        wait_for(ready.exists, "registry", procs[1], work / "registry.log")
        yield json.loads(ready.read_text())["address"], endpoint
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fill(address: str, first: int, last: int) -> None:
    """Repositories bench/repo-<first..last-1>, one tag each."""
    blobs, manifest = tiny_image()

    def push(client: RegistryClient, number: int) -> None:
        repository = f"bench/repo-{number:05d}"
        for blob_digest, data in blobs:
            client.push_blob(repository, io.BytesIO(data), blob_digest, len(data))
        client.put_manifest(repository, "1", MEDIA_MANIFEST, manifest)

    with RegistryClient(address) as client, ThreadPoolExecutor(PUSH_THREADS) as pool:
        list(pool.map(lambda n: push(client, n), range(first, last)))


def measure(action: Callable[[], object], samples: int, endpoint: str) -> tuple[float, float]:
    """(median seconds, etcd Range calls per call) over `samples` calls."""
    action()  # warm: channels, caches, a one-time repair
    times = []
    before = etcd_ranges(endpoint)
    for _ in range(samples):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (etcd_ranges(endpoint) - before) / samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,2000", help="repositories at each step")
    parser.add_argument("--samples", type=int, default=5, help="samples per figure and step")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.environ.get(PLAINTEXT_ENV):
        print(f"bench: unset {PLAINTEXT_ENV}: the bench sets it itself", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="berth-bench-registry-ls-"))
    os.environ[PLAINTEXT_ENV] = "1"  # for this process's clients
    try:
        with registry(work) as (address, endpoint):
            channel = grpc.insecure_channel(address)
            stub = registry_pb2_grpc.RegistryServiceStub(channel)

            client = RegistryClient(address)

            def list_all_client() -> int:
                return len(list(client.iter_repositories()))

            def list_all(page_size: int = 0) -> int:
                token, count = "", 0
                while True:
                    page = stub.ListRepositories(
                        pb.ListRepositoriesRequest(page_size=page_size, page_token=token),
                        timeout=60,
                    )
                    count += len(page.repositories)
                    token = page.next_page_token
                    if not token:
                        return count

            def search() -> int:
                reply = stub.Search(pb.SearchRequest(term="repo"), timeout=60)
                return len(reply.results)

            print("repositories | registry ls (RPC, all pages of 100) | Range calls | the same,"
                  " pages of 1000 | Range calls | registry ls (typed client) | search"
                  " | Range calls | etcd db")  # fmt: skip
            filled = 0
            for size in sizes:
                fill(address, filled, size)
                filled = size
                if list_all() != size:
                    raise BenchError(f"registry ls shows {list_all()} repositories, not {size}")
                ls, ls_ranges = measure(list_all, args.samples, endpoint)
                big, big_ranges = measure(lambda: list_all(1000), args.samples, endpoint)
                cli, _ = measure(list_all_client, args.samples, endpoint)
                found, found_ranges = measure(search, args.samples, endpoint)
                db = (work / "etcd" / "member" / "snap" / "db").stat().st_size / 2**20
                print(f"{size} | {ls * 1000:.1f} ms | {ls_ranges:.0f} | {big * 1000:.1f} ms"
                      f" | {big_ranges:.0f} | {cli * 1000:.1f} ms"
                      f" | {found * 1000:.1f} ms | {found_ranges:.0f} | {db:.1f} MiB",
                      flush=True)  # fmt: skip
            channel.close()
            client.close()
    except (BenchError, BerthClientError, grpc.RpcError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"bench FAILED: {detail}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(PLAINTEXT_ENV, None)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
