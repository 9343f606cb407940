"""The chaos workload, run inside the harness's control namespace (the test process has no
route to the test subnet): `python -m tests.chaos.workload setup|run ...`.

`setup` pushes the base image and creates the 3-replica service. `run` pushes, pulls, tags
(through the image service), builds (through the builder: a COPY and a RUN on the busybox base or
on an image built before, and now and then a rebuild of an acknowledged build's context, which
must be all cached and give the very same image) and runs containers until the stop file appears,
appending every acknowledged operation (the call returned OK) to a journal, one JSON object a
line: what the invariants hold the cluster to. Built images are pulled, tagged and run like
pushed ones.
Failed calls are expected while components are down; they are journaled with their status code
and message, which must be honest (no raw exception text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from berth.client import ClusterClient, ContainerConfig, ImageClient, RegistryClient
from berth.client.builder import BuilderClient, BuildOptions
from berth.errors import BerthClientError
from tests.integration.images import busybox_layer, push_image, tar_of

BASE = "chaos/busybox:1"
SERVICE = "web"
REPLICAS = 3
# Ends at once on SIGTERM (PID 1 ignores it without a handler).
SERVE = "trap 'exit 0' TERM; while true; do sleep 1; done"
CALL_TIMEOUT = 20  # a call to a dead component fails after this, and the workload goes on
LIVE_CONTAINERS = 12  # acknowledged containers kept; older ones are removed (bounds the load)
# A guard, not a promise: a build that takes this long under faults is hung (check_failed_builds).
BUILD_DEADLINE = 240
REBUILD_CHANCE = 0.3
ON_BUILT_CHANCE = 0.4  # a new build starts FROM an image built before, not the base


class Journal:
    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run
        self._lock = threading.Lock()

    def write(self, **record: object) -> None:
        with self._lock:
            self._file.write(json.dumps(record) + "\n")


def error_record(what: str, err: Exception, **facts: str) -> dict[str, str]:
    if isinstance(err, BerthClientError):
        return {"op": "error", "what": what, "code": err.code, "message": err.message, **facts}
    return {"op": "error", "what": what, "code": type(err).__name__, "message": str(err), **facts}


def write_context(directory: Path, n: int, base: str, data: bytes) -> Path:
    """Build n's context: its own data (so its COPY and RUN are new to the cache) on `base`."""
    directory.mkdir(parents=True)
    (directory / "data.txt").write_bytes(data)
    (directory / "Dockerfile").write_text(
        f"FROM {base}\n"
        f"COPY data.txt /chaos/data-{n}.txt\n"
        f"RUN wc -c /chaos/data-{n}.txt > /chaos/built-{n} && echo build {n} >> /chaos/built-{n}\n"
        f"ENV CHAOS_BUILD={n}\n"
    )
    return directory


def build(address: str, context: Path, reference: str) -> str:
    """Build `context` tagged `reference`; the image's manifest digest."""
    with BuilderClient(address, timeout=CALL_TIMEOUT) as builder:
        options = BuildOptions(tags=[reference])
        return builder.build(context, options, deadline=BUILD_DEADLINE).digest


