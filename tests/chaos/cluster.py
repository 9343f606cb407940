"""The chaos test's cluster on the 3-host namespace harness (tests/integration/hosts.py): etcd,
the registry, the image service, the builder and two cluster instances in the control namespace,
a node agent per host.

Every component can be SIGKILLed and started again over the same data, and every host's link
cut and restored. The registry, image, builder and cluster instances listen on fixed ports, so
clients (and the agents' --registry) find a restarted one where it was; agents register their
new address. The builder finds a cluster instance through etcd, as a real deployment would, so
it follows a killed instance to the other one.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.integration.hosts import REPO, HostService, TestNetwork
from tests.integration.test_hosts import _cleanup_agents

from .schedule import CUT, KILL, Fault

LEASE_TTL = 3
REGISTRY_PORT = 5000
CLUSTER_PORTS = {"cluster-1": 5001, "cluster-2": 5002}
IMAGE_PORT = 5003
BUILDER_PORT = 5004
READY_TIMEOUT = 90  # a guard for a restart on a busy 2-core machine


class ChaosCluster:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.net = TestNetwork(run_dir)
        self.prefix = f"/berth-chaos-{uuid.uuid4().hex[:8]}/"
        self.etcd: subprocess.Popen | None = None
        self.services: dict[str, HostService] = {}  # registry, image, builder, cluster-N
        self.agents: dict[str, HostService] = {}  # host1.. -> its node agent
        self.killed: set[str] = set()  # killed by the schedule, not yet restarted
        self.restarts = 0

    # -- addresses --------------------------------------------------------------------

    @property
    def registry(self) -> str:
        return f"{self.net.control_address}:{REGISTRY_PORT}"

    @property
    def clusters(self) -> list[str]:
        return [f"{self.net.control_address}:{port}" for port in CLUSTER_PORTS.values()]

    @property
    def image(self) -> str:
        return f"{self.net.control_address}:{IMAGE_PORT}"

    @property
    def builder(self) -> str:
        return f"{self.net.control_address}:{BUILDER_PORT}"

    @property
    def registry_data(self) -> Path:
        return self.run_dir / "registry"

    @property
    def builder_scratch(self) -> Path:
        return self.run_dir / "builder" / "scratch"

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self.net.create(3)
        (self.run_dir / "etcd").mkdir()
        self.etcd = self.net.start_etcd(self.run_dir / "etcd")
        starting = [self._start_service(name) for name in ("registry", "image", "builder")]
        starting += [self._start_service(name) for name in CLUSTER_PORTS]
        starting += [self._start_agent(n) for n in (1, 2, 3)]
        for service in starting:  # started together, so their imports overlap
            service.wait_ready(READY_TIMEOUT)

    def _start_service(self, name: str) -> HostService:
        if name == "registry":
            extra = [f"--data-dir={self.registry_data}", f"--listen={self.registry}"]
        elif name == "image":
            extra = [
                f"--data-dir={self.run_dir / 'image'}",
                f"--listen={self.image}",
                f"--registry={self.registry}",
            ]
        elif name == "builder":
            extra = [
                f"--data-dir={self.run_dir / 'builder'}",
                f"--listen={self.builder}",
                f"--registry={self.registry}",
            ]
        else:
            extra = [f"--listen={self.net.control_address}:{CLUSTER_PORTS[name]}"]
        service = self.net.start_service(
            self.net.ctl,
            name.split("-")[0],
            *extra,
            prefix=self.prefix,
            lease_ttl=LEASE_TTL,
            name=name,
        )
        self.services[name] = service
        return service

    def _start_agent(self, n: int) -> HostService:
        agent = self.net.start_agent(n, self.registry, self.prefix, LEASE_TTL)
        self.agents[f"host{n}"] = agent
        return agent

    def close(self) -> None:
        for host in self.net.hosts:
            self.net.restore(host)
        with contextlib.suppress(Exception):  # best effort: runc removes what is left
            self.client("observe", "cleanup", timeout=120)
        _cleanup_agents(self.net, self.agents, self.run_dir)
        self.net.close()

    # -- faults -----------------------------------------------------------------------

    def begin(self, fault: Fault) -> None:
        if fault.action == CUT:
            self.net.cut(self.net.host(int(fault.target.removeprefix("host"))))
        elif fault.action == KILL:
            proc = self._process(fault.target)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.killed.add(fault.target)

    def end(self, fault: Fault) -> None:
        """Restore the link, or start the component again."""
        if fault.action == CUT:
            self.net.restore(self.net.host(int(fault.target.removeprefix("host"))))
        else:
            self.restart(fault.target)

    def restart(self, component: str) -> None:
        """Start a dead component again over its data and wait until it is ready; the log of
        its previous life is kept beside the new one."""
        self.killed.discard(component)
        self.restarts += 1
        if component == "etcd":
            log = self.run_dir / "etcd" / "etcd.log"
            log.rename(log.with_name(f"etcd.{self.restarts}.log"))
            self.etcd = self.net.start_etcd(self.run_dir / "etcd")
            return
        if component.startswith("node-host"):
            old = self.agents[component.removeprefix("node-")]
        else:
            old = self.services[component]
        old.log.rename(old.log.with_name(f"{old.name}.{self.restarts}.log"))
        if component.startswith("node-host"):
            new = self._start_agent(int(component.removeprefix("node-host")))
        else:
            new = self._start_service(component)
        new.wait_ready(READY_TIMEOUT)

    def _process(self, component: str) -> subprocess.Popen:
        if component == "etcd":
            assert self.etcd is not None
            return self.etcd
        if component.startswith("node-"):
            return self.agents[component.removeprefix("node-")].proc
        return self.services[component].proc

    def crashed(self) -> list[str]:
        """Components that died without being killed by the schedule."""
        names = ["etcd", *self.services, *(f"node-{h}" for h in self.agents)]
        return [
            f"{name} exited with {self._process(name).returncode}"
            for name in names
            if name not in self.killed and self._process(name).poll() is not None
        ]

    # -- clients (inside the control namespace) -----------------------------------------

    def argv(self, module: str, mode: str, *extra: str) -> list[str]:
        clusters = [f"--cluster={address}" for address in self.clusters]
        return [
            *self.net.exec_argv(self.net.ctl),
            sys.executable,
            "-m",
            f"tests.chaos.{module}",
            mode,
            f"--registry={self.registry}",
            f"--image={self.image}",
            f"--builder={self.builder}",
            f"--etcd={self.net.etcd}",
            f"--prefix={self.prefix}",
            *clusters,
            *extra,
        ]

    def client(self, module: str, mode: str, *extra: str, timeout: float = 180) -> object:
        done = subprocess.run(
            self.argv(module, mode, *extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{module} {mode} failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        return json.loads(done.stdout.splitlines()[-1])

    def background(self, module: str, mode: str, *extra: str, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(
                self.argv(module, mode, *extra), stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )
