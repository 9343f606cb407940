"""`berth images` as the catalog fills up: what the image service's catalog costs to list, cold
(the first listing after a push: every image's manifest and config read from the registry)
and warm (every page of a listing whose content is cached).

One plaintext etcd and one `berthd registry` (bench.registry_ls's), the image service's
Catalog in this process (BERTH_INSECURE_PLAINTEXT_FOR_BENCHMARKS=1 for its clients). At each
size the registry is filled up to that many distinct tiny images, one repository each, then:

- cold, one call per image: a fresh content cache filled the way the catalog did before
  BatchGetManifests (a GetManifest and a ReadBlob of the config per image, 8 at a time);
- cold, batched: a fresh cache filled with BatchGetManifests (what the catalog does now);
- images, every page: Catalog.list_page at 1000 a page (the typed client's page size),
  warm, the median of --samples listings;
- images, every page, each recomputed: the same rows computed once per page, as every
  page was before its rows were kept for the continuation pages.

Both cold rows run twice, alternating, and print the better; the registry's CPU seconds for
each come from /proc.

    .venv/bin/python -m bench.image_list [--sizes 10,2000] [--samples 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.registry import BenchError
from bench.registry_ls import MEDIA_MANIFEST, PUSH_THREADS, digest, registry
from berth.client import RegistryClient
from berth.tls import PLAINTEXT_ENV
from berthd.common.images import ImageStore
from berthd.common.rpc.registry import RegistryApi
from berthd.common.store import Store
from berthd.image.catalog import Catalog

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER = b"tiny layer"


def image(number: int) -> tuple[list[tuple[str, bytes]], bytes]:
    """A tiny image of its own (its config names it), the layer shared by all."""
    created = f"{number // 3600 % 24:02d}:{number // 60 % 60:02d}:{number % 60:02d}"
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": f"2024-01-01T{created}Z",
        "config": {"Labels": {"number": str(number)}},
        "rootfs": {"type": "layers", "diff_ids": [digest(LAYER)]},
    }).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(LAYER), "size": len(LAYER)}],
    }).encode()  # fmt: skip
    return [(digest(config), config), (digest(LAYER), LAYER)], manifest


def fill(address: str, first: int, last: int) -> None:
    def push(client: RegistryClient, number: int) -> None:
        repository = f"bench/img-{number:05d}"
        blobs, manifest = image(number)
        for blob_digest, data in blobs:
            client.push_blob(repository, io.BytesIO(data), blob_digest, len(data))
        client.put_manifest(repository, "1", MEDIA_MANIFEST, manifest)

    with RegistryClient(address) as client, ThreadPoolExecutor(PUSH_THREADS) as pool:
        list(pool.map(lambda n: push(client, n), range(first, last)))


def registry_pid(work: Path) -> int:
    """The pid of the registry bench.registry_ls started over `work` (found by its data dir)."""
    mark = f"--data-dir={work / 'blobs'}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "cmdline").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    raise BenchError("the registry's process was not found")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(action: Callable[[], Awaitable[object]], pid: int) -> tuple[float, float]:
    """(seconds, the registry's CPU seconds) of one call."""
    cpu, start = cpu_seconds(pid), time.perf_counter()
    await action()
    return time.perf_counter() - start, cpu_seconds(pid) - cpu


async def measure(address: str, endpoint: str, pid: int, sizes: list[int], samples: int) -> None:
    store = Store(endpoint, "/berth/")
    await store.connect()
    api = RegistryApi(address)
    catalog = Catalog(store, api, Path(tempfile.gettempdir()))
    print("images | cold, a call per image (registry CPU) | cold, batched (registry CPU)"
          " | images, every page | every page recomputed")  # fmt: skip
    filled = 0
    try:
        for size in sizes:
            fill(address, filled, size)
            filled = size
            names = await catalog.names.current()
            wanted = [(d, names.holders(d)[0]) for d in names.manifests]
            if len(wanted) != size:
                raise BenchError(f"the catalog shows {len(wanted)} images, not {size}")

            async def one_by_one(wanted: list[tuple[str, str]] = wanted) -> None:
                images, limit = ImageStore(api), asyncio.Semaphore(8)

                async def fetch(digest: str, repository: str) -> None:
                    async with limit:
                        await images.content(digest, repository)

                await asyncio.gather(*(fetch(d, r) for d, r in wanted))

            async def batched(wanted: list[tuple[str, str]] = wanted, size: int = size) -> None:
                if len(await ImageStore(api).contents(wanted)) != size:
                    raise BenchError("the batch did not bring every image")

            cold: dict[str, list[tuple[float, float]]] = {"one": [], "batch": []}
            for _ in range(2):
                cold["one"].append(await timed(one_by_one, pid))
                cold["batch"].append(await timed(batched, pid))

            async def every_page() -> int:
                token, shown = "", 0
                while True:
                    rows, token = await catalog.list_page(size=1000, token=token)
                    shown += len(rows)
                    if not token:
                        return shown

            async def every_page_recomputed() -> int:
                token, shown = "", 0
                while True:
                    catalog._listings.clear()  # as before: no rows kept between pages
                    catalog._catalogued = None
                    rows, token = await catalog.list_page(size=1000, token=token)
                    shown += len(rows)
                    if not token:
                        return shown

            listed = []
            for listing in (every_page, every_page_recomputed):
                if await listing() != size:  # warm, and checked
                    raise BenchError(f"a listing did not show {size} images")
                listed.append(
                    statistics.median([(await timed(listing, pid))[0] for _ in range(samples)])
                )
            one, batch = min(cold["one"]), min(cold["batch"])
            print(f"{size} | {one[0] * 1000:.0f} ms ({one[1]:.2f} s) | {batch[0] * 1000:.0f} ms"
                  f" ({batch[1]:.2f} s) | {listed[0] * 1000:.1f} ms | {listed[1] * 1000:.1f} ms",
                  flush=True)  # fmt: skip
    finally:
        await catalog.close()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,2000", help="images at each step")
    parser.add_argument("--samples", type=int, default=5, help="listings per figure and step")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.environ.get(PLAINTEXT_ENV):
        print(f"bench: unset {PLAINTEXT_ENV}: the bench sets it itself", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="berth-bench-image-list-"))
    os.environ[PLAINTEXT_ENV] = "1"  # for this process's clients
    try:
        with registry(work) as (address, endpoint):
            pid = registry_pid(work)
            asyncio.run(measure(address, endpoint, pid, sizes, args.samples))
    except (BenchError, OSError) as exc:
        print(f"bench FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(PLAINTEXT_ENV, None)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
