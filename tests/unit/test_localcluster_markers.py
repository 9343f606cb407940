"""How `berthd up/down/start` recognise the processes a local cluster recorded (pids get
reused): two clusters on one machine, from two state directories, never take each other's etcd
for their own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from berthd import localcluster
from berthd.localcluster import Ports, etcd_entry, process_alive


@contextmanager
def running(argv: list[str]) -> Iterator[int]:
    """A process whose command line is argv's (what the check reads, in /proc/PID/cmdline),
    until the block ends; its pid."""
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"  # exec'd: /proc shows its arguments
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("other", ["b", "a/etcd-b"])  # a sibling, and one whose path extends a's
def test_a_cluster_does_not_take_another_clusters_etcd_for_its_own(
    tmp_path: Path, other: str
) -> None:
    mine = etcd_entry(tmp_path / "a", Ports(40000))
    theirs = etcd_entry(tmp_path / other, Ports(41000))
    # Cluster a's etcd died and its pid went to cluster b's etcd: a's record must not match.
    with running(theirs["argv"]) as pid:
        assert process_alive(pid, str(theirs["marker"]))
        assert not process_alive(pid, str(mine["marker"]))
    assert not process_alive(pid, str(theirs["marker"]))


def test_a_record_written_before_the_marker_was_per_cluster_still_matches(tmp_path: Path) -> None:
    argv = etcd_entry(tmp_path / "a", Ports(40000))["argv"]
    assert "--name=berth" in argv
    with running(argv) as pid:
        assert localcluster.process_alive(pid, "--name=berth")
