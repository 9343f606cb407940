"""Container start latency and cold image pull: berth's node agent vs. raw runc, podman, skopeo.

Part 1 (`start`): a busybox image already on the node; the median over --runs of
  - start: a created container (`sleep`) until its process runs: berth `NodeClient.start()`
    (StartContainer), `runc run -d` of an equivalent bundle, `podman start`;
  - end to end: a `true` container created, started and waited for: berth create + start +
    wait, `runc run`, `podman run --rm`.
Part 2 (`pull`): a cold pull + unpack of a random image (--layers x --layer-mb MiB): berth
`NodeClient.pull` on a node with an empty layer store vs. `skopeo copy` from docker-registry
followed by `umoci unpack`, the median over --rounds, in MB/s of blob bytes.

    .venv/bin/python -m bench.node [--runs 20] [--rounds 3] [--layers 4] [--layer-mb 64]
    .venv/bin/python -m bench.node --runs 5 --layer-mb 8          # a quick check
    .venv/bin/python -m bench.node --only start                   # one part
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.registry import (
    BERTH,
    BERTHD,
    ROOT_BLOB_INFO_CACHE,
    BenchError,
    blob_bytes,
    check_same_image,
    free_port,
    manifest_digest,
    port_is_free,
    rate,
    run,
    skopeo,
    start_docker_registry,
    stop_berth,
    stop_process,
)
from berth.client.node import NodeClient, PullProgress
from berth.containers import ContainerConfig
from berth.errors import BerthClientError
from berthd.localcluster import SERVICES, Ports, use_state_credentials
from scripts.oci_images import make_busybox_image, make_random_image

BUSYBOX_REF = "latest"
BUSYBOX_REPO = "bench/busybox:1"
RANDOM_REF = "bench"
RANDOM_REPO = "bench/random:1"
# The long-running command of the start figures; removed (untimed) after each sample.
SLEEP = ["sleep", "3600"]
TRUE = ["true"]
# podman configuration from HOST-NOTES: runc (crun fails here), cgroupfs, no journald, and
# rlimits that root without CAP_SYS_RESOURCE may set.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_config_dir = "{network_config_dir}"
"""
# Rootful podman always creates netavark's run directory here (it cannot be moved); removed
# again afterwards when the bench made it and it is empty.
PODMAN_RUN_DIRS = (Path("/run/containers/networks"), Path("/run/containers"))
SIDES = ("berth", "runc", "podman")


@dataclass
class Samples:
    """Seconds per sample, by figure name."""

    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.figures.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])


# --- helpers -------------------------------------------------------------------------------------


def output(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run argv to completion and return its stdout, or raise with its output."""
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        text = "\n".join(part for part in (done.stdout.strip(), done.stderr.strip()) if part)
        raise BenchError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{text}")
    return done.stdout


def run_to_file(argv: list[str], what: str, log: Path, env: dict[str, str] | None = None) -> float:
    """Like registry.run, but stdout and stderr go to a file: a detached container inherits
    them, so pipes would stay open (and the call would block) until the container exits."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        elapsed = time.perf_counter() - start
    if done.returncode != 0:
        text = log.read_text(errors="replace").strip()
        raise BenchError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{text}")
    return elapsed


def cluster_base_port() -> int:
    """A base port for `berthd up` under which etcd and every service's ports are free."""
    for _ in range(200):
        base = free_port()
        ports = Ports(base)
        wanted = [ports.etcd, ports.etcd_peer]
        for index in range(len(SERVICES)):
            wanted += ports.service(index)
        if max(wanted) <= 65535 and all(port_is_free(port) for port in wanted):
            return base
    raise BenchError("found no free range of ports for `berthd up`")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def unmount_all(path: Path, who: str) -> None:
    """Unmount whatever is still mounted below `path`, saying so: it should be nothing."""
    left = mounts_under(path)
    if left:
        print(f"bench: {who} left {len(left)} mount(s) under {path}; unmounting", flush=True)
    for point in left:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_cgroup(relative: str) -> None:
    """Remove a cgroup (and its children) in every hierarchy; they must be empty by now."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / relative.strip("/")
        if hierarchy.is_symlink() or not top.is_dir():
            continue
        for directory in sorted(
            (d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def isolated_blob_info_cache(argv: list[str], scratch: Path) -> list[str]:
    """argv run with an empty containers/image blob-info cache in a private mount namespace,
    as registry.skopeo does, so the host's cache is neither read nor changed."""
    cache = scratch / "blob-info-cache"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    ROOT_BLOB_INFO_CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind "$0" {ROOT_BLOB_INFO_CACHE} && exec "$@"',
        str(cache),
        *argv,
    ]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# --- berth ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def berth_cluster(state: Path) -> Iterator[dict]:
    """`berthd up` in a new state directory; `berthd down` and removal afterwards."""
    try:
        run(
            [BERTHD, "up", "--state-dir", str(state), "--base-port", str(cluster_base_port())],
            "berthd up",
        )
        # Clients here and the CLI commands run from here use this cluster's CA and admin
        # certificate.
        use_state_credentials(state)
        yield json.loads((state / "cluster.json").read_text())
    finally:
        try:
            stop_berth(state)
        finally:
            unmount_all(state, "berthd down")
            shutil.rmtree(state, ignore_errors=True)


