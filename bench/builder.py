"""Dockerfile builds: berth's builder service vs. `buildah bud`, in the same run.

The Dockerfile is bench/build-context/Dockerfile: 10 steps (FROM, ARG, ENV, WORKDIR, COPY, RUN
writing 200 files and running sed on a copied file, COPY, RUN, LABEL, CMD), the same file for
both sides, FROM the same busybox image (scripts/oci_images.py). Per round and side:
  - cold: every step built, `berth build --no-cache` vs. `buildah bud --no-cache --layers`;
  - cached: the same build again, nothing changed: every step must come from the cache.
Both timed as CLI commands, start-up included. berth is also timed in-process through
`BuilderClient.build` (no CLI start-up), shown in rows of its own.
Checked: each cold build executed every step, each rebuild took every step from the cache and
gave an image built before; at the end both images run their CMD (berth on the cluster,
buildah's with podman) to the same output and agree on the config the Dockerfile sets.
The median over --rounds of each; the table shows seconds and the ratio berth/buildah.

    .venv/bin/python -m bench.builder [--rounds 5] [--isolation oci]
    .venv/bin/python -m bench.builder --quick                    # a smoke run, one round
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.cluster import wait_for
from bench.image import timed
from bench.node import (
    BUSYBOX_REF,
    BUSYBOX_REPO,
    BerthSide,
    PodmanSide,
    Samples,
    berth_cluster,
    isolated_blob_info_cache,
    output,
    remove_cgroup,
    unmount_all,
)
from bench.registry import BERTH, BenchError, run
from berth.client import ClusterClient, ContainerConfig, ImageClient
from berth.client.builder import (
    BuilderClient,
    BuildEvent,
    BuildOptions,
    BuildResult,
    BuildStep,
)
from berth.errors import BerthClientError
from scripts.oci_images import make_busybox_image

CONTEXT = Path(__file__).resolve().parent / "build-context"
STEPS = 10  # in CONTEXT/Dockerfile, FROM included (buildah's STEP 1/10 .. 10/10)
APP_REPO = "bench/app:1"
BUILDAH_APP = f"localhost/{APP_REPO}"  # buildah puts a host-less name under localhost/
# The Dockerfile says FROM bench/busybox:1: buildah finds this name in its store for that.
BUILDAH_BASE = f"localhost/{BUSYBOX_REPO}"
BUILDAH_CACHED = "--> Using cache"  # buildah prints this for each step its cache answered
# What the image's CMD prints: greeting filled in by sed, 200 files made and checksummed.
EXPECTED_OUTPUT = ["hello from /opt/app", "version 1.0.0, 200 files", "checksums ok"]
# The config fields the Dockerfile sets; both images must agree on them.
CONFIG_FIELDS = ("Env", "Cmd", "WorkingDir", "Labels")
BUILDAH_LABEL = "io.buildah.version"  # buildah stamps this label on everything it builds
FULL = {"rounds": 5}
QUICK = {"rounds": 1}
RUN_TIMEOUT = 120.0
# "berth": the `berth build` CLI; "client": BuilderClient.build in this process.
SIDES = ("berth", "client", "buildah")
ISOLATIONS = ("oci", "chroot")  # buildah's with runc; HOST-NOTES: both work here


# --- helpers -------------------------------------------------------------------------------------


def rotation(number: int) -> list[str]:
    """Who goes first rotates, so no side always meets a warmer or cooler machine."""
    return [SIDES[(number + offset) % len(SIDES)] for offset in range(len(SIDES))]


def check_berth_result(result: BuildResult, no_cache: bool, last: str, who: str) -> None:
    """A cold build built every step; a cached one took every step from the cache and gave
    the image the build before it made."""
    if result.tags != [APP_REPO] or result.total_steps != STEPS:
        raise BenchError(f"{who}: built {result.tags} in {result.total_steps} steps")
    wanted = 0 if no_cache else STEPS
    if result.cached_steps != wanted:
        raise BenchError(f"{who}: {result.cached_steps} of {STEPS} steps cached, not {wanted}")
    if not no_cache and result.digest != last:
        raise BenchError(f"{who}: the cached rebuild gave {result.digest}, not {last}")


def step_times(events: list[BuildEvent]) -> str:
    """Where a build's time went, from the builder's own step timings, by instruction."""
    totals: dict[str, float] = {}
    for event in events:
        if isinstance(event, BuildStep) and event.duration is not None:
            kind = event.instruction.split(None, 1)[0].upper()
            kind = kind if kind in ("RUN", "COPY") else "other"
            totals[kind] = totals.get(kind, 0.0) + event.duration
    return ", ".join(f"{kind} {seconds:.2f}s" for kind, seconds in sorted(totals.items()))


def main_config(config: dict, who: str) -> dict:
    """The fields of an image config the Dockerfile sets, without buildah's own label."""
    settings = config.get("config") or {}
    picked = {name: settings.get(name) for name in CONFIG_FIELDS}
    picked["Labels"] = {k: v for k, v in (picked["Labels"] or {}).items() if k != BUILDAH_LABEL}
    if not picked["Labels"]:
        raise BenchError(f"{who}: the built image has none of the Dockerfile's labels")
    return picked