class Workload:
    def __init__(self, args: argparse.Namespace, journal: Journal) -> None:
        self.registry = args.registry
        self.image = args.image
        self.builder = args.builder
        self.contexts = Path(args.journal).parent / "contexts"  # kept for the final rebuild
        self.clusters = args.cluster
        self.stop_file = Path(args.stop)
        self.journal = journal
        self.rng = random.Random(args.seed)
        self.pushed: list[tuple[str, str]] = []  # (reference, digest) acknowledged
        self.unanswered: set[str] = set()  # containers a remove was sent for, answer lost
        self.lock = threading.Lock()
        self.base_layer = busybox_layer()

    def stopped(self) -> bool:
        return self.stop_file.exists()

    def cluster(self) -> ClusterClient:
        # Either instance serves requests; the leader's controller places.
        return ClusterClient(self.rng.choice(self.clusters), timeout=CALL_TIMEOUT)

    def attempt(self, what: str, fn) -> object:  # type: ignore[no-untyped-def]
        try:
            return fn()
        except Exception as err:  # every failure is journaled, then the workload goes on
            self.journal.write(**error_record(what, err))
            time.sleep(0.5)
            return None

    def pushes(self) -> None:
        n = 0
        while not self.stopped():
            n += 1
            reference = f"chaos/p{n}:1"
            # Uploads of up to a few MiB, so some are cut mid-way by a kill.
            size = self.rng.choice([16 << 10, 256 << 10, 2 << 20])
            unique = tar_of({"data.bin": os.urandom(self.rng.randint(1, size))})

            def push(reference: str = reference, unique: bytes = unique) -> str:
                repository, tag = reference.split(":")
                with (
                    RegistryClient(self.registry, timeout=CALL_TIMEOUT) as client,
                    tempfile.TemporaryDirectory() as tmp,
                ):
                    layers = [self.base_layer, unique]
                    return push_image(client, repository, tag, layers, Path(tmp))

            digest = self.attempt("push", push)
            if digest:
                self.journal.write(op="push", ref=reference, digest=digest)
                with self.lock:
                    self.pushed.append((reference, str(digest)))
            time.sleep(self.rng.uniform(0.2, 1.0))

    def tags(self) -> None:
        """Tag acknowledged pushes anew through the image service: each acknowledged tag is a
        push the invariants hold the registry to."""
        n = 0
        while not self.stopped():
            with self.lock:
                choice = self.rng.choice(self.pushed) if self.pushed else None
            if choice:
                n += 1
                target = f"chaos/tagged:{n}"

                def tag(source: str = choice[0], target: str = target) -> str:
                    with ImageClient(self.image, timeout=CALL_TIMEOUT) as images:
                        return images.tag(source, target)

                digest = self.attempt("tag", tag)
                if digest:
                    self.journal.write(op="push", ref=target, digest=digest, source=choice[0])
                    if digest != choice[1]:
                        self.journal.write(op="bad_read", ref=target, want=choice[1], got=digest)
            time.sleep(self.rng.uniform(1.0, 3.0))

    def pulls(self) -> None:
        while not self.stopped():
            with self.lock:
                choice = self.rng.choice(self.pushed) if self.pushed else None
            if choice:
                self.attempt("pull", lambda c=choice: self.pull(*c))
            time.sleep(self.rng.uniform(0.2, 1.0))

    def pull(self, reference: str, digest: str) -> None:
        """Read an acknowledged push back; a wrong answer (not a failed call) is journaled."""
        with RegistryClient(self.registry, timeout=CALL_TIMEOUT) as client:
            got = read_image(client, reference)
        if got != digest:
            self.journal.write(op="bad_read", ref=reference, want=digest, got=got)

    def builds(self) -> None:
        """New builds, and rebuilds of acknowledged ones under a new tag; each acknowledged
        build is a push the invariants hold the registry to, and a failed one is journaled
        with its tag (whatever that tag names afterwards must read back whole)."""
        n = 0
        built: list[dict[str, str]] = []  # acknowledged: context, ref, digest
        while not self.stopped():
            n += 1
            reference = f"chaos/b{n}:1"
            facts: dict[str, str] = {}
            if built and self.rng.random() < REBUILD_CHANCE:
                again = self.rng.choice(built)
                context = Path(again["context"])
                facts = {"rebuild_of": again["ref"], "want": again["digest"]}
            else:
                on_built = built and self.rng.random() < ON_BUILT_CHANCE
                base = self.rng.choice(built)["ref"] if on_built else BASE
                data = os.urandom(self.rng.randint(1, 64 << 10)).hex().encode()
                context = write_context(self.contexts / f"b{n}", n, base, data)
            began = time.monotonic()
            try:
                digest = build(self.builder, context, reference)
            except Exception as err:  # journaled with the tag it may have left behind
                seconds = round(time.monotonic() - began, 1)
                self.journal.write(**error_record("build", err, ref=reference), seconds=seconds)
                time.sleep(0.5)
                continue
            self.journal.write(
                op="build", ref=reference, digest=digest, context=str(context), **facts
            )
            built.append({"context": str(context), "ref": reference, "digest": digest})
            with self.lock:
                self.pushed.append((reference, digest))
            time.sleep(self.rng.uniform(0.5, 2.0))

    def runs(self) -> None:
        n = 0
        live: list[str] = []
        while not self.stopped():
            n += 1
            with self.lock:
                images = [BASE] + [ref for ref, _ in self.pushed[-5:]]
            long = self.rng.random() < 0.4
            command = ["sh", "-c", SERVE if long else f"echo run {n}; exit {n % 4}"]
            config = ContainerConfig(
                self.rng.choice(images), name=f"chaos-run-{n}", command=command
            )

            def run(config: ContainerConfig = config) -> str:
                with self.cluster() as cluster:
                    return cluster.run(config).id

            cid = self.attempt("run", run)
            if cid:
                self.journal.write(op="run", id=cid, name=config.name, image=config.image)
                live.append(str(cid))
            if len(live) > LIVE_CONTAINERS and self.remove(live[0]):
                live.pop(0)
            time.sleep(self.rng.uniform(1.0, 3.0))

    def remove(self, cid: str) -> bool:
        """Remove an acknowledged container; True once it is gone (journaled as removed). An
        attempt whose answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED) may have removed it:
        NOT_FOUND after one is that removal. NOT_FOUND at the first attempt is not: the
        container was lost, and it stays acknowledged for the invariants to report."""
        try:
            with self.cluster() as cluster:
                cluster.remove(cid, force=True)
        except BerthClientError as err:
            if err.code == "NOT_FOUND" and cid in self.unanswered:
                self.journal.write(op="removed", id=cid, after_lost_answer=True)
                return True
            self.journal.write(**error_record("remove", err))
            if err.code == "NOT_FOUND":
                return True  # nothing left to remove; the invariants see it gone
            self.unanswered.add(cid)
            time.sleep(0.5)
            return False
        self.journal.write(op="removed", id=cid)
        return True


