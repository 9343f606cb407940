"""spec + diff for real: busybox on overlayfs, run by runc, then docker-diff and layer export.

Runs as root (mount, runc). Every mount, runc container and cgroup made here is removed in
finally blocks, even when an assertion fails.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berthd.node.diff import changes, export_layer
from berthd.node.spec import (
    ContainerConfig,
    MountSpec,
    build_runtime_config,
    nofile_limit,
    prepare_etc_files,
    resolve_process,
    resolve_user,
    write_init_layer,
)

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
RUNC = shutil.which("runc") or "/usr/sbin/runc"


@dataclass
class Overlay:
    lowers: list[Path]  # bottom first
    upper: Path
    rootfs: Path


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Overlay]:
    """busybox in an image layer, Docker's init layer above it, a fresh upper dir on top."""
    image = tmp_path / "layer-busybox"
    (image / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, image / "bin" / "busybox")
    (image / "bin" / "sh").symlink_to("busybox")
    shutil.copy2(BUSYBOX, image / "bin" / "busybox.copy")
    init = tmp_path / "layer-init"
    write_init_layer(init)
    upper, work, rootfs = tmp_path / "upper", tmp_path / "work", tmp_path / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir()
    options = f"lowerdir={init}:{image},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(rootfs)], check=True)
    try:
        yield Overlay([image, init], upper, rootfs)
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    """A cgroup parent of our own: runc deletes a container's cgroup but not its parents."""
    parent = f"berth-test-{uuid.uuid4().hex[:12]}"
    try:
        yield parent
    finally:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if (hierarchy / parent).is_dir():
                (hierarchy / parent).rmdir()