def check_output(lines: list[str], who: str) -> None:
    if lines != EXPECTED_OUTPUT:
        raise BenchError(f"{who}: the built image printed {lines}, not {EXPECTED_OUTPUT}")


# --- berth ---------------------------------------------------------------------------------------


class BerthBuilds:
    """A `berthd up` cluster whose node already has the busybox image (bench/node.py's
    BerthSide), building through the `berth build` CLI and through BuilderClient."""

    def __init__(self, cluster: dict, state: Path, busybox: Path) -> None:
        services = cluster["services"]
        self.node = BerthSide(cluster, state, busybox)
        self.address = services["builder"]["address"]
        self.builder = BuilderClient(self.address)
        self.cluster = ClusterClient(services["cluster"]["address"])
        self.images = ImageClient(services["image"]["address"])
        self.last = ""  # digest of the last build

    def close(self) -> None:
        for client in (self.images, self.cluster, self.builder, self.node):
            client.close()

    def cli_build(self, no_cache: bool) -> tuple[float, str]:
        argv = [BERTH, "--builder", self.address, "build", *(["--no-cache"] if no_cache else [])]
        argv += ["-t", APP_REPO, "--format", "json", str(CONTEXT)]
        printed: list[str] = []
        seconds = timed(lambda: printed.append(output(argv, "berth build")))
        result = BuildResult(**json.loads(printed[0]))
        check_berth_result(result, no_cache, self.last, "berth build")
        self.last = result.digest
        return seconds, f"{result.cached_steps}/{result.total_steps} steps cached"

    def client_build(self, no_cache: bool) -> tuple[float, str]:
        events: list[BuildEvent] = []
        results: list[BuildResult] = []
        options = BuildOptions(tags=[APP_REPO], no_cache=no_cache)
        seconds = timed(
            lambda: results.append(self.builder.build(CONTEXT, options, on_event=events.append))
        )
        check_berth_result(results[0], no_cache, self.last, "BuilderClient.build")
        # The final status of every step, as the progress stream told it.
        statuses = {e.number: e.status for e in events if isinstance(e, BuildStep) and e.status}
        wanted = "DONE" if no_cache else "CACHED"
        if len(statuses) != STEPS or set(statuses.values()) != {wanted}:
            raise BenchError(f"BuilderClient.build: step statuses {statuses}, not all {wanted}")
        self.last = results[0].digest
        return seconds, f"steps: {step_times(events)}"

    def run_image(self) -> list[str]:
        """Run the built image's CMD on the cluster; the lines it printed."""
        container = self.cluster.run(ContainerConfig(APP_REPO)).id
        try:
            # The cluster's wait needs a status to wait on: the node's first report.
            wait_for(
                lambda: self.cluster.inspect(container).state in ("running", "exited"),
                RUN_TIMEOUT,
                f"berth: container {container} of {APP_REPO}",
            )
            code = self.cluster.wait(container)
            text = b"".join(line.data for line in self.cluster.logs(container)).decode()
        finally:
            self.cluster.remove(container, force=True)
        if code != 0:
            raise BenchError(f"berth: {APP_REPO} exited with {code}: {text.strip()}")
        return text.splitlines()

    def config(self) -> dict:
        return main_config(self.images.inspect(APP_REPO).config, "berth")


