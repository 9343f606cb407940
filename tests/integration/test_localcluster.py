"""`berthd up / status / down` and the CLI finding the cluster with no flags."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

BERTHD = [sys.executable, "-m", "berthd.main"]


def free_base_port() -> int:
    """A base port whose whole block (base .. base+13) is free right now."""
    for _ in range(50):
        base = random.randrange(40000, 60000, 20)
        try:
            for port in range(base, base + 14):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"BERTH_STATE_DIR": str(state)}
    base = free_base_port()
    started = run([*BERTHD, "up", "--base-port", str(base)], env)
    try:
        assert started.returncode == 0, started.stderr
        assert f"export BERTH_REGISTRY=127.0.0.1:{base + 10}" in started.stdout
        cluster = json.loads((state / "cluster.json").read_text())
        pids = [cluster["etcd"]["pid"]] + [s["pid"] for s in cluster["services"].values()]
        assert sorted(cluster["services"]) == ["cluster", "node", "registry"]
        assert all(alive(pid) for pid in pids)

        status = run([*BERTHD, "status"], env)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == 4  # etcd and three services

        # The CLI finds the cluster through the default state directory alone.
        listed = run([sys.executable, "-m", "berth", "registry", "ls", "--format", "json"], env)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []

        again = run([*BERTHD, "up", "--base-port", str(base)], env)
        assert again.returncode == 0 and "already running" in again.stderr
    finally:
        stopped = run([*BERTHD, "down"], env)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(pid) for pid in pids)
    assert not (state / "cluster.json").exists()
    assert run([*BERTHD, "status"], env).returncode == 1


def test_up_refuses_ports_in_use(tmp_path: Path) -> None:
    base = free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 10))
        taken.listen()
        result = run([*BERTHD, "up", "--base-port", str(base)], {"BERTH_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert f"port {base + 10} is already in use" in result.stderr
    assert not (tmp_path / "cluster.json").exists()
