"""The contract from a second language: `tests/clients/node/` (Node.js, @grpc/grpc-js, the
protos loaded at run time and nothing else) against a cluster started with `berthd up`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_localcluster import BERTH, BERTHD, free_base_port, run

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"


def test_node_client_against_a_live_cluster(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "Node.js is missing: `make test` installs it"
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"the Node.js client's packages are missing: run `npm ci` in {CLIENT}")
    state = tmp_path / "state"
    env = {"BERTH_STATE_DIR": str(state)}
    started = run([*BERTHD, "up", "--base-port", str(free_base_port())], env)
    try:
        assert started.returncode == 0, started.stderr
        cluster = json.loads((state / "cluster.json").read_text())
        # The client is a developer's program: a developer token, on the public ports.
        created = run(
            [*BERTH, "token", "create", "--name", "node-client", "--role", "developer", "-q"], env
        )
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        address = cluster["services"]["cluster"]["public_address"]
        result = subprocess.run(
            [node, "--test", "--test-concurrency=1", *map(str, sorted(CLIENT.glob("*.test.mjs")))],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=CLIENT,
            env={
                "PATH": "/usr/bin:/bin",
                "BERTH_CLUSTER": address,
                "BUSYBOX": _busybox(),
                # The CA file `berthd up` wrote, and the token: no client certificate.
                "BERTH_TLS_CA": str(state / "tls" / "ca.crt"),
                "BERTH_TOKEN": token,
            },
        )
        sys.stdout.write(result.stdout[-6000:])
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert "# fail 0" in result.stdout
    finally:
        stopped = run([*BERTHD, "down"], env)
        assert stopped.returncode == 0, stopped.stderr


def _busybox() -> str:
    """busybox-static, which `make` installs: the image the Node.js client builds is made of it."""
    found = shutil.which("busybox")
    assert found, "busybox is missing: `make` installs busybox-static"
    return found