# --- buildah -------------------------------------------------------------------------------------


class BuildahSide(PodmanSide):
    """buildah on bench/node.py's podman setup: the same isolated storage (podman pulls the
    busybox image into it, and runs the built image for the check), HOST-NOTES'
    containers.conf, runc with a state root of its own, the bench's cgroup, no network.
    Every buildah command runs with the bench's own blob-info cache, so the host's cache is
    neither read nor changed."""

    def __init__(self, work: Path, busybox: Path, cgroup: str, isolation: str) -> None:
        super().__init__(work, busybox, cgroup)
        self.env["TMPDIR"] = str(self.tmp)  # buildah has no --tmpdir
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.runc_root = work / "runc"
        self.runc_root.mkdir()
        self.cgroup = cgroup
        self.isolation = isolation
        run(self._podman("tag", self.image, BUILDAH_BASE), "podman tag", self.env)
        # Image ids of the cold builds: a cached rebuild must give one of them (with several
        # matching cache images, buildah need not pick the newest).
        self.built: set[str] = set()

    def buildah(self, *args: str) -> str:
        argv = ["buildah", "--root", str(self.root), "--runroot", str(self.runroot)]
        argv += ["--storage-driver", "overlay", *args]
        return output(isolated_blob_info_cache(argv, self.work), f"buildah {args[0]}", self.env)

    def build(self, no_cache: bool) -> tuple[float, str]:
        args = ["bud", "--layers", *(["--no-cache"] if no_cache else []), "--pull=never"]
        args += ["--runtime", "runc", "--runtime-flag", f"root={self.runc_root}"]
        args += ["--isolation", self.isolation, "--network", "none"]
        args += ["--cgroup-parent", self.cgroup, "-t", APP_REPO, str(CONTEXT)]
        printed: list[str] = []
        seconds = timed(lambda: printed.append(self.buildah(*args)))
        text = printed[0]
        image = text.split()[-1]
        cached = text.count(BUILDAH_CACHED)
        wanted = 0 if no_cache else STEPS - 1  # every step after FROM
        if f"STEP {STEPS}/{STEPS}:" not in text or cached != wanted:
            raise BenchError(f"buildah bud: {cached} steps used the cache, not {wanted}:\n{text}")
        if no_cache:
            self.built.add(image)
        elif image not in self.built:
            raise BenchError(f"buildah bud: the cached rebuild gave {image}, not a built image")
        return seconds, f"{cached}/{STEPS - 1} steps after FROM cached"

    def run_image(self) -> list[str]:
        argv = self._podman("run", "--rm", *self.run_flags, BUILDAH_APP)
        return output(argv, "podman run (the buildah image)", self.env).splitlines()

    def config(self) -> dict:
        inspected = json.loads(self.buildah("inspect", "--type", "image", BUILDAH_APP))
        return main_config(inspected["OCIv1"], "buildah")


# --- the rounds ----------------------------------------------------------------------------------

Build = Callable[[bool], tuple[float, str]]


def bench_builds(builds: dict[str, Build], rounds: int, samples: Samples) -> None:
    # One untimed cold and cached build each: first-use costs (lazy imports, connections, the
    # node's first pull of the base) are not what this measures.
    for build in builds.values():
        build(True)
        build(False)
    for number in range(1, rounds + 1):
        for who in rotation(number):
            cold, cold_detail = builds[who](True)
            cached, cached_detail = builds[who](False)
            samples.add(f"{who}:cold", cold)
            samples.add(f"{who}:cached", cached)
            print(
                f"round {number}: {who:7} cold {cold:6.2f}s [{cold_detail}]"
                f"  cached {cached:6.2f}s [{cached_detail}]",
                flush=True,
            )
        for who, tool in (("berth", BERTH), ("buildah", "buildah")):
            samples.add(f"{who}:start-up", run([tool, "--version"], f"{who} --version"))


