"""Real processes for integration tests: one etcd per session, registries per test.

Each test gets its own etcd key prefix, so tests share the etcd without seeing each other's keys.
Everything started here is stopped by pid at teardown.

TLS is on everywhere, as in production: one CA per session (`cluster_ca`) whose files are put in
this process's environment, so every process a test starts inherits them: services read
BERTH_TLS_CA and BERTH_TLS_CA_KEY and issue their own certificates; clients in the test process
(berth.client, Store) read BERTH_TLS_CA with the `user:test` certificate in
BERTH_TLS_CERT/BERTH_TLS_KEY. etcd serves TLS with --client-cert-auth.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berth.client import NodeClient, RegistryClient
from berthd.common.security.ca import CA_CERT, CA_KEY, CertificateAuthority
from berthd.common.store import Store
from berthd.node.watchdog import kill_watchdog

from .counting import CountingStore, opened
from .images import busybox_layer, push_image

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process with stdout and stderr going to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class ClusterCA:
    """The session's CA and the files derived from it."""

    dir: Path
    ca: CertificateAuthority

    @property
    def ca_cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.dir / CA_KEY

    def issue(self, name: str, identity: str, hosts: list[str] | tuple[str, ...] = ()) -> Path:
        """Write <name>.crt and <name>.key for identity; returns the certificate's path."""
        self.ca.issue(identity, list(hosts)).write(
            self.dir / f"{name}.crt", self.dir / f"{name}.key"
        )
        return self.dir / f"{name}.crt"

    def etcd_flags(self, name: str, hosts: list[str]) -> list[str]:
        """etcd's TLS flags: https with a certificate for hosts, client certificates required."""
        cert = self.issue(name, "service:etcd", hosts)
        return [
            f"--cert-file={cert}",
            f"--key-file={cert.with_suffix('.key')}",
            f"--trusted-ca-file={self.ca_cert}",
            "--client-cert-auth",
        ]


TLS_ENV = (
    "BERTH_TLS_CA",
    "BERTH_TLS_CA_KEY",
    "BERTH_TLS_CERT",
    "BERTH_TLS_KEY",
    "BERTH_AUTH_FILE",
    "BERTH_TOKEN",
)


@pytest.fixture(scope="session", autouse=True)
def cluster_ca(tmp_path_factory) -> Iterator[ClusterCA]:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority.create("berth test CA")
    ca.save(directory)
    files = ClusterCA(directory, ca)
    # The tests act as the cluster's administrator unless a test says otherwise.
    client = files.issue("client", "user:admin")
    saved = {name: os.environ.get(name) for name in TLS_ENV}
    os.environ.update(
        BERTH_TLS_CA=str(files.ca_cert),
        BERTH_TLS_CA_KEY=str(files.ca_key),
        BERTH_TLS_CERT=str(client),
        BERTH_TLS_KEY=str(client.with_suffix(".key")),
        # No token this machine's user logged in with speaks for the tests.
        BERTH_AUTH_FILE=str(directory / "auth.json"),
    )
    os.environ.pop("BERTH_TOKEN", None)
    yield files
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory, cluster_ca: ClusterCA) -> Iterator[str]:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run `make deps`")
    data = tmp_path_factory.mktemp("etcd")
    client, peer = free_port(), free_port()
    proc = spawn(
        [
            "etcd",
            "--name=test",
            f"--data-dir={data / 'data'}",
            f"--listen-client-urls=https://127.0.0.1:{client}",
            f"--advertise-client-urls=https://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=test=http://127.0.0.1:{peer}",
            *cluster_ca.etcd_flags("etcd", ["127.0.0.1", "localhost"]),
            "--logger=zap",
        ],
        data / "etcd.log",
    )

    def healthy() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", client), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_until(healthy, 20, "etcd", proc)
        yield f"127.0.0.1:{client}"
    finally:
        stop_process(proc)


@pytest.fixture
def etcd_prefix() -> str:
    return f"/berth-test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
async def store(etcd_endpoint: str, etcd_prefix: str):
    s = Store(etcd_endpoint, etcd_prefix)
    await s.connect()
    yield s
    await s.delete_prefix("")
    await s.close()


@pytest.fixture
async def counting(etcd_endpoint: str, etcd_prefix: str):
    """A second store on the test's prefix that counts its reads (tests/integration/counting.py)."""
    async with opened(CountingStore, etcd_endpoint, etcd_prefix) as s:
        yield s


@pytest.fixture
def own_etcd(tmp_path: Path, cluster_ca: ClusterCA):
    """An etcd of the test's own, started, for a test to kill and start again."""
    from .own_etcd import OwnEtcd  # it imports this module

    own = OwnEtcd(tmp_path / "etcd", cluster_ca)
    own.directory.mkdir()
    own.start()
    yield own
    own.stop()


