"""Scale (issue 14): what one operation, a listing and idle time cost as the cluster fills up.

One `berthd up --nodes 3` cluster is populated in steps (by default 10 -> 200 -> 2000 images,
0 -> 100 -> 600 containers, 3 -> 100 -> 1000 simulated nodes) and measured at each step:

  point operations  container inspect (GetContainer), image history, image tag, the builder's
                    FROM resolve (a cached rebuild of `FROM bench/busybox:1`): median and p95
  listings          ps (ListContainers), images (ListImages), registry ls (ListRepositories),
                    every page, RPC time from this process; `berth stats --no-stream` for every
                    container through the CLI, wall time
  placement         --concurrent RunContainer at once on the 3 hosts: p50 and p95 round trip;
                    the scheduler's own time per placement (its histogram) among the simulated
                    nodes
  CPU               each component's CPU (etcd, registry, cluster, image, builder, each node
                    agent) from /proc/<pid>/stat over a quiet --window, and the registry's, the
                    cluster's and the image service's while the step's images are pushed
  and, at the last step, `image prune -a` (all the pushed images).

Images are tiny (one small random layer each, one repository each), pushed with the typed
RegistryClient from a few threads. Containers run busybox `sleep` with a 16 MiB memory limit and
a constraint that keeps them off the simulated nodes (`nodes/<id>` records on an etcd lease, as
bench.cluster registers them, labelled sim=1); the scheduling figure places `true` containers
on those only (nothing starts). A summary gives each figure at the first and the last step,
their ratio and the issue's goal, met or missed.

    .venv/bin/python -m bench.scale                      # the defaults (about 15 minutes)
    .venv/bin/python -m bench.scale --quick              # a smoke run, about a minute
    .venv/bin/python -m bench.scale --sizes 10,2000 --containers 0,600 --nodes 3,1000
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from bench.cluster import Cluster, local_cluster, pct, read_node, reported, scrape
from bench.registry import BERTH, BenchError
from berth.client.builder import BuilderClient, BuildOptions
from berth.client.image import ImageClient
from berth.client.registry import RegistryClient
from berth.cluster.v1 import cluster_pb2 as cpb
from berth.types.v1 import container_pb2
from berthd.common.store import Store

IMAGE = "bench/busybox:1"  # what bench.cluster.prepare pushes and pulls onto every node
NODES = 3
SLEEP = ["sleep", "100000"]
MEMORY = 16 << 20  # the containers' memory limit (and their reservation on a node)
REAL_ONLY = "sim!=1"  # the simulated nodes carry the label sim=1
SIMULATED_ONLY = "sim==1"
FAKE_LEASE_TTL = 7200  # outlives the run; revoked at the end
RUNNING = container_pb2.CONTAINER_STATE_RUNNING
PUSH_THREADS = 4
RUN_THREADS = 6  # concurrent RunContainer calls while populating
SCHEDULING = "berth_cluster_scheduling_seconds"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FULL = {"sizes": "10,200,2000", "containers": "0,100,600", "nodes": "3,100,1000"}
QUICK = {"sizes": "5,20", "containers": "0,6", "nodes": "3,20"}


# --- figures -------------------------------------------------------------------------------------


@dataclass
class Step:
    images: int
    containers: int
    nodes: int
    # Figure name -> samples in seconds (latencies) or a single value (CPU %, seconds).
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    per_node: dict[str, int] = field(default_factory=dict)  # containers on each agent
    batch: int = 0  # images pushed at this step
    concurrent: int = 0  # RunContainer calls at once in the placement figure

    def label(self) -> str:
        return f"{self.images} images, {self.containers} containers, {self.nodes} sim. nodes"


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def sample(action: Callable[[], object], count: int, budget: float) -> list[float]:
    """Up to `count` timings of action, fewer when they use up `budget` seconds (at least 1)."""
    timings: list[float] = []
    began = time.perf_counter()
    while len(timings) < count and (not timings or time.perf_counter() - began < budget):
        timings.append(timed(action))
    return timings


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process, all its threads, from /proc/<pid>/stat."""
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextmanager
def cpu_meter(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """Yields a dict filled, on exit, with each component's CPU seconds over the block and
    "wall" with its wall-clock seconds."""
    result: dict[str, float] = {}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    began = time.perf_counter()
    yield result
    result["wall"] = time.perf_counter() - began
    for name, pid in pids.items():
        result[name] = cpu_seconds(pid) - before[name]


def percent(cpu: dict[str, float], name: str) -> float:
    return 100 * cpu[name] / cpu["wall"]


# --- tiny images ---------------------------------------------------------------------------------


def tiny_image(seed: int) -> tuple[list[tuple[str, bytes]], bytes]:
    """(blobs as (digest, bytes), manifest) of a one-layer image: 64 random bytes in one file."""
    rng = random.Random(seed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = rng.randbytes(64)
        member = tarfile.TarInfo(f"data-{seed}")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(raw.getvalue())]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"scale {seed}"}],
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_LAYER, "digest": digest(layer), "size": len(layer)}],
        }
    ).encode()
    return [(digest(layer), layer), (digest(config), config)], manifest