def check_images(berth: BerthBuilds, buildah: BuildahSide) -> None:
    """Both images run their CMD to the expected output, and agree on the config the
    Dockerfile sets."""
    check_output(berth.run_image(), "berth")
    check_output(buildah.run_image(), "buildah")
    ours, theirs = berth.config(), buildah.config()
    if ours != theirs:
        raise BenchError(f"the images' configs differ: berth {ours}, buildah {theirs}")
    print(f"checked: both images print {EXPECTED_OUTPUT} and agree on {CONFIG_FIELDS}")


# --- report --------------------------------------------------------------------------------------


def report(args: argparse.Namespace, samples: Samples) -> None:
    version = output(["buildah", "--version"], "buildah --version").split()[2]
    print()
    print(
        f"Dockerfile builds ({CONTEXT.parent.name}/{CONTEXT.name}, {STEPS} steps): berth vs."
        f" buildah {version} (runc, isolation {args.isolation}, --layers, own storage);"
        f" median of {args.rounds} round(s)"
    )
    header = f"{'':44}{'berth s':>9}{'buildah s':>11}{'berth/buildah':>15}"
    print(header)
    print("-" * len(header))
    rows = (
        ("cold (--no-cache), `berth build` CLI", "berth", "cold"),
        ("cold (--no-cache), BuilderClient.build", "client", "cold"),
        ("cached rebuild, `berth build` CLI", "berth", "cached"),
        ("cached rebuild, BuilderClient.build", "client", "cached"),
        ("CLI start-up (`--version`)", "berth", "start-up"),
    )
    ratios: dict[tuple[str, str], float] = {}
    for label, who, figure in rows:
        ours, theirs = samples.median(f"{who}:{figure}"), samples.median(f"buildah:{figure}")
        ratios[who, figure] = ours / theirs
        print(f"{label:44}{ours:>9.2f}{theirs:>11.2f}{ours / theirs:>14.2f}x")
    print(
        "berth/buildah: ratio of median times (below 1: berth is faster); buildah is always"
        " timed as the `buildah bud` command"
    )
    for who, how in (("berth", "CLI vs. CLI"), ("client", "BuilderClient vs. buildah CLI")):
        cached = 1 / ratios[who, "cached"]
        cold = ratios[who, "cold"]
        print(
            f"goal, {how}: cached rebuild >= 5x faster: {'yes' if cached >= 5 else 'NO'}"
            f" ({cached:.2f}x faster); cold within 1.2x: {'yes' if cold <= 1.2 else 'NO'}"
            f" ({cold:.2f}x)"
        )


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']})")
    parser.add_argument(
        "--isolation", choices=ISOLATIONS, default="oci", help="buildah's RUN isolation"
    )
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    if os.geteuid() != 0:
        print("bench: needs root (runc, buildah, overlay mounts)", file=sys.stderr)
        return 1
    for tool in ("etcd", "runc", "conmon", "umoci", "unshare", "podman", "buildah"):
        if shutil.which(tool) is None:
            print(f"bench: `{tool}` is not installed (make deps bench-apt)", file=sys.stderr)
            return 1

    # podman names an image pulled from `oci:DIR` after DIR: every path component must then be
    # a valid repository name component, and mkdtemp's random part may end in "_".
    work = Path(tempfile.mkdtemp(prefix="berth-bench-builder-", suffix="d"))
    cgroup = f"/berth-bench-{os.getpid()}"
    berth: BerthBuilds | None = None
    buildah: BuildahSide | None = None
    try:
        busybox = work / "busybox"
        make_busybox_image(busybox, BUSYBOX_REF)
        with berth_cluster(work / "berth-state") as cluster:
            try:
                berth = BerthBuilds(cluster, work / "berth-state", busybox)
                buildah = BuildahSide(
                    work / "buildah", busybox, f"{cgroup}/buildah", args.isolation
                )
                builds: dict[str, Build] = {
                    "berth": berth.cli_build,
                    "client": berth.client_build,
                    "buildah": buildah.build,
                }
                samples = Samples()
                bench_builds(builds, args.rounds, samples)
                check_images(berth, buildah)
                report(args, samples)
            finally:
                if buildah is not None:
                    buildah.close()
                if berth is not None:
                    berth.close()
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