class BerthSide:
    """A node agent that already has the busybox image."""

    def __init__(self, cluster: dict, state: Path, layout: Path) -> None:
        self.state = state
        registry = cluster["services"]["registry"]["address"]
        run(
            [BERTH, "--registry", registry, "oci", "push", f"{layout}:{BUSYBOX_REF}", BUSYBOX_REPO],
            "berth oci push (busybox)",
        )
        self.client = NodeClient(cluster["services"]["node"]["address"])
        self.image = self.client.pull(BUSYBOX_REPO)
        self.removals: list[float] = []

    def close(self) -> None:
        self.client.close()

    def runtime_config(self, files: Path) -> dict:
        """The config.json the agent writes for a container of this image. The files it
        bind-mounts from the container's directory (/etc/hosts, hostname, resolv.conf) go away
        with the container: they are copied to `files` and the config points there."""
        probe = self.client.create(ContainerConfig(BUSYBOX_REPO, command=TRUE))
        try:
            container_dir = self.state / "node-1" / "containers" / probe.id
            config = json.loads((container_dir / "bundle" / "config.json").read_text())
            files.mkdir(parents=True)
            for mount in config["mounts"]:
                source = Path(mount.get("source", ""))
                if mount.get("type") == "bind" and source.is_relative_to(container_dir):
                    copy = files / mount["destination"].strip("/").replace("/", "_")
                    shutil.copy2(source, copy)
                    mount["source"] = str(copy)
            return config
        finally:
            self.client.remove(probe.id, force=True)

    def _remove(self, container: str) -> None:
        started = time.perf_counter()
        self.client.remove(container, force=True)
        self.removals.append(time.perf_counter() - started)

    def start_once(self) -> float:
        created = self.client.create(ContainerConfig(BUSYBOX_REPO, command=SLEEP))
        try:
            started = time.perf_counter()
            info = self.client.start(created.id)
            elapsed = time.perf_counter() - started
            if info.state != "running" or info.pid <= 0:
                raise BenchError(f"berth: started container is {info.state}, pid {info.pid}")
            os.kill(info.pid, 0)  # the process really runs
            return elapsed
        finally:
            self._remove(created.id)

    def true_once(self) -> float:
        started = time.perf_counter()
        created = self.client.create(ContainerConfig(BUSYBOX_REPO, command=TRUE))
        try:
            self.client.start(created.id)
            code = self.client.wait(created.id)
            elapsed = time.perf_counter() - started
        finally:
            self._remove(created.id)
        if code != 0:
            raise BenchError(f"berth: `true` exited with {code}")
        return elapsed


# --- raw runc ------------------------------------------------------------------------------------


