"""Image commit, save and load: berth's image service vs. podman, in the same run.

Part `commit`: a busybox container that wrote --commit-mb MiB of random data into a few files
  and then sleeps is committed as a new image: berth `ImageClient.commit` (the node packs the
  changes and pushes the layer to the registry, the image service writes config and manifest)
  vs. `podman commit` of an equivalent podman container. A fresh container (new random data)
  each round, so nothing can be deduplicated.
Part `archive`: a --save-mb MiB image of 4 random layers is saved to a docker-archive file
  (berth `ImageClient.save` vs. `podman save -o`), then that file is loaded back into a store
  that holds none of the image's blobs (berth: the image removed and its blobs deleted by the
  registry's GC; podman: `podman rmi`) with berth `ImageClient.load` vs. `podman load -i`.
The median over --rounds of each; the table shows seconds, MB/s and the ratio berth/podman.

    .venv/bin/python -m bench.image [--rounds 5] [--commit-mb 100] [--save-mb 256]
    .venv/bin/python -m bench.image --quick                     # a smoke run with small sizes
    .venv/bin/python -m bench.image --only commit               # one part (or --only archive)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.cluster import wait_for
from bench.node import (
    BUSYBOX_REF,
    BUSYBOX_REPO,
    RANDOM_REF,
    RANDOM_REPO,
    BerthSide,
    PodmanSide,
    Samples,
    berth_cluster,
    isolated_blob_info_cache,
    output,
    remove_cgroup,
    unmount_all,
)
from bench.registry import BERTH, BenchError, manifest_digest, rate, run
from berth.client import (
    ClusterClient,
    ContainerConfig,
    ImageClient,
    ImageDetails,
    RegistryClient,
)
from berth.errors import BerthClientError
from scripts.oci_images import make_busybox_image, make_random_image

MIB = 1 << 20
FULL = {"rounds": 5, "commit_mb": 100, "save_mb": 256}
QUICK = {"rounds": 2, "commit_mb": 8, "save_mb": 16}
COMMIT_FILES = 4  # the changes are spread over this many files
SAVE_LAYERS = 4
WARM_UP_MB = 1  # the untimed first commit on each side
DATA_DIR = "/bench-data"
WRITTEN = "bench: changes written"  # the container prints this once its files are complete
WRITE_TIMEOUT = 600.0
ARCHIVE_FORMAT = "docker-archive"  # podman save's default; berth's is asked for explicitly
PODMAN_RANDOM = f"localhost/{RANDOM_REPO}"  # podman puts a host-less name under localhost/
# The registry's GC keeps unreferenced blobs younger than its grace period, and 0 asks for the
# server default (an hour): 1 s is the shortest, so the bench waits until the blobs are older.
GC_GRACE_SECONDS = 1
PARTS = ("commit", "archive")
SIDES = ("berth", "podman")


# --- helpers -------------------------------------------------------------------------------------


def changes_script(megabytes: int) -> str:
    """The container's command: `megabytes` MiB of /dev/urandom in COMMIT_FILES files, a line
    saying so, then sleep (the container must run while it is committed)."""
    counts = [
        megabytes // COMMIT_FILES + (i < megabytes % COMMIT_FILES) for i in range(COMMIT_FILES)
    ]
    writes = [
        f"dd if=/dev/urandom of={DATA_DIR}/part-{index} bs=1M count={count}"
        for index, count in enumerate(counts)
        if count
    ]
    return " && ".join([f"mkdir -p {DATA_DIR}", *writes, f"echo '{WRITTEN}'", "exec sleep 3600"])


def check_commit_layer(
    new_layers: int, base_layers: int, added: int, wanted: int, who: str
) -> None:
    """One layer more than busybox, holding at least the random bytes (which do not compress)
    and not much more (tar headers, gzip framing)."""
    if new_layers != base_layers + 1:
        raise BenchError(f"{who}: committed image has {new_layers} layers, not {base_layers + 1}")
    if not wanted <= added <= wanted * 1.02 + MIB:
        raise BenchError(f"{who}: the commit added {added} bytes for {wanted} bytes of changes")


def check_archive(path: Path, name: str, payload: int, who: str) -> None:
    """A docker-archive naming `name` with SAVE_LAYERS layers, every layer in the file, and at
    least the image's random bytes in it."""
    size = path.stat().st_size
    if size < payload:
        raise BenchError(f"{who}: archive {path.name} is {size} bytes, less than the image's data")
    with tarfile.open(path) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        extracted = (
            tar.extractfile(members["manifest.json"]) if "manifest.json" in members else None
        )
        if extracted is None:
            raise BenchError(f"{who}: archive {path.name} has no manifest.json file")
        entries = json.loads(extracted.read())
    if len(entries) != 1 or name not in (entries[0].get("RepoTags") or []):
        raise BenchError(f"{who}: archive {path.name} does not hold exactly the image {name}")
    layers = entries[0].get("Layers") or []
    missing = [layer for layer in layers if layer.removeprefix("./") not in members]
    if len(layers) != SAVE_LAYERS or missing:
        raise BenchError(
            f"{who}: archive {path.name} lists {len(layers)} layers, missing {missing}"
        )