def digest(data: bytes) -> str:
    return "sha256:" + sha256(data).hexdigest()


def push_images(address: str, first: int, last: int) -> None:
    """Push images number first..last-1, each in a repository of its own, from a few threads."""

    def push(client: RegistryClient, number: int) -> None:
        repository = f"scale/img-{number:05d}"
        blobs, manifest = tiny_image(number)
        for blob_digest, data in blobs:
            client.push_blob(repository, io.BytesIO(data), blob_digest, len(data))
        client.put_manifest(repository, "1", MEDIA_MANIFEST, manifest)

    with RegistryClient(address) as client, ThreadPoolExecutor(PUSH_THREADS) as pool:
        list(pool.map(lambda n: push(client, n), range(first, last)))


# --- containers and simulated nodes --------------------------------------------------------------


def run_request(name: str = "", constraint: str = REAL_ONLY, command: list[str] | None = None):
    spec = container_pb2.ContainerSpec(
        image=IMAGE,
        name=name,
        command=command or SLEEP,
        resources=container_pb2.Resources(memory_bytes=MEMORY),
    )
    # A request_id, as berth's own clients send (no retry here: a failure shows).
    return cpb.RunContainerRequest(
        spec=spec, placement=cpb.Placement(constraints=[constraint]), request_id=uuid.uuid4().hex
    )


def run_containers(cluster: Cluster, names: list[str], threads: int) -> list[tuple[float, str]]:
    """RunContainer for each name, `threads` at once; (round trip, id) of each."""

    def place(name: str) -> tuple[float, str]:
        began = time.perf_counter()
        reply = cluster.stub.RunContainer(run_request(name), timeout=120)
        return time.perf_counter() - began, reply.container.id

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(place, names))


def running(cluster: Cluster, prefix: str = "") -> int:
    request = cpb.ListContainersRequest(name=prefix, state=RUNNING, page_size=1000)
    count, token = 0, ""
    while True:
        request.page_token = token
        reply = cluster.stub.ListContainers(request, timeout=60)
        count += len(reply.containers)
        token = reply.next_page_token
        if not token:
            return count


def wait_running(cluster: Cluster, prefix: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := running(cluster, prefix)) < count:
        if time.monotonic() > deadline:
            raise BenchError(f"{now} of {count} containers {prefix}* running after {timeout:.0f}s")
        time.sleep(0.5)


async def _with_store(cluster: Cluster, work: Callable[[Store], object]) -> object:
    store = Store(cluster.info["etcd"]["endpoint"], cluster.info["prefix"])
    await store.connect()
    try:
        return await work(store)  # type: ignore[misc]
    finally:
        await store.close()