class RuncSide:
    """runc alone, on bundles made from the agent's own config.json and the same rootfs."""

    def __init__(self, work: Path, layout: Path, agent_config: dict, cgroup: str) -> None:
        self.work = work
        self.root = work / "state"  # runc --root: the host's /run/runc is left alone
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = work / "runc.log"
        self.cgroup = cgroup
        unpacked = work / "unpacked"
        run(["umoci", "unpack", "--image", f"{layout}:{BUSYBOX_REF}", str(unpacked)], "umoci")
        self.bundles = {
            "start": self._bundle("start", agent_config, unpacked / "rootfs", SLEEP),
            "true": self._bundle("true", agent_config, unpacked / "rootfs", TRUE),
        }
        self.count = 0

    def _bundle(self, name: str, agent: dict, rootfs: Path, args: list[str]) -> Path:
        """The agent's config with only the root path, the command and the cgroup changed."""
        bundle = self.work / f"bundle-{name}"
        bundle.mkdir(parents=True)
        config = json.loads(json.dumps(agent))
        config["root"]["path"] = str(rootfs)
        config["process"]["args"] = args
        config["linux"]["cgroupsPath"] = f"{self.cgroup}/{name}"
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        return bundle

    def _runc(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.root), *args]

    def _id(self) -> str:
        self.count += 1
        return f"bench-{os.getpid()}-{self.count}"

    def _delete(self, cid: str) -> None:
        subprocess.run(self._runc("delete", "-f", cid), capture_output=True, check=False)

    def _check_running(self, cid: str) -> None:
        state = json.loads(output(self._runc("state", cid), "runc state"))
        if state.get("status") != "running":
            raise BenchError(f"runc: container {cid} is {state.get('status')}")

    def start_once(self) -> float:
        """`runc run -d`: create + start in one command, as StartContainer does."""
        cid = self._id()
        try:
            argv = self._runc("run", "-d", "--bundle", str(self.bundles["start"]), cid)
            elapsed = run_to_file(argv, "runc run -d", self.log)
            self._check_running(cid)
            return elapsed
        finally:
            self._delete(cid)

    def create_start_once(self) -> float:
        """`runc create` then `runc start`, both timed."""
        cid = self._id()
        try:
            argv = self._runc("create", "--bundle", str(self.bundles["start"]), cid)
            elapsed = run_to_file(argv, "runc create", self.log)
            elapsed += run_to_file(self._runc("start", cid), "runc start", self.log)
            self._check_running(cid)
            return elapsed
        finally:
            self._delete(cid)

    def true_once(self) -> float:
        cid = self._id()
        try:
            argv = self._runc("run", "--bundle", str(self.bundles["true"]), cid)
            return run_to_file(argv, "runc run (true)", self.log)
        finally:
            self._delete(cid)

    def close(self) -> None:
        listed = subprocess.run(self._runc("list", "-q"), capture_output=True, text=True)
        for cid in listed.stdout.split():
            self._delete(cid)


# --- podman --------------------------------------------------------------------------------------


class PodmanSide:
    """podman with its own storage, run and tmp directories and HOST-NOTES' containers.conf."""

    def __init__(self, work: Path, layout: Path, cgroup: str) -> None:
        self.work = work
        work.mkdir(parents=True)
        self.made_run_dirs = [d for d in PODMAN_RUN_DIRS if not d.exists()]
        conf = work / "containers.conf"
        conf.write_text(CONTAINERS_CONF.format(network_config_dir=work / "networks"))
        storage = work / "storage.conf"
        self.root, self.runroot, self.tmp = work / "root", work / "runroot", work / "tmp"
        storage.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        self.env = dict(
            os.environ,
            CONTAINERS_CONF=str(conf),
            CONTAINERS_STORAGE_CONF=str(storage),
            HOME=str(work),
        )
        self.base = [
            "podman",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--tmpdir",
            str(self.tmp),
            "--storage-driver",
            "overlay",
        ]
        self.run_flags = ["--network", "none", "--cgroup-parent", cgroup]
        self.log = work / "podman.log"
        pulled = output(
            isolated_blob_info_cache(
                [*self.base, "pull", "-q", f"oci:{layout}:{BUSYBOX_REF}"], work / "pull"
            ),
            "podman pull",
            self.env,
        )
        self.image = pulled.split()[-1]
        info = output([*self.base, "info", "--format", "json"], "podman info", self.env)
        host = json.loads(info)["host"]
        runtime, manager = host["ociRuntime"]["name"], host["cgroupManager"]
        if (runtime, manager) != ("runc", "cgroupfs"):
            raise BenchError(f"podman uses {runtime} with {manager}, not runc with cgroupfs")

    def _podman(self, *args: str) -> list[str]:
        return [*self.base, *args]

    def _remove(self, cid: str) -> None:
        subprocess.run(
            self._podman("rm", "-f", "-t", "0", cid), env=self.env, capture_output=True, check=False
        )

    def start_once(self) -> float:
        cid = output(
            self._podman("create", *self.run_flags, self.image, *SLEEP), "podman create", self.env
        ).strip()
        try:
            elapsed = run(self._podman("start", cid), "podman start", self.env)
            running = output(
                self._podman("inspect", "--format", "{{.State.Running}}", cid),
                "podman inspect",
                self.env,
            )
            if running.strip() != "true":
                raise BenchError(f"podman: started container {cid} is not running")
            return elapsed
        finally:
            self._remove(cid)

    def true_once(self) -> float:
        argv = self._podman("run", "--rm", *self.run_flags, self.image, *TRUE)
        return run(argv, "podman run --rm", self.env)

    def close(self) -> None:
        subprocess.run(self._podman("rm", "-a", "-f", "-t", "0"), env=self.env, capture_output=True)
        subprocess.run(self._podman("system", "reset", "-f"), env=self.env, capture_output=True)
        unmount_all(self.work, "podman system reset")
        for directory in self.made_run_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: then nothing else uses it


