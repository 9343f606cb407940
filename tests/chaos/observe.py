"""What the invariants are checked against, read inside the control namespace:
`python -m tests.chaos.observe snapshot|gc|cleanup ...`, printing one JSON line.

A snapshot is plain data (tests/chaos/invariants.py judges it): the nodes, the service's replicas
as the cluster lists them and the containers each node agent itself reports, the acknowledged
containers as the cluster knows them and, with --pushes, what each acknowledged push reads back.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from berth.client import ClusterClient, NodeClient, RegistryClient
from berth.errors import BerthClientError
from tests.chaos.workload import CALL_TIMEOUT, SERVICE, read_image


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
        references = [r["ref"] for r in journal if r["op"] == "push"]
        with (
            RegistryClient(args.registry, timeout=CALL_TIMEOUT) as client,
            ThreadPoolExecutor(4) as pool,
        ):
            out["pushes"] = dict(
                zip(references, pool.map(lambda r: read(client, r), references), strict=True)
            )
    return out


def read(client: RegistryClient, reference: str) -> object:
    try:
        return read_image(client, reference)
    except BerthClientError as err:
        return failure(err)


def gc(args: argparse.Namespace) -> dict[str, object]:
    """Registry GC with no grace period: the workload is over, so every blob no manifest
    references goes, and every acknowledged push must survive it."""
    with RegistryClient(args.registry, timeout=120) as client:
        try:
            report = client.garbage_collect(grace_seconds=0)
        except BerthClientError as err:
            return {"error": failure(err)}
    return {"deleted": len(report.deleted), "uploads_removed": report.uploads_removed}


def cleanup(args: argparse.Namespace) -> dict[str, object]:
    with ClusterClient(args.cluster[0], timeout=CALL_TIMEOUT) as cluster:
        cluster.remove_service(SERVICE)
        for container in cluster.list(all=True):
            cluster.remove(container.id, force=True)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["snapshot", "gc", "cleanup"])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--cluster", action="append", required=True)
    parser.add_argument("--journal", default="")
    parser.add_argument("--pushes", action="store_true")
    args = parser.parse_args()
    print(json.dumps({"snapshot": snapshot, "gc": gc, "cleanup": cleanup}[args.mode](args)))


if __name__ == "__main__":
    main()