def run_container(
    tmp_path: Path, overlay: Overlay, cfg: ContainerConfig, cgroup_parent: str
) -> subprocess.CompletedProcess[bytes]:
    """`runc run` in the foreground; the container and its runc state are gone afterwards."""
    cfg.validate()
    container_id = uuid.uuid4().hex[:12]
    args, env, cwd = resolve_process({"Env": ["PATH=/bin"]}, cfg, hostname="box")
    uid, gid, groups = resolve_user(overlay.rootfs, cfg.user)
    bundle = tmp_path / f"bundle-{container_id}"
    bundle.mkdir()
    config = build_runtime_config(
        config=cfg,
        args=args,
        env=env,
        cwd=cwd,
        uid=uid,
        gid=gid,
        additional_gids=groups,
        rootfs=overlay.rootfs,
        hostname="box",
        etc_files=prepare_etc_files(bundle / "etc", "box", cfg.network_mode),
        cgroups_path=f"/{cgroup_parent}/{container_id}",
    )
    (bundle / "config.json").write_text(json.dumps(config))
    runc = [RUNC, "--root", str(tmp_path / "runc-state")]
    try:
        return subprocess.run(
            [*runc, "run", "--bundle", str(bundle), container_id],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
    finally:
        subprocess.run([*runc, "delete", "-f", container_id], capture_output=True)


def test_container_changes_become_a_layer(
    tmp_path: Path, overlay: Overlay, cgroup_parent: str
) -> None:
    script = "rm /bin/busybox.copy; echo hi > /new; cat /etc/hostname; exit 3"
    cfg = ContainerConfig("busybox", command=["sh", "-c", script])
    result = run_container(tmp_path, overlay, cfg, cgroup_parent)
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"box\n"

    # The init layer held every mount point, so only the container's own work shows.
    assert changes(overlay.upper, overlay.lowers) == [
        ("/bin", "C"),
        ("/bin/busybox.copy", "D"),
        ("/new", "A"),
    ]

    layer_path = tmp_path / "layer.tar.gz"
    with layer_path.open("wb") as out:
        layer = export_layer(overlay.upper, out)
    data = layer_path.read_bytes()
    raw = gzip.decompress(data)
    assert layer.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert layer.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert layer.size == len(data)
    # GNU tar reads it too, and sees the same entries.
    listing = subprocess.run(["tar", "-tzf", str(layer_path)], capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["bin/", "bin/.wh.busybox.copy", "new"]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["bin", "bin/.wh.busybox.copy", "new"]
        assert members["bin/.wh.busybox.copy"].isreg()
        assert members["bin/.wh.busybox.copy"].size == 0
        new = tar.extractfile(members["new"])
        assert new is not None and new.read() == b"hi\n"


def test_memory_limit_gets_a_greedy_process_oom_killed(
    tmp_path: Path, overlay: Overlay, cgroup_parent: str
) -> None:
    # The string doubles until it passes 64 MiB; the kernel's OOM killer ends it with SIGKILL.
    greedy = "x=0123456789abcdef; while :; do x=$x$x; done"
    cfg = ContainerConfig("busybox", command=["sh", "-c", greedy], memory_bytes=64 * 1024 * 1024)
    result = run_container(tmp_path, overlay, cfg, cgroup_parent)
    assert result.returncode == 137, result.stderr


def test_bounded_growth_fits_under_the_same_limit(
    tmp_path: Path, overlay: Overlay, cgroup_parent: str
) -> None:
    # Control for the OOM test: 1 MiB stays far below 64 MiB, so the limit itself is harmless.
    script = "x=0123456789abcdef; i=0; while [ $i -lt 16 ]; do x=$x$x; i=$((i+1)); done; echo ${#x}"
    cfg = ContainerConfig("busybox", command=["sh", "-c", script], memory_bytes=64 * 1024 * 1024)
    result = run_container(tmp_path, overlay, cfg, cgroup_parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"1048576\n"


def test_the_process_gets_docker_defaults(
    tmp_path: Path, overlay: Overlay, cgroup_parent: str
) -> None:
    """What the container sees of config.json: user, caps, rlimit, masks, mounts, netns."""
    (overlay.rootfs / "etc" / "passwd").write_text("app:x:1000:1000::/:/bin/sh\n")
    (overlay.rootfs / "etc" / "group").write_text("app:x:1000:\nextra:x:2000:app\n")
    script = (
        "id -u; id -g; id -G; grep -E '^Cap(Eff|Bnd):' /proc/self/status; ulimit -n; "
        "wc -c < /proc/timer_list; ls /sys/firmware | wc -l; "
        "grep -c ' /dev/shm .*size=65536k' /proc/mounts; cat /proc/net/dev | wc -l; pwd; "
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us"
    )
    cfg = ContainerConfig(
        "busybox", command=["sh", "-c", script], user="app", working_dir="/tmp", cpu_millis=500
    )
    result = run_container(tmp_path, overlay, cfg, cgroup_parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["1000", "1000", "1000 2000"]
    # A non-root user keeps the bounding set only: Docker's 14 capabilities.
    assert lines[3].split() == ["CapEff:", "0000000000000000"]
    assert lines[4].split() == ["CapBnd:", "00000000a80425fb"]
    assert int(lines[5]) == nofile_limit()
    assert lines[6:8] == ["0", "0"]  # masked: a file shows as /dev/null, a directory empty
    assert lines[8] == "1"
    assert lines[9] == "3"  # two header lines and lo: a network namespace of its own
    assert lines[10] == "/tmp"
    assert lines[11:] == ["50000", "100000"]  # half a CPU


def test_read_only_rootfs_mounts_and_host_network(
    tmp_path: Path, overlay: Overlay, cgroup_parent: str
) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "given").write_text("from the host\n")
    script = (
        "touch /x 2>/dev/null || echo rootfs-ro; echo written > /data/f; cat /ro/given; "
        "touch /ro/y 2>/dev/null || echo mount-ro; cat /proc/net/dev"
    )
    cfg = ContainerConfig(
        "busybox",
        command=["sh", "-c", script],
        read_only_rootfs=True,
        mounts=[MountSpec(str(rw), "/data"), MountSpec(str(ro), "/ro", read_only=True)],
        network_mode="host",
    )
    result = run_container(tmp_path, overlay, cfg, cgroup_parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["rootfs-ro", "from the host", "mount-ro"]
    assert (rw / "f").read_text() == "written\n"
    assert not (ro / "y").exists()

    # Host mode: the container sees the host's interfaces, not just a loopback of its own.
    def interfaces(text: str) -> set[str]:
        return {line.split(":")[0].strip() for line in text.splitlines()[2:]}

    assert interfaces("\n".join(lines[3:])) == interfaces(Path("/proc/net/dev").read_text())