# --- part 1: start latency -----------------------------------------------------------------------


def bench_start(work: Path, runs: int) -> Samples:
    samples = Samples()
    layout = work / "busybox"
    make_busybox_image(layout, BUSYBOX_REF)
    cgroup = f"/berth-bench-{os.getpid()}"
    state = work / "start-berth-state"
    berth = runc = podman = None
    try:
        with berth_cluster(state) as cluster:
            berth = BerthSide(cluster, state, layout)
            agent_config = berth.runtime_config(work / "runc" / "etc")
            runc = RuncSide(work / "runc", layout, agent_config, f"{cgroup}/runc")
            podman = PodmanSide(work / "podman", layout, f"{cgroup}/podman")
            # One untimed sample each: first-use costs (page cache, lazy imports) are not
            # what this part measures.
            for side in (berth, runc, podman):
                side.start_once()
                side.true_once()
            berth.removals.clear()  # the warm-up's
            print(f"start latency: {runs} runs, order rotating between berth, runc and podman")
            for number in range(runs):
                line = []
                for offset in range(len(SIDES)):
                    who = SIDES[(number + offset) % len(SIDES)]
                    side = {"berth": berth, "runc": runc, "podman": podman}[who]
                    start = side.start_once()
                    samples.add(f"{who}:start", start)
                    if who == "runc":
                        samples.add("runc:create+start", runc.create_start_once())
                    end_to_end = side.true_once()
                    samples.add(f"{who}:true", end_to_end)
                    line.append(f"{who} {ms(start):>6} / {ms(end_to_end):>6}")
                print(
                    f"run {number + 1:3}: start / true ms: " + "  ".join(sorted(line)), flush=True
                )
            for seconds in berth.removals:
                samples.add("berth:remove", seconds)
    finally:
        for side in (podman, runc, berth):
            if side is not None:
                with contextlib.suppress(Exception):
                    side.close()
        remove_cgroup(cgroup)
    return samples


