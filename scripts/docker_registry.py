"""Debian's `docker-registry` (CNCF Distribution) on a free loopback port, for the demo and the
benchmarks: plain HTTP, no auth, filesystem storage in a directory of the caller's.

(The integration tests have their own starter with basic and token auth:
tests/integration/docker_registry.py.)
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_docker_registry(work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start it with storage under `work`; returns the process, HOST:PORT and the storage dir.
    RuntimeError (with the end of its log) when it does not come up."""
    storage = work / "docker-registry-storage"
    storage.mkdir(parents=True)
    port = free_port()
    config = work / "docker-registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
    )
    log = work / "docker-registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"docker-registry exited with {proc.returncode}: {' | '.join(tail)}")
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=1) as reply:
                if reply.status == 200:
                    return proc, address, storage
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"docker-registry did not answer on {address} within 30s; see {log}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT: a process we started, by its pid."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
