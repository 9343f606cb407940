"""Several "hosts" on one machine: network namespaces linked to a test bridge.

Layout of one run (nothing is created in the root network namespace):

    bt-<run>-ctl   bridge br0 10.213.X.1/24; etcd, registry (and later the cluster) listen here
    bt-<run>-hN    eth0 10.213.X.(10+N)/24, a veth whose peer `hN` is a port of br0 in -ctl

X is derived from the run id. These addresses exist only inside namespaces this run made (the
root namespace has no route to them), so concurrent runs cannot clash even on the same X, and the
test process itself never talks to them: it runs its clients inside a namespace (`python_in`).

Processes enter a namespace with `nsenter --net`, not `ip netns exec`: the latter unshares the
mount namespace and remounts /sys, which hides /sys/fs/cgroup (runc then fails) and keeps the
agent's overlay mounts out of sight of the host. With `nsenter --net` a node agent shares the
host's mounts and cgroups exactly as a single-host agent does.

TLS between namespaces as between hosts: etcd in -ctl serves https with client-cert auth, and
every service issues its certificate (for its namespace address) from the session's CA, whose
files the processes inherit in BERTH_TLS_CA and BERTH_TLS_CA_KEY (conftest.cluster_ca).

Everything created is recorded in a module-level registry and removed by `close()`, which is
idempotent and also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from berthd.common.security.ca import CertificateAuthority
from berthd.localcluster import unmount_under

from .conftest import stop_process, wait_until

__all__ = ["HostService", "TestNetwork", "force_remove_containers", "unmount_under"]

REPO = Path(__file__).resolve().parents[2]
# How long a test process gets to drain after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10
ETCD_CLIENT_PORT = 2379  # each control namespace is fresh, so the well-known ports are free
ETCD_PEER_PORT = 2380

# Every TestNetwork not yet closed, so an atexit hook can clean up after a crashed fixture.
_LIVE: set[TestNetwork] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


class TestNetwork:
    """N host namespaces plus a control namespace with the bridge; see the module docstring."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, run_dir: Path, run_id: str | None = None) -> None:
        # The pid in the id lets a later run sweep namespaces of a run that was SIGKILLed.
        self.run_id = run_id or f"p{os.getpid()}r{uuid.uuid4().hex[:4]}"
        self.run_dir = run_dir
        # 10.213.X.0/24 with X in 1..250, from the run id, so parallel runs differ where they can.
        self.subnet = 1 + zlib.crc32(self.run_id.encode()) % 250
        self.ctl = f"bt-{self.run_id}-ctl"
        self.hosts: list[str] = []
        self.namespaces: list[str] = []  # created, in creation order
        self.processes: list[subprocess.Popen] = []

    # -- addresses and argv ---------------------------------------------------------------

    def host(self, n: int) -> str:
        return f"bt-{self.run_id}-h{n}"

    @property
    def control_address(self) -> str:
        return f"10.213.{self.subnet}.1"

    @property
    def etcd(self) -> str:
        return f"{self.control_address}:{ETCD_CLIENT_PORT}"

    def address(self, host: str) -> str:
        """The eth0 address of a host namespace (or the bridge address for the control ns)."""
        if host == self.ctl:
            return self.control_address
        return f"10.213.{self.subnet}.{10 + self._index(host)}"

    def exec_argv(self, host: str) -> list[str]:
        """Prefix that runs a command inside `host`'s network namespace (host mounts, cgroups)."""
        return ["nsenter", f"--net=/run/netns/{host}", "--"]

    def _index(self, host: str) -> int:
        return int(host.rsplit("-h", 1)[1])

    # -- lifecycle ------------------------------------------------------------------------

    def create(self, n_hosts: int) -> list[str]:
        """Make the control namespace with br0 and `n_hosts` linked host namespaces."""
        _LIVE.add(self)
        sweep_stale()
        try:
            self._add_ns(self.ctl)
            _ip("-n", self.ctl, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.ctl, "addr", "add", f"{self.control_address}/24", "dev", "br0")
            _ip("-n", self.ctl, "link", "set", "br0", "up")
            for n in range(1, n_hosts + 1):
                host = self.host(n)
                self._add_ns(host)
                # Both veth ends are born inside namespaces: nothing appears in the root ns.
                _ip(
                    "-n", self.ctl, "link", "add", f"h{n}", "type", "veth",
                    "peer", "name", "eth0", "netns", host,
                )  # fmt: skip
                _ip("-n", self.ctl, "link", "set", f"h{n}", "master", "br0", "up")
                _ip("-n", host, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                _ip("-n", host, "link", "set", "eth0", "up")
                self.hosts.append(host)
        except BaseException:
            self.close()
            raise
        return list(self.hosts)

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """Simulate the host's death for everyone else: unplug its cable (bridge port down)."""
        _ip("-n", self.ctl, "link", "set", f"h{self._index(host)}", "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.ctl, "link", "set", f"h{self._index(host)}", "up")

    # -- processes ------------------------------------------------------------------------

    def spawn(
        self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start `argv` inside `host`, output to `log`; stopped by `close()` if still running."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*self.exec_argv(host), *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=REPO,
            )
        self.processes.append(proc)
        return proc

    def python_in(self, host: str, code: str, *args: str, timeout: float = 30) -> str:
        """Run a Python snippet (the project venv, repo as cwd) inside `host`; returns stdout."""
        done = subprocess.run(
            [*self.exec_argv(host), sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if done.returncode != 0:
            raise RuntimeError(f"snippet in {host} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def python_json(self, host: str, code: str, *args: str, timeout: float = 30) -> object:
        return json.loads(self.python_in(host, code, *args, timeout=timeout).splitlines()[-1])

    def start_etcd(self, data: Path) -> subprocess.Popen:
        """etcd in the control namespace on the bridge address; returns once it accepts clients."""
        url = f"https://{self.control_address}:{ETCD_CLIENT_PORT}"
        peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
        # TLS with client certificates, from the session's CA (conftest.cluster_ca).
        ca = CertificateAuthority.load(
            Path(os.environ["BERTH_TLS_CA"]), Path(os.environ["BERTH_TLS_CA_KEY"])
        )
        cert, key = data / "etcd.crt", data / "etcd.key"
        ca.issue("service:etcd", [self.control_address]).write(cert, key)
        proc = self.spawn(
            self.ctl,
            [
                "etcd",
                "--name=ctl",
                f"--data-dir={data / 'data'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=ctl={peer}",
                f"--cert-file={cert}",
                f"--key-file={key}",
                f"--trusted-ca-file={os.environ['BERTH_TLS_CA']}",
                "--client-cert-auth",
                "--logger=zap",
            ],
            data / "etcd.log",
        )
        probe = (
            "import socket,sys,time\n"
            "d=time.monotonic()+20\n"
            "while time.monotonic()<d:\n"
            "    try:\n"
            "        socket.create_connection((sys.argv[1],int(sys.argv[2])),0.2).close();break\n"
            "    except OSError: time.sleep(0.05)\n"
            "else: sys.exit('etcd not ready')\n"
        )
        self.python_in(self.ctl, probe, self.control_address, str(ETCD_CLIENT_PORT))
        return proc

    def start_control(self, hosts: int, prefix: str) -> HostService:
        """`hosts` host namespaces, then etcd and a registry (not yet waited for) in the
        control namespace: what every multi-host fixture starts from."""
        self.create(hosts)
        (self.run_dir / "etcd").mkdir()
        self.start_etcd(self.run_dir / "etcd")
        registry_data = f"--data-dir={self.run_dir / 'registry'}"
        return self.start_service(self.ctl, "registry", registry_data, prefix=prefix)

    def start_service(
        self,
        host: str,
        service: str,
        *extra: str,
        prefix: str,
        lease_ttl: int = 3,
        name: str = "",
    ) -> HostService:
        """`berthd <service>` inside `host` on its address, like conftest.Services.start but
        without waiting, so several agents start in parallel: call `.wait_ready()`. `name`
        (default `<service>-<host>`) names its log and ready files: give two instances of one
        service in one namespace different names."""
        name = name or f"{service}-{host.rsplit('-', 1)[1]}"
        ready = self.run_dir / f"{name}.ready.json"
        log = self.run_dir / f"{name}.log"
        ready.unlink(missing_ok=True)
        proc = self.spawn(
            host,
            [
                sys.executable,
                "-m",
                "berthd.main",
                service,
                f"--listen={self.address(host)}:0",
                "--metrics-listen=127.0.0.1:0",  # the namespace's own loopback
                f"--etcd={self.etcd}",
                f"--etcd-prefix={prefix}",
                f"--ready-file={ready}",
                f"--lease-ttl={lease_ttl}",
                *extra,
            ],
            log,
        )
        return HostService(name, host, proc, log, ready)

    # -- cleanup --------------------------------------------------------------------------

    def start_agents(
        self, registry: str, prefix: str, lease_ttl: int, *extra: str
    ) -> dict[str, HostService]:
        """One node agent per host, without waiting: node id `hostN`, label `host=hN`, data in
        `run_dir/hostN`, pulling from `registry`, with the flags `extra`. Call `.wait_ready()`
        on each."""
        return {
            f"host{n}": self.start_agent(n, registry, prefix, lease_ttl, *extra)
            for n in range(1, len(self.hosts) + 1)
        }

    def start_agent(
        self, n: int, registry: str, prefix: str, lease_ttl: int, *extra: str
    ) -> HostService:
        """The node agent of host `n` (see start_agents), also to restart it after a kill."""
        return self.start_service(
            self.host(n),
            "node",
            f"--data-dir={self.run_dir / f'host{n}'}",
            f"--node-id=host{n}",
            f"--label=host=h{n}",
            f"--registry={registry}",
            *extra,
            prefix=prefix,
            lease_ttl=lease_ttl,
        )

    def close(self) -> None:
        """Stop processes, unmount leftovers under run_dir, delete namespaces. Idempotent."""
        for proc in reversed(self.processes):
            stop_process(proc, timeout=STOP_TIMEOUT)
        # Whatever daemonized inside our namespaces (conmon, stray children) dies by pid.
        for ns in self.namespaces:
            for pid in _netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_netns_pids(ns) for ns in self.namespaces):
            time.sleep(0.05)
        unmount_under(self.run_dir)
        for ns in reversed(self.namespaces):
            # Deleting a namespace destroys its links (veth pairs, br0) with it.
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        self.hosts.clear()
        _LIVE.discard(self)


def sweep_stale() -> list[str]:
    """Delete namespaces of runs whose process is gone (killed before its cleanup could run)."""
    swept = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"bt-p(\d+)r[0-9a-f]+-(ctl|h\d+)", name)
        if not match or Path(f"/proc/{match[1]}").exists():
            continue
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", name, check=False)
        swept.append(name)
    return swept


def force_remove_containers(data_dir: Path, runc: str = "runc") -> None:
    """Fallback when an agent could not remove its containers: delete them through runc."""
    root = data_dir / "runc"
    if not root.is_dir():
        return
    listed = subprocess.run(
        [runc, "--root", str(root), "list", "-q"], capture_output=True, text=True, check=False
    )
    for cid in listed.stdout.split():
        subprocess.run(
            [runc, "--root", str(root), "delete", "--force", cid], capture_output=True, check=False
        )


@dataclass
class HostService:
    """A `berthd` process inside a namespace; address and metrics are known once ready."""

    name: str
    host: str
    proc: subprocess.Popen
    log: Path
    ready: Path
    address: str = ""
    metrics: str = ""

    def wait_ready(self, timeout: float = 30) -> HostService:
        try:
            wait_until(self.ready.exists, timeout, self.name, self.proc)
        except Exception:
            stop_process(self.proc, timeout=STOP_TIMEOUT)
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"{self.name} failed to start:\n{tail}") from None
        info = json.loads(self.ready.read_text())
        self.address, self.metrics = info["address"], info["metrics"]
        return self

    def stop(self) -> int | None:
        stop_process(self.proc, timeout=STOP_TIMEOUT)
        return self.proc.returncode


@atexit.register
def _close_all() -> None:
    for network in list(_LIVE):
        network.close()