def register_nodes(cluster: Cluster, template: dict, first: int, last: int) -> int:
    """Simulated nodes sim-<first>..sim-<last-1> on a new lease, as an agent registers itself."""

    async def work(store: Store) -> int:
        lease = await store.grant_lease(FAKE_LEASE_TTL)
        for number in range(first, last):
            node = f"sim-{number:04d}"
            labels = {"host": node, "sim": "1"}
            info = {**template, "id": node, "address": "127.0.0.1:9", "labels": labels}
            await store.put_json(f"nodes/{node}", info, lease=lease)
        return lease

    return int(asyncio.run(_with_store(cluster, work)))  # type: ignore[arg-type]


def revoke_leases(cluster: Cluster, leases: list[int]) -> None:
    async def work(store: Store) -> None:
        for lease in leases:
            await store.revoke_lease(lease)

    asyncio.run(_with_store(cluster, work))  # type: ignore[arg-type]


# --- measurements --------------------------------------------------------------------------------


class Bench:
    def __init__(self, cluster: Cluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        services = cluster.info["services"]
        self.registry_address = services["registry"]["address"]
        self.images = ImageClient(services["image"]["address"], timeout=600)
        self.builder = BuilderClient(services["builder"]["address"], timeout=600)
        self.registry = RegistryClient(self.registry_address)
        self.pids = {"etcd": int(cluster.info["etcd"]["pid"])}
        for name in ("registry", "cluster", "image", "builder"):
            self.pids[name] = int(services[name]["pid"])
        for node, info in sorted(cluster.info["nodes"].items()):
            self.pids[node] = int(info["pid"])
        self.pushed = 0
        self.containers: list[str] = []  # the population, without the probe
        self.probe = ""
        self.nodes = 0
        self.leases: list[int] = []
        self.template: dict = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
        self.env["BERTH_STATE_DIR"] = str(cluster.state)

    def close(self) -> None:
        self.images.close()
        self.builder.close()
        self.registry.close()

    def setup(self) -> None:
        """The probe container (inspected at every step, so there is one at 0 containers),
        the template of the simulated nodes, one untimed build and tag to warm the paths."""
        self.probe = run_containers(self.cluster, ["scale-probe"], 1)[0][1]
        wait_running(self.cluster, "scale-probe", 1, 120)
        self.template = asyncio.run(read_node(*self.etcd, "node-1"))
        self.from_resolve()
        self.images.tag(IMAGE, "scale/tagged:warm")

    @property
    def etcd(self) -> tuple[str, str]:
        return self.cluster.info["etcd"]["endpoint"], self.cluster.info["prefix"]

    # Populating --------------------------------------------------------------------------

    def populate(self, step: Step) -> None:
        if step.images > self.pushed:
            batch = step.images - self.pushed
            print(f"  pushing {batch} images", flush=True)
            with cpu_meter(self.pids) as cpu:
                push_images(self.registry_address, self.pushed, step.images)
            self.pushed = step.images
            step.batch = batch
            step.samples["push, ms per image"] = [cpu["wall"] / batch]
            for name in ("registry", "cluster", "image"):
                step.samples[f"CPU while pushing: {name}"] = [percent(cpu, name)]
            step.notes["push"] = f"{batch} images in {cpu['wall']:.1f}s"
        if step.nodes > self.nodes:
            print(f"  registering {step.nodes - self.nodes} simulated nodes", flush=True)
            self.leases.append(register_nodes(self.cluster, self.template, self.nodes, step.nodes))
            self.nodes = step.nodes
        if step.containers > len(self.containers):
            names = [f"scale-c{i:05d}" for i in range(len(self.containers), step.containers)]
            print(f"  running {len(names)} containers", flush=True)
            self.containers += [cid for _, cid in run_containers(self.cluster, names, RUN_THREADS)]
            wait_running(self.cluster, "scale-c", len(self.containers), 60 + len(names))
        step.per_node = dict(sorted(Counter(c.node_id for c in self.list_containers()).items()))
        step.notes["spread"] = ", ".join(f"{n} {c}" for n, c in step.per_node.items())

    def list_containers(self) -> list[cpb.Container]:
        request = cpb.ListContainersRequest(page_size=1000)
        found: list[cpb.Container] = []
        while True:
            reply = self.cluster.stub.ListContainers(request, timeout=120)
            found += reply.containers
            if not reply.next_page_token:
                return found
            request.page_token = reply.next_page_token

    # Figures ------------------------------------------------------------------------------

    def idle(self, step: Step) -> None:
        time.sleep(self.args.settle)  # let the work the population caused end
        with cpu_meter(self.pids) as cpu:
            time.sleep(self.args.window)
        for name in self.pids:
            step.samples[f"idle CPU: {name}"] = [percent(cpu, name)]

    def from_resolve(self) -> None:
        options = BuildOptions(tags=["scale/from:1"])
        result = self.builder.build(None, options, dockerfile_text=f"FROM {IMAGE}\n")
        if result.cached_steps != result.total_steps:
            raise BenchError(f"the FROM build was not cached ({result.cached_steps} steps)")

    def point_ops(self, step: Step, index: int) -> None:
        n, budget = self.args.samples, self.args.budget
        request = cpb.GetContainerRequest(container=self.probe)
        s = step.samples
        s["container inspect"] = sample(lambda: self.cluster.stub.GetContainer(request), n, budget)
        s["image history"] = sample(lambda: self.images.history(IMAGE), n, budget)
        tags = iter(range(10**6))
        tag = lambda: self.images.tag(IMAGE, f"scale/tagged:s{index}-{next(tags)}")  # noqa: E731
        s["image tag"] = sample(tag, n, budget)
        s["FROM resolve (cached build)"] = sample(self.from_resolve, n, budget)

    def listings(self, step: Step) -> None:
        n, budget = self.args.list_samples, self.args.budget
        s = step.samples
        containers = len(self.containers) + 1
        s["ps"] = sample(
            lambda: self.check(len(self.list_containers()), containers, "ps"), n, budget
        )
        # The first listing after a push fetches the new images' manifests and configs.
        images = self.pushed + 1  # and busybox (the tags made here are in other repositories)
        s["images, first after the push"] = [timed(lambda: self.images.images())]
        s["images"] = sample(lambda: self.at_least(len(self.images.images()), images, "images"),
                             n, budget)  # fmt: skip
        repos = self.pushed
        s["registry ls"] = sample(
            lambda: self.at_least(len(list(self.registry.iter_repositories())), repos, "repos"),
            n,
            budget,
        )
        s["stats --no-stream (CLI)"] = sample(lambda: self.stats(containers), n, budget)

    @staticmethod
    def check(got: int, expected: int, what: str) -> None:
        if got != expected:
            raise BenchError(f"{what}: listed {got}, expected {expected}")

    @staticmethod
    def at_least(got: int, expected: int, what: str) -> None:
        if got < expected:
            raise BenchError(f"{what}: listed {got}, expected at least {expected}")

    def stats(self, containers: int) -> None:
        argv = [BERTH, "stats", "--no-stream", "--format", "json"]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if done.returncode != 0:
            raise BenchError(f"berth stats failed: {done.stderr.strip()}")
        if len(json.loads(done.stdout)) != containers:
            raise BenchError(f"berth stats showed {len(json.loads(done.stdout))} of {containers}")

    def placement(self, step: Step, index: int) -> None:
        """--concurrent RunContainer at once, --placement-rounds times; removed afterwards."""
        rtts: list[float] = []
        step.concurrent = self.args.concurrent
        for number in range(self.args.placement_rounds):
            prefix = f"scale-p{index}-{number}-"
            names = [f"{prefix}{i}" for i in range(self.args.concurrent)]
            placed = run_containers(self.cluster, names, len(names))
            rtts += [rtt for rtt, _ in placed]
            wait_running(self.cluster, prefix, len(names), 120)
            self.remove([cid for _, cid in placed])
        step.samples["RunContainer, concurrent"] = rtts

    def scheduling(self, step: Step) -> None:
        """Sequential placements of `true` on the simulated nodes: the scheduler's mean time."""
        stub, metrics = self.cluster.stub, self.cluster.metrics
        before = [scrape(metrics, f"{SCHEDULING}_{kind}") for kind in ("sum", "count")]
        placed = []
        for _ in range(self.args.samples):
            reply = stub.RunContainer(run_request("", SIMULATED_ONLY, ["true"]), timeout=60)
            placed.append(reply.container.id)
            if not reply.container.node_id.startswith("sim-"):
                raise BenchError(f"placed on {reply.container.node_id}, not a simulated node")
        after = [scrape(metrics, f"{SCHEDULING}_{kind}") for kind in ("sum", "count")]
        step.samples["scheduling (server), mean"] = [
            (after[0] - before[0]) / (after[1] - before[1])
        ]
        self.remove(placed)

    def remove(self, containers: list[str]) -> None:
        def remove(container: str) -> None:
            request = cpb.RemoveContainerRequest(container=container, force=True)
            self.cluster.stub.RemoveContainer(request, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(remove, containers))

    def prune(self, step: Step) -> None:
        with cpu_meter(self.pids) as cpu:
            result = self.images.prune(all=True)
        step.samples["image prune -a"] = [cpu["wall"]]
        step.samples["CPU s during prune: cluster"] = [cpu["cluster"]]
        step.samples["CPU s during prune: image"] = [cpu["image"]]
        step.notes["prune"] = f"{len(result.removed)} images removed"
        # busybox runs in every container: prune -a must keep it.
        if not self.images.images(IMAGE.split(":")[0]):
            step.notes["prune"] += f", {IMAGE} among them though containers use it"

    def measure(self, step: Step, index: int) -> None:
        print(f"\n== step {index + 1}: {step.label()}", flush=True)
        self.populate(step)
        # Other work on the machine moves every figure: the load average is shown with them.
        step.notes["load"] = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        print(f"  load average {step.notes['load']}", flush=True)
        print(f"  on the agents: {step.notes['spread']}", flush=True)
        for part in (self.idle, lambda s: self.point_ops(s, index), self.listings,
                     lambda s: self.placement(s, index), self.scheduling):  # fmt: skip
            part(step)
        for name, values in step.samples.items():
            print(f"  {name:40} {show(name, values)}", flush=True)


# --- report --------------------------------------------------------------------------------------


def is_cpu(name: str) -> bool:
    return name.startswith(("idle CPU", "CPU while"))


def show(name: str, values: list[float]) -> str:
    if is_cpu(name):
        return f"{values[0]:.2f} % of a core"
    if name.startswith(("CPU s", "image prune")):
        return f"{values[0]:.2f} s"
    if name.startswith("push"):
        return f"{values[0] * 1000:.1f} ms"
    if len(values) == 1:
        return f"{values[0] * 1000:.1f} ms"
    median, p95 = statistics.median(values) * 1000, pct(values, 0.95) * 1000
    return f"median {median:.1f} ms, p95 {p95:.1f} ms ({len(values)} samples)"


def value(step: Step, name: str, p95: bool = False) -> float | None:
    values = step.samples.get(name)
    if not values:
        return None
    return pct(values, 0.95) if p95 else statistics.median(values)


@dataclass(frozen=True)
class Goal:
    """A row of the summary: a figure, how it is judged, the issue's words for the goal."""

    figure: str
    p95: bool = False
    text: str = ""
    ratio: float = 0.0  # met when last / first is at most this
    limit: float = 0.0  # met when the value at `at` is under this (seconds, or % of a core)
    at: str = "last"  # "last", or "containers=N": the step closest to N containers
    scope: str = ""  # what the size judged is: repos, containers, concurrent, nodes, batch, agent


GOALS = (
    Goal("container inspect", text="within 1.5x", ratio=1.5),
    Goal("image history", text="within 1.5x", ratio=1.5),
    Goal("image tag", text="within 1.5x", ratio=1.5),
    Goal("FROM resolve (cached build)", text="within 1.5x", ratio=1.5),
    Goal("ps", text="linear"),
    Goal("images", text="linear"),
    Goal("images, first after the push", text="issue: 4-7 ms per new image"),
    Goal("registry ls", text="< 100 ms at 2000 repositories", limit=0.1, scope="repos"),
    Goal(
        "stats --no-stream (CLI)",
        text="< 300 ms for 100 containers",
        limit=0.3,
        at="containers=100",
        scope="containers",
    ),
    Goal("RunContainer, concurrent", text="median"),
    Goal(
        "RunContainer, concurrent",
        p95=True,
        text="p95 < 100 ms, 30 at once",
        limit=0.1,
        scope="concurrent",
    ),
    Goal("scheduling (server), mean", text="< 20 ms with 1000 nodes", limit=0.02, scope="nodes"),
    Goal("push, ms per image"),
    Goal("CPU while pushing: registry"),
    Goal("CPU while pushing: cluster", text="< 1 % while 1500 pushed", limit=1.0, scope="batch"),
    Goal("CPU while pushing: image"),
    Goal("idle CPU: etcd"),
    Goal("idle CPU: registry"),
    Goal("idle CPU: cluster"),
    Goal("idle CPU: image"),
    Goal("idle CPU: builder"),
    Goal("idle CPU: node-1", text="< 1 % at 200 containers", limit=1.0, scope="agent"),
    Goal("idle CPU: node-2", text="< 1 % at 200 containers", limit=1.0, scope="agent"),
    Goal("idle CPU: node-3", text="< 1 % at 200 containers", limit=1.0, scope="agent"),
    Goal("image prune -a"),
    Goal("CPU s during prune: cluster"),
    Goal("CPU s during prune: image"),
)


def unit(name: str, number: float) -> str:
    if is_cpu(name):
        return f"{number:.2f} %"
    if name.startswith(("CPU s", "image prune")):
        return f"{number:.2f} s"
    return f"{number * 1000:.1f} ms"


def judged(goal: Goal, steps: list[Step]) -> tuple[str, str]:
    """(met / missed / "", which step the judgement used)."""
    first, last = steps[0], steps[-1]
    if goal.ratio:
        a, b = value(first, goal.figure, goal.p95), value(last, goal.figure, goal.p95)
        if a is None or b is None:
            return "", ""
        return ("met" if b / a <= goal.ratio else "MISSED"), "last/first"
    if not goal.limit:
        return "", ""
    step = last
    if goal.at.startswith("containers="):
        wanted = int(goal.at.split("=")[1])
        step = min(steps, key=lambda s: abs(s.containers - wanted))
    got = value(step, goal.figure, goal.p95)
    if got is None:
        return "", ""
    node = goal.figure.rsplit(" ", 1)[-1]
    where = {
        "repos": f"{step.images} repositories",
        "containers": f"{step.containers + 1} containers",
        "concurrent": f"{step.concurrent} at once",
        "nodes": f"{step.nodes} simulated nodes",
        "batch": f"{step.batch} pushed",
        "agent": f"{step.per_node.get(node, 0)} containers on it",
    }.get(goal.scope, "")
    return ("met" if got < goal.limit else "MISSED"), where


def summary(steps: list[Step]) -> list[str]:
    first, last = steps[0], steps[-1]
    lines = [
        f"first step: {first.label()}; last: {last.label()}",
        f"containers per agent at the last step: {last.notes.get('spread', '-')};"
        f" pushed last: {last.notes.get('push', '-')}; prune: {last.notes.get('prune', '-')}",
        "load average (1, 5, 15 min) at each step: "
        + "; ".join(step.notes.get("load", "?") for step in steps),
    ]
    header = f"{'figure':38}{'first':>12}{'last':>12}{'last/first':>12}  goal"
    lines += [header, "-" * (len(header) + 40)]
    for goal in GOALS:
        name = goal.figure + (" p95" if goal.p95 else "")
        a, b = value(first, goal.figure, goal.p95), value(last, goal.figure, goal.p95)
        if a is None and b is None:
            continue
        shown_a = unit(goal.figure, a) if a is not None else "-"
        shown_b = unit(goal.figure, b) if b is not None else "-"
        ratio = f"{b / a:.2f}x" if a and b is not None else "-"
        verdict, where = judged(goal, steps)
        text = f"{goal.text}: {verdict} ({where})" if verdict else goal.text
        lines.append(f"{name:38}{shown_a:>12}{shown_b:>12}{ratio:>12}  {text}")
    return lines


# --- main ----------------------------------------------------------------------------------------


def sizes(text: str, what: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated numbers, not {text!r}") from None
    if any(n < 0 for n in numbers) or numbers != sorted(numbers):
        raise argparse.ArgumentTypeError(f"{what}: growing, non-negative numbers: {text!r}")
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--sizes", help=f"images at each step (default {FULL['sizes']})")
    parser.add_argument("--containers", help=f"containers per step ({FULL['containers']})")
    parser.add_argument("--nodes", help=f"simulated nodes per step ({FULL['nodes']})")
    parser.add_argument("--samples", type=int, help="samples per point operation (20)")
    parser.add_argument("--list-samples", type=int, help="samples per listing (5)")
    parser.add_argument("--budget", type=float, default=30, help="seconds per figure and step,"
                        " after which it stops sampling (at least one sample)")  # fmt: skip
    parser.add_argument("--concurrent", type=int, help="RunContainer calls at once (30)")
    parser.add_argument("--placement-rounds", type=int, help="rounds of them per step (2)")
    parser.add_argument("--window", type=float, help="seconds of quiet for idle CPU (10)")
    parser.add_argument("--settle", type=float, default=3, help="seconds before that window")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    defaults = (20, 5, 30, 2, 10.0) if not args.quick else (3, 2, 6, 1, 2.0)
    for name, default in zip(
        ("samples", "list_samples", "concurrent", "placement_rounds", "window"),
        defaults,
        strict=True,
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        images = sizes(args.sizes or preset["sizes"], "--sizes")
        containers = sizes(args.containers or preset["containers"], "--containers")
        nodes = sizes(args.nodes or preset["nodes"], "--nodes")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not len(images) == len(containers) == len(nodes):
        parser.error("--sizes, --containers and --nodes need as many steps each")
    if (
        min(nodes) < 1
        or min(args.samples, args.list_samples, args.concurrent, args.placement_rounds) < 1
    ):
        parser.error(
            "--nodes, --samples, --list-samples, --concurrent and --placement-rounds must be"
            " positive"
        )
    steps = [Step(*sizes) for sizes in zip(images, containers, nodes, strict=True)]

    started = time.perf_counter()

    def bench() -> None:
        with local_cluster("scale", NODES) as cluster:
            measured = Bench(cluster, args)
            try:
                measured.setup()
                for index, step in enumerate(steps):
                    measured.measure(step, index)
                print("\n== image prune -a", flush=True)
                measured.prune(steps[-1])
                print(f"  {show('image prune -a', steps[-1].samples['image prune -a'])}"
                      f" ({steps[-1].notes['prune']})")  # fmt: skip
            finally:
                try:
                    revoke_leases(cluster, measured.leases)
                finally:
                    measured.close()
        print(f"\n{NODES} node agents (berthd up --nodes {NODES}); run took"
              f" {time.perf_counter() - started:.0f}s")  # fmt: skip
        print("\n".join(summary(steps)))

    return reported("bench.scale", bench)


if __name__ == "__main__":
    sys.exit(main())