@pytest.fixture
def own_etcd_services(tmp_path: Path, own_etcd) -> Iterator[Services]:
    """Services on the test's own etcd (`own_etcd`)."""
    services = Services(tmp_path, own_etcd.endpoint, f"/berth-own-{uuid.uuid4().hex[:8]}/")
    yield services
    services.stop_all()


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    address: str
    metrics: str
    log: Path
    # The port for callers without a client certificate (tokens, anonymous).
    public_address: str = ""
    # The base URL of its HTTP API (the registry's OCI /v2/, with --http-listen).
    http_url: str = ""

    def stop(self) -> int:
        stop_process(self.proc)
        return self.proc.returncode


class Services:
    """Starts `berthd <service>` processes against the test's etcd prefix."""

    def __init__(self, tmp: Path, etcd: str, prefix: str) -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.prefix = prefix
        self.started: list[ServiceProcess] = []
        self.node_data: set[Path] = set()

    def start(self, service: str, *extra: str, env: dict[str, str] | None = None) -> ServiceProcess:
        n = len(self.started)
        ready = self.tmp / f"{service}-{n}.ready.json"
        log = self.tmp / f"{service}-{n}.log"
        proc = spawn(
            [
                sys.executable,
                "-m",
                "berthd.main",
                service,
                "--listen=127.0.0.1:0",
                "--public-listen=127.0.0.1:0",
                "--metrics-listen=127.0.0.1:0",
                f"--etcd={self.etcd}",
                f"--etcd-prefix={self.prefix}",
                f"--ready-file={ready}",
                "--lease-ttl=5",
                *extra,
            ],
            log,
            env,
        )
        try:
            wait_until(ready.exists, 30, service, proc)
        except Exception:
            stop_process(proc)
            raise RuntimeError(f"{service} failed to start:\n{log.read_text()[-3000:]}") from None
        info = json.loads(ready.read_text())
        started = ServiceProcess(
            service,
            proc,
            info["address"],
            info["metrics"],
            log,
            info.get("public_address", ""),
            info.get("http_url", ""),
        )
        self.started.append(started)
        if service == "node":
            # Its watchdog outlives it by design: stop_all kills it by the pid in the data dir.
            data = next((a.split("=", 1)[1] for a in extra if a.startswith("--data-dir=")), "")
            if data:
                self.node_data.add(Path(data))
        return started

    def registry(self, data_dir: Path | None = None) -> ServiceProcess:
        data = data_dir or self.tmp / f"registry-data-{len(self.started)}"
        return self.start("registry", f"--data-dir={data}")

    def stop_all(self) -> None:
        for service in reversed(self.started):
            service.stop()
        for data in self.node_data:
            kill_watchdog(data)


@pytest.fixture
def services(tmp_path: Path, etcd_endpoint: str, etcd_prefix: str) -> Iterator[Services]:
    s = Services(tmp_path, etcd_endpoint, etcd_prefix)
    yield s
    s.stop_all()


@pytest.fixture
def registry(services: Services, tmp_path: Path) -> ServiceProcess:
    return services.registry(tmp_path / "registry-data")


@pytest.fixture
def client(registry: ServiceProcess) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address) as c:
        yield c


@dataclass
class NodeProcess:
    """A node agent process, restartable over the same data directory (like a host reboot of
    the agent alone)."""

    services: Services
    data_dir: Path
    node_id: str
    registry: ServiceProcess
    process: ServiceProcess | None = None

    def start(self) -> ServiceProcess:
        self.process = self.services.start(
            "node",
            f"--data-dir={self.data_dir}",
            f"--node-id={self.node_id}",
            f"--registry={self.registry.address}",
        )
        return self.process

    @property
    def address(self) -> str:
        assert self.process is not None
        return self.process.address

    def cleanup(self) -> None:
        """Remove every container (they outlive the agent), then stop the agent."""
        if self.process is None or self.process.proc.poll() is not None:
            self.start()
        with NodeClient(self.address) as node:
            for container in node.list(all=True):
                node.remove(container.id, force=True)
        self.process.stop()


@pytest.fixture
def node_agent(
    services: Services, registry: ServiceProcess, tmp_path: Path
) -> Iterator[NodeProcess]:
    agent = NodeProcess(services, tmp_path / "node", f"test-{uuid.uuid4().hex[:8]}", registry)
    agent.start()
    yield agent
    agent.cleanup()


@pytest.fixture
def node(node_agent: NodeProcess) -> Iterator[NodeClient]:
    with NodeClient(node_agent.address) as c:
        yield c


@pytest.fixture
def busybox(client: RegistryClient, tmp_path: Path) -> str:
    """A one-layer busybox image pushed to the test's registry; returns its reference."""
    push_image(client, "test/busybox", "1", [busybox_layer()], tmp_path)
    return "test/busybox:1"


# Fixtures for every integration test; imported last because docker_registry uses this
# module's process helpers.
from .docker_registry import (  # noqa: E402, F401
    docker_registry_basic_fixture,
    docker_registry_fixture,
    docker_registry_token_fixture,
)
from .nginx import nginx_layout  # noqa: E402, F401
from .oci_http import (  # noqa: E402, F401
    admin_token,
    http_admin,
    http_anonymous,
    oci_registry,
)
