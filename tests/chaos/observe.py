"""What the invariants are checked against, read inside the control namespace:
`python -m tests.chaos.observe snapshot|records|gc|rebuild|cleanup ...`, printing one JSON line.

A snapshot is plain data (tests/chaos/invariants.py judges it): the nodes, the service's replicas
as the cluster lists them and the containers each node agent itself reports, the acknowledged
containers as the cluster knows them and, with --pushes, what each acknowledged push or build
reads back, and what the tag of each failed build reads back. `records` is the image records:
each manifest the registry holds with the blobs it names that are missing, and the builder's
records in etcd (image origins, cache steps), each as decoded or why it does not decode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from berth.client import ClusterClient, NodeClient, RegistryClient
from berth.client.registry import ManifestInfo
from berth.errors import BerthClientError
from berthd.common.state.build_cache import BUILD_CACHE
from berthd.common.state.family import DECODE_ERRORS, Family
from berthd.common.state.images import BUILDS
from berthd.common.store import Store
from tests.chaos.workload import CALL_TIMEOUT, SERVICE, build, read_image


def failure(err: BerthClientError) -> dict[str, str]:
    return {"code": err.code, "message": err.message}


def snapshot(args: argparse.Namespace) -> dict[str, object]:
    journal = [json.loads(line) for line in Path(args.journal).read_text().splitlines()]
    out: dict[str, object] = {}
    with ClusterClient(args.cluster[0], timeout=CALL_TIMEOUT) as cluster:
        nodes = cluster.nodes()
        out["nodes"] = {n.id: n.state for n in nodes}
        out["replicas"] = [
            {"name": c.name, "slot": c.slot, "node": c.node_id, "state": c.state}
            for c in cluster.service_ps(SERVICE)
        ]
        out["containers"] = {
            c.id: {
                "name": c.name,
                "state": c.state,
                "exit_code": c.exit_code,
                "failure_reason": c.failure_reason,
                "node_ready": c.node_ready,
            }
            for c in cluster.list(all=True)
        }
    on_nodes: dict[str, object] = {}
    for node in nodes:
        try:
            with NodeClient(node.address, timeout=CALL_TIMEOUT) as agent:
                on_nodes[node.id] = [
                    {"name": c.name, "state": c.state} for c in agent.list(all=True)
                ]
        except BerthClientError as err:
            on_nodes[node.id] = failure(err)
    out["on_nodes"] = on_nodes
    if args.pushes:
        references = [r["ref"] for r in journal if r["op"] in ("push", "build")]
        failed = [r["ref"] for r in journal if r["op"] == "error" and r["what"] == "build"]
        with (
            RegistryClient(args.registry, timeout=CALL_TIMEOUT) as client,
            ThreadPoolExecutor(4) as pool,
        ):
            out["pushes"] = dict(
                zip(references, pool.map(lambda r: read(client, r), references), strict=True)
            )
            out["failed_builds"] = dict(
                zip(failed, pool.map(lambda r: read(client, r), failed), strict=True)
            )
    return out


def read(client: RegistryClient, reference: str) -> object:
    try:
        return read_image(client, reference)
    except BerthClientError as err:
        return failure(err)


def records(args: argparse.Namespace) -> dict[str, object]:
    with RegistryClient(args.registry, timeout=CALL_TIMEOUT) as client:
        manifests = list(client.iter_manifests())
        with ThreadPoolExecutor(4) as pool:
            missing = list(pool.map(lambda m: missing_blobs(client, m), manifests))
    out: dict[str, object] = {
        "manifests": [
            {"repository": m.repository, "digest": m.digest, "missing": gone}
            for m, gone in zip(manifests, missing, strict=True)
        ]
    }
    out |= asyncio.run(etcd_records(args.etcd, args.prefix))
    return out


def missing_blobs(client: RegistryClient, manifest: ManifestInfo) -> list[str]:
    """The blobs `manifest` names that its repository does not hold."""
    return [d for d in manifest.references if client.stat_blob(manifest.repository, d) is None]


async def etcd_records(endpoint: str, prefix: str) -> dict[str, object]:
    """The builder's records: builds/<digest> and build-cache/<key>."""
    store = Store(endpoint, prefix)
    await store.connect()
    try:
        builds = await raw_records(store, BUILDS)
        cache = await raw_records(store, BUILD_CACHE)
    finally:
        await store.close()
    return {
        "builds": {
            digest: r if isinstance(r, str) else {"dockerfile": r.dockerfile}
            for digest, r in builds.items()
        },
        "cache": {
            key: r
            if isinstance(r, str)
            else {"layer": r.layer.digest if r.layer else "", "image": r.image}
            for key, r in cache.items()
        },
    }


async def raw_records(store: Store, family: Family) -> dict[str, object]:
    """Every record of `family` by id, decoded, or the reason it does not decode (a str): the
    family's own list skips such a record, and the invariants must see it."""
    found: dict[str, object] = {}
    async for entry in store.iterate(family.prefix):
        record_id = family.id_of(entry.key)
        if record_id is None:
            continue
        try:
            found[record_id] = family.decode(record_id, entry.value)
        except DECODE_ERRORS as err:
            found[record_id] = f"does not decode: {err}"
    return found


def gc(args: argparse.Namespace) -> dict[str, object]:
    """Registry GC with no grace period: the workload is over, so every blob no manifest
    references goes, and every acknowledged push must survive it."""
    with RegistryClient(args.registry, timeout=120) as client:
        try:
            report = client.garbage_collect(grace_seconds=0)
        except BerthClientError as err:
            return {"error": failure(err)}
    return {"deleted": len(report.deleted), "uploads_removed": report.uploads_removed}


def rebuild(args: argparse.Namespace) -> dict[str, object]:
    """Build an acknowledged build's context again, once the run is over."""
    try:
        return {"digest": build(args.builder, Path(args.context), args.tag)}
    except BerthClientError as err:
        return {"error": failure(err)}


def cleanup(args: argparse.Namespace) -> dict[str, object]:
    with ClusterClient(args.cluster[0], timeout=CALL_TIMEOUT) as cluster:
        cluster.remove_service(SERVICE)
        for container in cluster.list(all=True):
            cluster.remove(container.id, force=True)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    modes = {
        "snapshot": snapshot,
        "records": records,
        "gc": gc,
        "rebuild": rebuild,
        "cleanup": cleanup,
    }
    parser.add_argument("mode", choices=list(modes))
    parser.add_argument("--registry", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--builder", required=True)
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--cluster", action="append", required=True)
    parser.add_argument("--journal", default="")
    parser.add_argument("--pushes", action="store_true")
    parser.add_argument("--context", default="")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    print(json.dumps(modes[args.mode](args)))


if __name__ == "__main__":
    main()
