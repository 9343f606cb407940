"""Push to deploy (issue 17): seconds from `push` returning to every replica of a 3-replica
service serving the new version, with its phases, and the requests that failed meanwhile.

One `berthd up --nodes 1` cluster. The service runs an image whose own CMD serves a page naming
its version, published through the routing mesh; a thread asks for the page on 127.0.0.1:PORT
in a loop the whole time. Each round pushes a new version of `bench/app:prod` and times:

    notice    push returned -> the service record names the new digest
    start     -> every replica of the new version running (pulled, created, started)
    healthy   -> the rolling update completed (a replica counts once running/healthy)
    serving   -> the mesh answered the new version 20 times in a row

Peer, measured in the same run in alternating rounds: the same rollout started by hand, with
`service update --image bench/app@DIGEST` right after the push (the ratio is the cost of the
follow machinery: the leader's watch and the re-resolution). Docker Swarm is not available on
this machine (no swarm-mode dockerd), so it is not a peer here.

    .venv/bin/python -m bench.deploy [--rounds 3] [--port 18090] [--update-order stop-first]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster import Cluster, local_cluster, reported
from berth.client import ClusterClient, ContainerConfig, RegistryClient
from berth.ports import PublishedPort
from berth.rollout import RolloutChanges
from berthd.node.ports import LOCALNET
from tests.integration.images import busybox_layer, push_image

REPOSITORY = "bench/app"
PHASES = ("notice", "start", "healthy", "serving")


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    last: str = ""
    streak: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


def loop(url: str, tally: Tally) -> None:
    """Ask for the page until stopped: each answer's version, and the failures."""
    while not tally.stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=3) as reply:
                page = reply.read().decode().strip()
            tally.ok += 1
            tally.streak = tally.streak + 1 if page == tally.last else 1
            tally.last = page
        except OSError:
            tally.failed += 1
            tally.streak = 0
        time.sleep(0.01)


def push(registry: RegistryClient, version: str, tmp: Path) -> str:
    cmd = ["sh", "-c", f"mkdir -p /www && echo {version} > /www/index.html && "
           "exec httpd -f -p 8080 -h /www"]  # fmt: skip
    return push_image(registry, REPOSITORY, "prod", [busybox_layer()], tmp, cmd=cmd)


def wait(check, what: str, timeout: float = 120) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def rollout(
    client: ClusterClient, registry: RegistryClient, name: str, version: str, tally: Tally,
    tmp: Path, by_hand: bool,
) -> tuple[dict[str, float], int]:  # fmt: skip
    """One push and the rollout it causes: the phases' cumulative seconds, and the failed
    requests from the push to the end."""
    failed_before = tally.failed
    digest = push(registry, version, tmp)
    pushed = time.monotonic()
    image = f"{REPOSITORY}@{digest}"
    if by_hand:
        client.update_service(name, image=image)
    marks = {"notice": wait(lambda: client.service(name).image == image, "the new digest")}

    def started() -> bool:
        running = [c for c in client.service_ps(name) if c.state == "running"]
        return len(running) == 3 and all(c.image == image for c in running)

    marks["start"] = wait(started, "the new replicas")
    marks["healthy"] = wait(lambda: client.service(name).update_state == "completed", "done")
    try:
        marks["serving"] = wait(lambda: tally.last == version and tally.streak >= 20, "the page")
    except RuntimeError:
        explain(client, name, version, tally)
        raise
    return {k: v - pushed for k, v in marks.items()}, tally.failed - failed_before


def explain(client: ClusterClient, name: str, version: str, tally: Tally) -> None:
    """Why the mesh did not serve `version`: the tally, the replicas and the mesh's rules."""
    print(f"  waiting for {version}: last page {tally.last!r}, streak {tally.streak}, "
          f"{tally.ok} answered, {tally.failed} failed", flush=True)  # fmt: skip
    for c in client.service_ps(name):
        print(f"  {c.name} {c.id[:12]} {c.state} {c.image} {c.health.get('Status', '')}")
    rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    print("\n".join(f"  {line.strip()}" for line in rules.splitlines() if "numgen" in line))


def run(args: argparse.Namespace) -> None:
    with local_cluster("deploy", 1) as cluster, tempfile.TemporaryDirectory() as tmp:
        measure(cluster, args, Path(tmp))


def measure(cluster: Cluster, args: argparse.Namespace, tmp: Path) -> None:
    services = cluster.info["services"]
    with (
        ClusterClient(services["cluster"]["address"]) as client,
        RegistryClient(services["registry"]["address"]) as registry,
    ):
        push(registry, "v0", tmp)
        results: dict[bool, list[tuple[dict[str, float], int]]] = {False: [], True: []}
        for by_hand in (False, True):
            name = "hand" if by_hand else "follow"
            port = args.port + by_hand
            client.create_service(
                name,
                ContainerConfig(f"{REPOSITORY}:prod", network_mode="berth"),
                3,
                ports=[PublishedPort(8080, port)],
                follow="" if by_hand else "tag",
                update_config=RolloutChanges(order=args.update_order),
            )
            tally = Tally()
            thread = threading.Thread(target=loop, args=(f"http://127.0.0.1:{port}/", tally))
            thread.start()
            try:
                wait(lambda: tally.streak >= 20, "the first page")  # noqa: B023
                for n in range(args.rounds):
                    version = f"{name}-{n + 1}"
                    phases, failed = rollout(client, registry, name, version, tally, tmp, by_hand)
                    results[by_hand].append((phases, failed))
                    shown = ", ".join(f"{p} {phases[p]:.2f}s" for p in PHASES)
                    print(f"  {name} round {n + 1}: {shown}; {failed} failed requests",
                          flush=True)  # fmt: skip
            finally:
                tally.stop.set()
                thread.join(10)
                client.remove_service(name)
    follow = statistics.median(p["serving"] for p, _ in results[False])
    hand = statistics.median(p["serving"] for p, _ in results[True])
    for by_hand, label in ((False, "follow"), (True, "by hand")):
        medians = {p: statistics.median(r[p] for r, _ in results[by_hand]) for p in PHASES}
        failed = sum(f for _, f in results[by_hand])
        print(f"{label}: " + ", ".join(f"{p} {medians[p]:.2f}s" for p in PHASES)
              + f" (medians); {failed} failed requests in {args.rounds} rollouts")  # fmt: skip
    print(f"push to serving, following the tag {follow:.2f}s, `service update --image` right "
          f"after the push (peer) {hand:.2f}s: ratio {follow / hand:.2f}")  # fmt: skip


def measured(args: argparse.Namespace) -> None:
    # The agent turns route_localnet on (127.0.0.1:PORT works); put it back as it was.
    localnet = LOCALNET.read_text()
    try:
        run(args)
    finally:
        LOCALNET.write_text(localnet)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18090)
    # Start-first with the drain is the order that drops no request; stop-first for comparison.
    parser.add_argument(
        "--update-order", choices=("start-first", "stop-first"), default="start-first"
    )
    args = parser.parse_args()
    print("Push to deploy: a 3-replica service, push to every replica serving the new version")
    return reported("deploy", lambda: measured(args))


if __name__ == "__main__":
    sys.exit(main())
