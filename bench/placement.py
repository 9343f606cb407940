"""Placement alone: concurrent `ClusterCore.run` calls in this process against a plain etcd of
its own, with no gRPC, TLS or agents, so the figure is the placement path (and, separately, the
`request_id` claim RunContainer wraps it in).

    .venv/bin/python -m bench.placement                       # 30 at once, 3 rounds, 3 nodes
    .venv/bin/python -m bench.placement --nodes 1000 --concurrent 30

The nodes are `nodes/<id>` records (4 CPUs, 4 GiB); all but three carry the label sim=1 and the
runs keep off them (`sim!=1`), as bench.scale's do. Nothing starts: no agent watches.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from berth.cluster.v1 import cluster_pb2 as pb
from berthd.cluster.core import ClusterCore
from berthd.common.containers import ContainerConfig
from berthd.common.errors import Unavailable
from berthd.common.idempotency import once
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store

GiB = 1 << 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def measure(endpoint: str, nodes: int, concurrent: int, rounds: int) -> None:
    store = Store(endpoint, f"/bench-placement-{uuid.uuid4().hex[:8]}/")
    for attempt in range(300):  # etcd was just started: until it answers
        try:
            await store.connect()
            break
        except Unavailable:
            if attempt == 299:
                raise
            await asyncio.sleep(0.1)
    for i in range(nodes):
        node = f"node-{i + 1}" if i < 3 else f"sim-{i:04d}"
        labels = {} if i < 3 else {"sim": "1"}
        await NODES.put(store, node, NodeRecord(node, labels=labels, cpus=4, memory_bytes=4 * GiB))
    core = ClusterCore(store)

    async def one(claimed: bool) -> float:
        began = time.perf_counter()
        config = ContainerConfig("busybox", name=f"p-{uuid.uuid4().hex[:12]}")

        async def work() -> pb.RunContainerResponse:
            await core.run(config, constraints=["sim!=1"])
            return pb.RunContainerResponse()

        if claimed:
            await once(
                store, "cluster.RunContainer", uuid.uuid4().hex, pb.RunContainerResponse, work
            )
        else:
            await work()
        return time.perf_counter() - began

    try:
        await one(False)  # loads the view
        for claimed in (False, True):
            times: list[float] = []
            for _ in range(rounds):
                times += await asyncio.gather(*(one(claimed) for _ in range(concurrent)))
            times.sort()
            p95 = times[max(int(len(times) * 0.95) - 1, 0)]
            what = "with the request_id claim" if claimed else "ClusterCore.run"
            print(
                f"{nodes} nodes, {concurrent} at once, {what:26} "
                f"median {statistics.median(times) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms"
            )
    finally:
        await core.close()
        await store.delete_prefix("")
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="berth-bench-placement-"))
    client, peer = free_port(), free_port()
    etcd = subprocess.Popen(
        [
            "etcd",
            f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(
            measure(f"127.0.0.1:{client}", max(args.nodes, 3), args.concurrent, args.rounds)
        )
    finally:
        etcd.terminate()
        etcd.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