def layout_blobs(layout: Path, ref: str) -> list[str]:
    """Digests of the manifest, config and layers of `ref` in an OCI layout."""
    digest = manifest_digest(layout, ref)
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text())
    return [
        digest,
        manifest["config"]["digest"],
        *(layer["digest"] for layer in manifest["layers"]),
    ]


def timed(action: Callable[[], object]) -> float:
    """Seconds action() takes, after a sync, so no earlier step's writeback lands in it."""
    os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# --- berth ---------------------------------------------------------------------------------------


class BerthImages:
    """A `berthd up` cluster whose node already has the busybox image (bench/node.py's
    BerthSide), driven through the image, cluster and registry clients."""

    def __init__(self, cluster: dict, state: Path, busybox: Path) -> None:
        services = cluster["services"]
        self.node = BerthSide(cluster, state, busybox)
        self.registry_address = services["registry"]["address"]
        self.blob_dir = state / "registry" / "blobs" / "sha256"
        self.images = ImageClient(services["image"]["address"])
        self.cluster = ClusterClient(services["cluster"]["address"])
        self.registry = RegistryClient(self.registry_address)
        self.base_layers = len(self.images.inspect(BUSYBOX_REPO).layers)
        self.random: list[str] = []  # the saved image's blobs, manifest first

    def close(self) -> None:
        for client in (self.images, self.cluster, self.registry, self.node):
            client.close()

    # commit

    def _written(self, container: str) -> bool:
        info = self.cluster.inspect(container)
        if info.state in ("pending", "created"):  # its node has not started it yet
            return False
        text = b"".join(line.data for line in self.cluster.logs(container)).decode(errors="replace")
        if WRITTEN in text:
            return True
        if info.state != "running":
            raise BenchError(f"berth: container {container} is {info.state}: {text.strip()}")
        return False

    def commit_once(self, reference: str, megabytes: int) -> tuple[float, str]:
        config = ContainerConfig(BUSYBOX_REPO, command=["sh", "-c", changes_script(megabytes)])
        container = self.cluster.run(config).id
        stages: dict[str, float] = {}
        image: list[ImageDetails] = []
        try:
            wait_for(lambda: self._written(container), WRITE_TIMEOUT, f"berth: {container} data")

            def commit() -> None:
                stages["request"] = time.perf_counter()
                image.append(
                    self.images.commit(
                        container,
                        reference,
                        pause=True,
                        progress=lambda e: stages.setdefault(e.stage, time.perf_counter()),
                    )
                )

            seconds = timed(commit)
        finally:
            self.cluster.remove(container, force=True)
        layers = image[0].layers
        check_commit_layer(len(layers), self.base_layers, layers[-1].size, megabytes * MIB, "berth")
        if reference not in image[0].repo_tags:
            raise BenchError(f"berth: the committed image is tagged {image[0].repo_tags}")
        # Where the time went: when each stage's first progress event came.
        started = stages.pop("request")
        detail = ", ".join(f"{stage} at {at - started:.2f}s" for stage, at in stages.items())
        return seconds, detail

    # save and load

    def add_random(self, layout: Path) -> None:
        source = f"{layout}:{RANDOM_REF}"
        run(
            [BERTH, "--registry", self.registry_address, "oci", "push", source, RANDOM_REPO],
            "berth oci push (random)",
        )
        self.random = layout_blobs(layout, RANDOM_REF)
        if self.images.inspect(RANDOM_REPO).digest != self.random[0]:
            raise BenchError(f"berth: {RANDOM_REPO} is not the pushed image")

    def save_once(self, path: Path, payload: int) -> float:
        path.unlink(missing_ok=True)

        def save() -> None:
            with open(path, "wb") as out:
                self.images.save([RANDOM_REPO], ARCHIVE_FORMAT, out)

        seconds = timed(save)
        check_archive(path, RANDOM_REPO, payload, "berth")
        return seconds

    def _blob_files(self) -> list[Path]:
        return [self.blob_dir / d.split(":", 1)[1][:2] / d.split(":", 1)[1] for d in self.random]

    def drop_random(self) -> None:
        """Remove the image and have the registry's GC delete its blobs: the load must then
        send every byte again."""
        self.images.remove(RANDOM_REPO)
        files = [f for f in self._blob_files() if f.exists()]
        newest = max((f.stat().st_mtime for f in files), default=0.0)
        time.sleep(max(0.0, newest + GC_GRACE_SECONDS + 0.5 - time.time()))
        self.registry.garbage_collect(grace_seconds=GC_GRACE_SECONDS)
        left = [f.name for f in self._blob_files() if f.exists()]
        if left:
            raise BenchError(f"berth: registry GC left blobs of the removed image: {left}")

    def load_once(self, path: Path) -> float:
        loaded = []
        seconds = timed(lambda: loaded.append(self.images.load(path)))
        result = loaded[0]
        digests = [image.digest for image in result.images]
        if RANDOM_REPO not in result.references or digests != self.random[:1]:
            raise BenchError(f"berth: loaded {result.references} {digests}, not {RANDOM_REPO}")
        if not all(f.exists() for f in self._blob_files()):
            raise BenchError("berth: the loaded image's blobs are not all in the registry")
        return seconds


# --- podman --------------------------------------------------------------------------------------


class PodmanImages(PodmanSide):
    """bench/node.py's podman (isolated storage, HOST-NOTES' containers.conf, busybox pulled)
    doing commit, save and load. Every command that copies an image runs with an empty
    blob-info cache of its own, so the host's cache is neither read nor changed."""

    def __init__(self, work: Path, busybox: Path, cgroup: str) -> None:
        super().__init__(work, busybox, cgroup)
        self.copies = 0
        base = self.inspect(self.image)
        self.base_layers = len(base["RootFS"]["Layers"])
        self.base_size = int(base["Size"])
        self.random_id = ""

    def inspect(self, image: str) -> dict:
        text = output(self._podman("image", "inspect", image), "podman image inspect", self.env)
        return dict(json.loads(text)[0])

    def copying(self, *args: str) -> str:
        """A podman command with a fresh, empty blob-info cache; returns its output."""
        self.copies += 1
        scratch = self.work / f"cache-{self.copies}"
        try:
            argv = isolated_blob_info_cache(self._podman(*args), scratch)
            return output(argv, f"podman {args[0]}", self.env)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # commit

    def _written(self, container: str) -> bool:
        logs = subprocess.run(
            self._podman("logs", container), env=self.env, capture_output=True, text=True
        )
        if WRITTEN in logs.stdout:
            return True
        state = output(
            self._podman("inspect", "--format", "{{.State.Status}}", container),
            "podman inspect",
            self.env,
        ).strip()
        if state != "running":
            text = (logs.stdout + logs.stderr).strip()
            raise BenchError(f"podman: container {container} is {state}: {text}")
        return False

    def commit_once(self, reference: str, megabytes: int) -> tuple[float, str]:
        script = changes_script(megabytes)
        container = output(
            self._podman("run", "-d", *self.run_flags, self.image, "sh", "-c", script),
            "podman run -d",
            self.env,
        ).strip()
        try:
            wait_for(lambda: self._written(container), WRITE_TIMEOUT, f"podman: {container} data")
            seconds = timed(lambda: self.copying("commit", "--pause", container, reference))
        finally:
            self._remove(container)
        image = self.inspect(f"localhost/{reference}")
        added = int(image["Size"]) - self.base_size
        check_commit_layer(
            len(image["RootFS"]["Layers"]), self.base_layers, added, megabytes * MIB, "podman"
        )
        return seconds, "layer written to podman's overlay storage, uncompressed"

    # save and load

    def add_random(self, layout: Path) -> None:
        pulled = self.copying("pull", "-q", f"oci:{layout}:{RANDOM_REF}")
        self.random_id = pulled.split()[-1]
        # Only our name on it, so the archive and the load name it the same way every round.
        run(self._podman("untag", self.random_id), "podman untag", self.env)
        run(self._podman("tag", self.random_id, PODMAN_RANDOM), "podman tag", self.env)

    def save_once(self, path: Path, payload: int) -> float:
        path.unlink(missing_ok=True)
        seconds = timed(lambda: self.copying("save", "-o", str(path), PODMAN_RANDOM))
        check_archive(path, PODMAN_RANDOM, payload, "podman")
        return seconds

    def _exists(self, image: str) -> bool:
        argv = self._podman("image", "exists", image)
        return subprocess.run(argv, env=self.env, capture_output=True).returncode == 0

    def drop_random(self) -> None:
        run(self._podman("rmi", "-f", self.random_id), "podman rmi", self.env)
        if self._exists(self.random_id):
            raise BenchError(f"podman: image {self.random_id} is still there after rmi")

    def load_once(self, path: Path) -> float:
        seconds = timed(lambda: self.copying("load", "-i", str(path)))
        loaded = self.inspect(PODMAN_RANDOM)["Id"]
        if loaded != self.random_id:
            raise BenchError(f"podman: loaded {PODMAN_RANDOM} is {loaded}, not {self.random_id}")
        return seconds


