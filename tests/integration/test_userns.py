"""`--userns remap` for real: runc in a user namespace on idmapped layers, through a node agent.

The container's root is host uid 100000 (the node's default range): it writes its root
filesystem, its writes land in the upper dir as host uid 100000, and diff and ExportLayer show
them as uid 0; host-root files stay out of its reach and seccomp still refuses new namespaces
and mounts. The agent is killed and started again around a running remapped container, and
every mount it made is gone when the container is removed. The fixtures remove every
container, the agent and (test_secrets' cluster) the cluster service.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from isal import igzip

from berth.client import (
    ClusterClient,
    ContainerConfig,
    MountSpec,
    NodeClient,
    RegistryClient,
    SecretClient,
    SecretReference,
)
from berth.errors import BerthClientError
from berthd.node.secrets import run_dir

from .conftest import NodeProcess, ServiceProcess
from .images import busybox_layer, push_image
from .test_node_agent import eventually, logs
from .test_secrets import cluster, running  # noqa: F401 (cluster: a fixture)

pytestmark = pytest.mark.integration

# Each line NAME VALUE: one container answers every question.
PROBE = """
echo uid_map $(cat /proc/self/uid_map)
echo gid_map $(cat /proc/self/gid_map)
echo id $(id -u):$(id -g)
echo image_owner $(stat -c %u:%g /bin/busybox)
echo new > /newfile && echo newfile ok
echo more >> /etc/passwd && echo copyup ok
rm /etc/group && echo rm ok
echo 10.0.0.1 other >> /etc/hosts && echo hosts ok
echo v > /vol/f && echo volume ok
echo x 2>/tmp/e >> /hostfile && echo hostfile written || echo hostfile "$(cat /tmp/e)"
unshare -Ur true 2>/tmp/e && echo unshare ok || echo unshare "$(cat /tmp/e)"
mount -t tmpfs none /mnt 2>/tmp/e && echo mount ok || echo mount "$(cat /tmp/e)"
echo seccomp $(grep Seccomp: /proc/self/status | cut -f2)
"""
SLEEP = ["sh", "-c", "trap 'exit 0' TERM; while [ ! -f /tmp/go ]; do sleep 0.1; done"]


@pytest.fixture(autouse=True)
def run_dir_removed(tmp_path: Path) -> Iterator[None]:
    """Set up before the node agent, so torn down after it has removed its containers: the
    agent's (then empty) directories under /run go too."""
    yield
    here = run_dir(tmp_path / "node")  # conftest's node_agent data directory
    for directory in (here / "rootfs", here / "secrets", here):
        with contextlib.suppress(OSError):
            directory.rmdir()


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def mounts_of(container: str) -> list[Path]:
    """Mount points of the host's mounts that name the container (its overlay's options do)."""
    return [Path(line.split()[4]) for line in mountinfo().splitlines() if container in line]


def remapped_rootfs(agent: NodeProcess, container: str) -> Path:
    return run_dir(agent.data_dir) / "rootfs" / container


def answers(out: str) -> dict[str, str]:
    seen = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        seen[key] = value
    return seen


