"""berthd.node.netns: a namespace made inside the process, bound to a file (needs root, as
the node agent; no server)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from berthd.node.netns import new_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making a namespace needs root")


def test_the_namespace_outlives_its_thread_with_loopback_up(tmp_path: Path) -> None:
    path = tmp_path / "ns"
    new_netns(path)
    try:
        ours = os.readlink("/proc/self/ns/net")
        theirs = subprocess.run(
            ["nsenter", f"--net={path}", "readlink", "/proc/self/ns/net"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert theirs != ours  # a namespace of its own, and this process stayed in its own
        links = json.loads(
            subprocess.run(
                ["nsenter", f"--net={path}", "ip", "-j", "link", "show"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert [link["ifname"] for link in links] == ["lo"]
        assert "UP" in links[0]["flags"]
    finally:
        subprocess.run(["umount", str(path)], check=False)