def report_start(runs: int, samples: Samples) -> None:
    print()
    print(f"container start, busybox image already on the node; median of {runs} runs, in ms")
    header = f"{'':34}{'berth':>9}{'runc':>9}{'podman':>9}{'berth/runc':>12}{'berth/podman':>14}"
    print(header)
    print("-" * len(header))
    rows = (
        ("start (created -> process runs)", "start"),
        ("run `true` end to end", "true"),
    )
    for label, name in rows:
        ours = samples.median(f"berth:{name}")
        plain = samples.median(f"runc:{name}")
        other = samples.median(f"podman:{name}")
        print(
            f"{label:34}{ms(ours):>9}{ms(plain):>9}{ms(other):>9}"
            f"{ours / plain:>11.2f}x{ours / other:>13.2f}x"
        )
    print(
        "start: berth StartContainer | `runc run -d` | `podman start`;"
        " true: berth create+start+wait | `runc run` | `podman run --rm`"
    )
    print(
        f"also: `runc create` + `runc start` {ms(samples.median('runc:create+start'))} ms;"
        f" berth RemoveContainer (not in the figures) {ms(samples.median('berth:remove'))} ms"
    )
    start_ratio = samples.median("berth:start") / samples.median("runc:start")
    faster = samples.median("berth:start") < samples.median("podman:start")
    print(
        f"goal: start within 1.3x of runc: {'yes' if start_ratio <= 1.3 else 'NO'}"
        f" ({start_ratio:.2f}x); faster than podman: {'yes' if faster else 'NO'}"
    )


# --- part 2: cold pull + unpack ------------------------------------------------------------------


def check_unpacked(layer_dirs: list[Path], layers: int, layer_bytes: int, who: str) -> None:
    """Every random layer file is on disk at full size (in any of the given directories)."""
    for index in range(layers):
        name = f"random/layer-{index:03d}.bin"
        sizes = [d / name for d in layer_dirs if (d / name).is_file()]
        if not sizes or sizes[0].stat().st_size != layer_bytes:
            raise BenchError(f"{who}: {name} is missing or short after the unpack")


def berth_pull_round(
    work: Path, source: Path, expected: str, args: argparse.Namespace
) -> tuple[float, str]:
    state = work / "pull-berth-state"
    with berth_cluster(state) as cluster:
        registry = cluster["services"]["registry"]["address"]
        run(
            [BERTH, "--registry", registry, "oci", "push", f"{source}:{RANDOM_REF}", RANDOM_REPO],
            "berth oci push (random)",
        )
        events: list[tuple[float, PullProgress]] = []
        with NodeClient(cluster["services"]["node"]["address"]) as client:
            started = time.perf_counter()
            image = client.pull(
                RANDOM_REPO, lambda event: events.append((time.perf_counter(), event))
            )
            elapsed = time.perf_counter() - started
        if image.digest != expected or len(image.chain_ids) != args.layers:
            raise BenchError(f"berth: pulled {image.digest} with {len(image.chain_ids)} layers")
        # The layer store names each unpacked layer directory by its chain id's hex.
        layer_dirs = [
            state / "node-1" / "layers" / chain.split(":", 1)[-1] for chain in image.chain_ids
        ]
        check_unpacked(layer_dirs, args.layers, layer_bytes(args), "berth")
    # Where the time went, from the progress events: when the last download ended and the first
    # extraction began, relative to the request.
    downloads = [t for t, e in events if e.state in ("Downloading", "Verifying Checksum")]
    extracts = [t for t, e in events if e.state == "Extracting"]
    detail = ", ".join(
        part
        for part in (
            f"last download event at {downloads[-1] - started:.2f}s" if downloads else "",
            f"first extract event at {extracts[0] - started:.2f}s" if extracts else "",
        )
        if part
    )
    return elapsed, detail


def peer_pull_round(
    work: Path, source: Path, expected: str, args: argparse.Namespace
) -> tuple[float, str]:
    pulled = work / "peer-pulled"
    bundle = work / "peer-bundle"
    proc = None
    try:
        proc, address, _storage = start_docker_registry(work)
        remote = f"docker://{address}/{RANDOM_REPO}"
        skopeo(
            ["copy", "--dest-tls-verify=false", f"oci:{source}:{RANDOM_REF}", remote],
            work / "skopeo-push",
            "skopeo copy (push)",
        )
        copy = skopeo(
            ["copy", "--src-tls-verify=false", remote, f"oci:{pulled}:{RANDOM_REF}"],
            work / "skopeo-pull",
            "skopeo copy (pull)",
        )
        unpack = run(
            ["umoci", "unpack", "--image", f"{pulled}:{RANDOM_REF}", str(bundle)], "umoci unpack"
        )
        check_same_image(pulled, RANDOM_REF, expected, "skopeo")
        check_unpacked([bundle / "rootfs"], args.layers, layer_bytes(args), "skopeo + umoci")
        return copy + unpack, f"skopeo copy {copy:.2f}s + umoci unpack {unpack:.2f}s"
    finally:
        if proc is not None:
            stop_process(proc)
        for name in ("docker-registry-storage", "docker-registry.yml", "docker-registry.log"):
            path = work / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        shutil.rmtree(pulled, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)