def read_image(client: RegistryClient, reference: str) -> str:
    """The digest of `reference`'s manifest, after reading every blob it names (each checked
    against its digest by the client) and the manifest's own bytes against the digest."""
    repository, tag = reference.split(":")
    manifest = client.get_manifest(repository, tag)
    if "sha256:" + hashlib.sha256(manifest.content).hexdigest() != manifest.digest:
        return "manifest bytes do not match " + manifest.digest
    body = json.loads(manifest.content)
    with tempfile.TemporaryDirectory() as tmp:
        for n, descriptor in enumerate([body["config"], *body["layers"]]):
            client.pull_blob(repository, descriptor["digest"], Path(tmp) / f"blob-{n}")
    return manifest.digest


def setup(args: argparse.Namespace) -> None:
    with RegistryClient(args.registry) as client, tempfile.TemporaryDirectory() as tmp:
        repository, tag = BASE.split(":")
        push_image(client, repository, tag, [busybox_layer()], Path(tmp))
    with ClusterClient(args.cluster[0]) as cluster:
        cluster.create_service(
            SERVICE, ContainerConfig(BASE, command=["sh", "-c", SERVE]), REPLICAS
        )
        deadline = time.monotonic() + 120  # a guard against a hang, not a promise
        while sum(c.state == "running" for c in cluster.service_ps(SERVICE)) != REPLICAS:
            if time.monotonic() > deadline:
                raise SystemExit(f"{SERVICE} did not reach {REPLICAS} running replicas")
            time.sleep(0.2)
    print(json.dumps(True))


def run(args: argparse.Namespace) -> None:
    workload = Workload(args, Journal(Path(args.journal)))
    threads = [
        threading.Thread(target=fn, name=fn.__name__)
        for fn in (workload.pushes, workload.pulls, workload.tags, workload.builds, workload.runs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["setup", "run"])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--builder", required=True)
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--cluster", action="append", required=True)
    parser.add_argument("--journal", default="")
    parser.add_argument("--stop", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (setup if args.mode == "setup" else run)(args)


if __name__ == "__main__":
    main()