# --- the parts -----------------------------------------------------------------------------------

Side = BerthImages | PodmanImages


def rotation(number: int) -> tuple[str, ...]:
    """Who goes first alternates, so neither always meets a warmer or cooler machine."""
    return SIDES if number % 2 else SIDES[::-1]


def bench_commit(sides: dict[str, Side], args: argparse.Namespace, samples: Samples) -> None:
    # One untimed small commit each: first-use costs (lazy imports, connections) are not what
    # this part measures.
    for side in sides.values():
        side.commit_once("bench/commit:warm-up", WARM_UP_MB)
    for number in range(1, args.rounds + 1):
        for who in rotation(number):
            seconds, detail = sides[who].commit_once(f"bench/commit:{number}", args.commit_mb)
            samples.add(f"{who}:commit", seconds)
            mb = rate(args.commit_mb * MIB, seconds)
            print(
                f"round {number}: {who:6} commit {seconds:6.2f}s ({mb:6.1f} MB/s)  [{detail}]",
                flush=True,
            )


def bench_archive(
    sides: dict[str, Side], work: Path, args: argparse.Namespace, samples: Samples
) -> dict[str, int]:
    """Save and load rounds; returns the size of each side's archive."""
    layout = work / "random"
    started = time.perf_counter()
    layer_bytes = args.save_mb * MIB // SAVE_LAYERS
    make_random_image(layout, RANDOM_REF, SAVE_LAYERS, layer_bytes, args.seed)
    print(
        f"random image {manifest_digest(layout, RANDOM_REF)} ({SAVE_LAYERS} x"
        f" {layer_bytes / MIB:g} MiB) built in {time.perf_counter() - started:.1f}s",
        flush=True,
    )
    for side in sides.values():
        side.add_random(layout)  # untimed
    payload = SAVE_LAYERS * layer_bytes
    archives = {who: work / f"{who}-archive.tar" for who in SIDES}
    sizes: dict[str, int] = {}
    for number in range(1, args.rounds + 1):
        for who in rotation(number):
            seconds = sides[who].save_once(archives[who], payload)
            sizes[who] = archives[who].stat().st_size
            samples.add(f"{who}:save", seconds)
            print(
                f"round {number}: {who:6} save {seconds:6.2f}s"
                f" ({rate(sizes[who], seconds):6.1f} MB/s, archive {sizes[who] / 1e6:.1f} MB)",
                flush=True,
            )
        for who in rotation(number):
            sides[who].drop_random()  # untimed
            seconds = sides[who].load_once(archives[who])
            samples.add(f"{who}:load", seconds)
            print(
                f"round {number}: {who:6} load {seconds:6.2f}s"
                f" ({rate(sizes[who], seconds):6.1f} MB/s)",
                flush=True,
            )
    return sizes