def test_a_remapped_root_writes_its_files_as_host_uid_100000_and_commits_them_as_0(
    node: NodeClient, node_agent: NodeProcess, busybox: str, client: RegistryClient, tmp_path: Path
) -> None:
    host_file = tmp_path / "hostfile"
    host_file.write_text("host's\n")
    host_file.chmod(0o644)  # root's: writable only by the host's root
    node.pull(busybox)
    box = node.run(
        ContainerConfig(
            busybox,
            command=["sh", "-c", PROBE],
            userns="remap",
            mounts=[MountSpec("vol", "/vol"), MountSpec(str(host_file), "/hostfile")],
        )
    ).id
    rootfs = remapped_rootfs(node_agent, box)
    assert node.wait(box) == 0, logs(node, box)
    seen = answers(logs(node, box))
    assert seen["uid_map"] == "0 100000 65536" and seen["gid_map"] == "0 100000 65536"
    assert seen["id"] == "0:0"
    assert seen["image_owner"] == "0:0"  # the layer's root files, through the idmapped lower
    for what in ("newfile", "copyup", "rm", "hosts", "volume"):
        assert seen[what] == "ok", (what, seen)
    assert "Permission denied" in seen["hostfile"], seen
    assert host_file.read_text() == "host's\n"
    assert "Operation not permitted" in seen["unshare"], seen
    assert "permission denied" in seen["mount"], seen
    assert seen["seccomp"] == "2"

    # On the host: the upper dir holds host ids of the range; the layer is untouched.
    upper = node_agent.data_dir / "containers" / box / "upper"
    for path in (upper / "newfile", upper / "etc" / "passwd", upper):
        assert (path.stat().st_uid, path.stat().st_gid) == (100000, 100000), path
    (layer,) = (node_agent.data_dir / "layers").iterdir()
    assert (layer / "etc" / "passwd").stat().st_uid == 0
    assert b"more" not in (layer / "etc" / "passwd").read_bytes()
    assert (node_agent.data_dir / "volumes" / "vol").stat().st_uid == 100000
    hosts = node_agent.data_dir / "containers" / box / "etc" / "hosts"
    assert hosts.stat().st_uid == 100000 and "other" in hosts.read_text()
    assert rootfs.is_mount() and f" {rootfs} " in mountinfo()

    # diff and ExportLayer (what commit pushes) speak the container's ids.
    changes = node.changes(box)
    for change in (("A", "/newfile"), ("C", "/etc/passwd"), ("D", "/etc/group")):
        assert change in changes, changes
    digest, _diff_id, _size = node.export_layer(box, "test/busybox")
    blob = tmp_path / "layer.tar.gz"
    client.pull_blob("test/busybox", digest, blob)
    raw = igzip.decompress(blob.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        owners = {m.name: (m.uid, m.gid) for m in tar.getmembers()}
    assert owners["newfile"] == owners["etc/passwd"] == owners["etc/.wh.group"] == (0, 0)

    # The committed layer runs anywhere as root's files, in the host's namespace too.
    push_image(
        client,
        "test/committed",
        "1",
        [busybox_layer(), raw],
        tmp_path,
        cmd=["sh", "-c", "stat -c '%u:%g' /newfile; cat /newfile; tail -1 /etc/passwd"],
    )
    node.pull("test/committed:1")
    derived = node.run(ContainerConfig("test/committed:1")).id
    assert node.wait(derived) == 0
    assert logs(node, derived) == "0:0\nnew\nmore\n"

    node.remove(box)
    assert not rootfs.exists()
    assert box not in mountinfo()


def test_a_remapped_container_survives_the_agent_and_its_mounts_go_with_it(
    node_agent: NodeProcess, busybox: str
) -> None:
    with NodeClient(node_agent.address) as node:
        node.pull(busybox)
        box = node.run(ContainerConfig(busybox, command=SLEEP, userns="remap")).id
        pid = node.inspect(box).pid
    rootfs = remapped_rootfs(node_agent, box)
    # One overlay and nothing else: the idmapped lowers live only inside it.
    assert mounts_of(box) == [rootfs]

    node_agent.process.proc.send_signal(signal.SIGKILL)
    node_agent.process.proc.wait()
    os.kill(pid, 0)  # still running with the agent gone
    # A root filesystem whose record is gone (an agent killed mid-creation) is swept at start.
    stale = rootfs.parent / ("e" * 64)
    stale.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "stale", str(stale)], check=True)
    try:
        node_agent.start()
        assert not stale.exists()
    finally:
        if stale.is_mount():
            subprocess.run(["umount", str(stale)], check=True)
    with NodeClient(node_agent.address) as node:
        info = node.inspect(box)
        assert info.state == "running" and info.pid == pid
        result = node.exec(box, ["sh", "-c", "cat /proc/self/uid_map; echo x > /tmp/mark"])
        assert result.exit_code == 0 and result.stdout.split() == [b"0", b"100000", b"65536"]
        node.stop(box)
        assert node.inspect(box).exit_code == 0
    assert mounts_of(box) == [rootfs]

    # As after a reboot: the overlay is gone. The next start makes the idmapped mounts again.
    node_agent.process.stop()
    subprocess.run(["umount", str(rootfs)], check=True)
    node_agent.start()
    with NodeClient(node_agent.address) as node:
        node.start(box)
        result = node.exec(box, ["sh", "-c", "stat -c %u /bin/busybox /tmp/mark; touch /tmp/go"])
        assert result.stdout.split() == [b"0", b"0"], result
        assert node.wait(box) == 0
        node.remove(box)
    assert box not in mountinfo()
    assert not rootfs.exists()
    assert not (node_agent.data_dir / "containers" / box).exists()


def test_a_remapped_container_with_a_read_only_root_and_another_user(
    node: NodeClient, busybox: str
) -> None:
    node.pull(busybox)
    script = "touch /x 2>&1; id -u"
    box = node.run(
        ContainerConfig(
            busybox, command=["sh", "-c", script], userns="remap", read_only_rootfs=True
        )
    ).id
    assert node.wait(box) == 0
    out = logs(node, box)
    assert out == "touch: /x: Read-only file system\n0\n", out
    # nobody (65534) is in the range: an unprivileged user of the container, as usual.
    nobody = node.run(
        ContainerConfig(busybox, command=["sh", "-c", script], userns="remap", user="nobody")
    ).id
    assert node.wait(nobody) == 0
    out = logs(node, nobody)
    assert out == "touch: /x: Permission denied\n65534\n", out


def test_what_cannot_be_remapped_is_refused(node: NodeClient, busybox: str) -> None:
    node.pull(busybox)
    for options, words in (
        ({"network_mode": "host"}, "cannot share the host's network namespace"),
        ({"user": "70000"}, "uid 70000 is outside the remapped user namespace"),
        ({"user": "0:65536"}, "gid 65536 is outside the remapped user namespace"),
    ):
        with pytest.raises(BerthClientError) as refused:
            node.run(ContainerConfig(busybox, command=["true"], userns="remap", **options))
        assert refused.value.code == "INVALID_ARGUMENT", refused.value
        assert words in str(refused.value)
    assert node.list(all=True) == []


def test_a_remapped_container_reads_its_secrets(
    cluster: ServiceProcess,  # noqa: F811
    busybox: str,
) -> None:
    with SecretClient(cluster.address) as secrets, ClusterClient(cluster.address) as client:
        secrets.create("token", b"t0ken")
        config = ContainerConfig(
            busybox,
            command=SLEEP,
            userns="remap",
            secrets=[SecretReference("token", "token", 0o400, 0, 0)],
        )
        box = client.run(config)
        running(client, box.id)
        # 0400 and root's: readable only because the file is the mapped root's on the host.
        path = "/run/secrets/token"
        shown = client.exec(box.id, ["sh", "-c", f"stat -c '%a %u' {path}; cat {path}"])
        assert shown.stdout == b"400 0\nt0ken", shown
        # Only the node knows its range: a secret owner outside it fails the creation there.
        outside = SecretReference("token", "t", 0o400, 70000, 0)
        config = ContainerConfig(busybox, command=["true"], userns="remap", secrets=[outside])
        failed = client.run(config)
        found = eventually(
            lambda: (c := client.inspect(failed.id)).state == "create_failed" and c,
            what="create_failed",
        )
        assert found.failure_reason == "INVALID_SPEC", found
        assert "secret token's uid 70000 is outside" in found.error
