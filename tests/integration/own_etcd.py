"""An etcd of a test's own, to kill and start again on the same ports and data (the session's
etcd is shared by every test)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from .conftest import ClusterCA, free_port, spawn, wait_until

# A guard only: the start ends when etcd answers.
GUARD = 60


class OwnEtcd:
    """An etcd for one test, killed and restarted on the same ports and data."""

    def __init__(self, directory: Path, ca: ClusterCA, *flags: str) -> None:
        """`flags`: more of etcd's flags (a small --quota-backend-bytes, say)."""
        self.directory = directory
        self.client, self.peer = free_port(), free_port()
        self.flags = [*ca.etcd_flags("outage-etcd", ["127.0.0.1", "localhost"]), *flags]
        self.endpoint = f"127.0.0.1:{self.client}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        url, peer = f"https://{self.endpoint}", f"http://127.0.0.1:{self.peer}"
        self.proc = spawn(
            [
                "etcd",
                "--name=outage",
                f"--data-dir={self.directory / 'data'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=outage={peer}",
                *self.flags,
                "--logger=zap",
            ],
            self.directory / "etcd.log",
        )
        wait_until(self._answers, GUARD, "etcd", self.proc)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.client), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