# --- report --------------------------------------------------------------------------------------


def report(args: argparse.Namespace, samples: Samples, sizes: dict[str, int]) -> None:
    version = output(["podman", "--version"], "podman --version").split()[-1]
    print()
    print(
        f"image commit, save and load: berth vs. podman {version} (runc, overlay, own storage);"
        f" median of {args.rounds} round(s)"
    )
    header = (
        f"{'':42}{'berth s':>9}{'podman s':>10}{'berth MB/s':>12}{'podman MB/s':>13}"
        f"{'berth/podman':>14}"
    )
    print(header)
    print("-" * len(header))
    changes = args.commit_mb * MIB
    rows = [
        (f"commit ({args.commit_mb} MiB of changes)", "commit", {who: changes for who in SIDES}),
        (f"save ({args.save_mb} MiB image, docker-archive)", "save", sizes),
        ("load (the archive it saved)", "load", sizes),
    ]
    verdict = []
    for label, name, moved in rows:
        if f"berth:{name}" not in samples.figures:
            continue
        ours, theirs = samples.median(f"berth:{name}"), samples.median(f"podman:{name}")
        ratio = ours / theirs
        print(
            f"{label:42}{ours:>9.2f}{theirs:>10.2f}{rate(moved['berth'], ours):>12.1f}"
            f"{rate(moved['podman'], theirs):>13.1f}{ratio:>13.2f}x"
        )
        verdict.append(f"{name} {'faster' if ratio < 1 else 'slower'} ({ratio:.2f}x)")
    print(
        "berth/podman: ratio of median times (below 1: berth is faster). MB/s: 10^6 bytes of"
        " changes (commit) or of the archive each side wrote (save, load)"
    )
    if sizes:
        print(
            f"archives: berth {sizes['berth'] / 1e6:.1f} MB (layers gzip, as stored),"
            f" podman {sizes['podman'] / 1e6:.1f} MB (layers uncompressed)"
        )
    print(f"verdict: berth against podman: {', '.join(verdict)}")


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help=f"rounds per part (default {FULL['rounds']})")
    parser.add_argument(
        "--commit-mb", type=int, help=f"MiB of changes to commit (default {FULL['commit_mb']})"
    )
    parser.add_argument(
        "--save-mb", type=int, help=f"MiB of the saved image (default {FULL['save_mb']})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random layer data")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument("--only", choices=PARTS, help="run one part only")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.commit_mb < 1 or args.save_mb < SAVE_LAYERS:
        parser.error(f"--rounds and --commit-mb must be positive, --save-mb at least {SAVE_LAYERS}")
    if os.geteuid() != 0:
        print("bench: needs root (runc, podman, overlay mounts)", file=sys.stderr)
        return 1
    for tool in ("etcd", "runc", "conmon", "umoci", "unshare", "podman"):
        if shutil.which(tool) is None:
            print(f"bench: `{tool}` is not installed (make deps bench-apt)", file=sys.stderr)
            return 1

    # podman names an image pulled from `oci:DIR` after DIR: every path component must then be
    # a valid repository name component, and mkdtemp's random part may end in "_".
    work = Path(tempfile.mkdtemp(prefix="berth-bench-image-", suffix="d"))
    cgroup = f"/berth-bench-{os.getpid()}"
    sides: dict[str, Side] = {}
    try:
        busybox = work / "busybox"
        make_busybox_image(busybox, BUSYBOX_REF)
        with berth_cluster(work / "berth-state") as cluster:
            try:
                sides["berth"] = BerthImages(cluster, work / "berth-state", busybox)
                sides["podman"] = PodmanImages(work / "podman", busybox, f"{cgroup}/podman")
                samples = Samples()
                sizes: dict[str, int] = {}
                if args.only != "archive":
                    bench_commit(sides, args, samples)
                if args.only != "commit":
                    sizes = bench_archive(sides, work, args, samples)
                report(args, samples, sizes)
            finally:
                for side in reversed(sides.values()):
                    side.close()
    except (BenchError, BerthClientError) as exc:
        print(f"bench FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        remove_cgroup(cgroup)
        unmount_all(work, "the bench")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