def layer_bytes(args: argparse.Namespace) -> int:
    return int(args.layer_mb * 1024 * 1024)


def bench_pull(work: Path, args: argparse.Namespace) -> tuple[int, Samples]:
    samples = Samples()
    source = work / "random"
    started = time.perf_counter()
    make_random_image(source, RANDOM_REF, args.layers, layer_bytes(args), args.seed)
    expected = manifest_digest(source, RANDOM_REF)
    size = blob_bytes(source, RANDOM_REF)
    print(
        f"random image {expected} ({size / 1e6:.1f} MB) built in"
        f" {time.perf_counter() - started:.1f}s"
    )
    rounds: dict[str, Callable[..., tuple[float, str]]] = {
        "berth": berth_pull_round,
        "skopeo+umoci": peer_pull_round,
    }
    for number in range(1, args.rounds + 1):
        # Alternate who goes first, so neither always meets a warmer or cooler machine.
        order = ["berth", "skopeo+umoci"] if number % 2 else ["skopeo+umoci", "berth"]
        for who in order:
            seconds, detail = rounds[who](work, source, expected, args)
            samples.add(who, seconds)
            print(
                f"round {number}: {who:13} pull+unpack {seconds:6.2f}s"
                f" ({rate(size, seconds):6.1f} MB/s)  [{detail}]",
                flush=True,
            )
    return size, samples


def report_pull(size: int, args: argparse.Namespace, samples: Samples) -> None:
    print()
    print(
        f"cold pull + unpack: {args.layers} layers x {args.layer_mb:g} MiB, {size / 1e6:.1f} MB"
        f" of blobs; median of {args.rounds} round(s); loopback"
    )
    header = f"{'':14}{'seconds':>9}{'MB/s':>9}"
    print(header)
    print("-" * len(header))
    for who, label in (("berth", "berth"), ("skopeo+umoci", "skopeo+umoci")):
        seconds = samples.median(who)
        print(f"{label:14}{seconds:>9.2f}{rate(size, seconds):>9.1f}")
    ratio = samples.median("skopeo+umoci") / samples.median("berth")
    print(f"berth/peer throughput: {ratio:.2f}x (above 1: berth is faster)")


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="start-latency samples per side")
    parser.add_argument("--rounds", type=int, default=3, help="cold-pull rounds per side")
    parser.add_argument("--layers", type=int, default=4, help="layers in the pulled image")
    parser.add_argument("--layer-mb", type=float, default=64, help="MiB of data per layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random layer data")
    parser.add_argument("--only", choices=("start", "pull"), help="run one part only")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.rounds < 1 or args.layers < 1 or args.layer_mb <= 0:
        parser.error("--runs, --rounds, --layers and --layer-mb must be positive")
    if os.geteuid() != 0:
        print("bench: needs root (runc, podman, overlay mounts)", file=sys.stderr)
        return 1
    tools = ["etcd", "runc", "conmon", "umoci", "unshare"]
    tools += ["podman"] if args.only != "pull" else []
    tools += ["skopeo", "docker-registry"] if args.only != "start" else []
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"bench: `{tool}` is not installed (make deps)", file=sys.stderr)
            return 1

    # podman names an image pulled from `oci:DIR` after DIR: every path component must then be
    # a valid repository name component, and mkdtemp's random part may end in "_".
    work = Path(tempfile.mkdtemp(prefix="berth-bench-node-", suffix="d"))
    try:
        start_samples = pull = None
        if args.only != "pull":
            start_samples = bench_start(work, args.runs)
        if args.only != "start":
            pull = bench_pull(work, args)
        if start_samples is not None:
            report_start(args.runs, start_samples)
        if pull is not None:
            report_pull(pull[0], args, pull[1])
    except (BenchError, BerthClientError, RuntimeError) as exc:
        print(f"bench FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        unmount_all(work, "the bench")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
