"""`berthd up / status / down / kill-node` and the CLI finding the cluster with no flags."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from berth.client import ClusterClient, ContainerConfig, NodeClient, Placement, RegistryClient
from berth.cluster.v1 import cluster_pb2, cluster_pb2_grpc
from berth.tls import PLAINTEXT_ENV, secure_channel
from berthd import localcluster
from berthd.node.network import table_name
from berthd.node.watchdog import watchdog_pid

from .images import busybox_layer, push_image

BERTHD = [sys.executable, "-m", "berthd.main"]
BERTH = [sys.executable, "-m", "berth"]


def free_base_port(nodes: int = 1) -> int:
    """A base port whose whole block (base .. base+15, and the extra agents' ports from
    base+40) is free right now."""
    wanted = [*range(16), *range(40, 40 + 2 * (nodes - 1))]
    for _ in range(50):
        base = random.randrange(40000, 60000, 100)
        try:
            for port in (base + offset for offset in wanted):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


def run(
    argv: list[str], env: dict[str, str], *, own_tls: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run argv with env added; with own_tls, without the session CA's BERTH_TLS_* variables,
    so `berthd up` makes a CA of its own and clients find everything in the state directory."""
    base = {k: v for k, v in os.environ.items() if not (own_tls and k.startswith("BERTH_TLS_"))}
    return subprocess.run(argv, capture_output=True, text=True, env={**base, **env})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_up_status_down(tmp_path: Path) -> None:
    """With no TLS settings at all: `up` makes the CA and every certificate, and the CLI and
    `status` find them in the state directory."""
    state = tmp_path / "state"
    env = {"BERTH_STATE_DIR": str(state)}
    base = free_base_port()
    started = run([*BERTHD, "up", "--base-port", str(base)], env, own_tls=True)
    try:
        assert started.returncode == 0, started.stderr
        assert f"export BERTH_REGISTRY=127.0.0.1:{base + 10}" in started.stdout
        cluster = json.loads((state / "cluster.json").read_text())
        pids = [cluster["etcd"]["pid"]] + [s["pid"] for s in cluster["services"].values()]
        assert sorted(cluster["services"]) == ["builder", "cluster", "image", "node", "registry"]
        assert f"export BERTH_IMAGE=127.0.0.1:{base + 16}" in started.stdout
        assert f"export BERTH_BUILDER=127.0.0.1:{base + 18}" in started.stdout
        assert all(alive(pid) for pid in pids)

        tls = state / "tls"
        made = {"ca", "client", "etcd", "registry", "node-1", "cluster", "image", "builder"}
        assert {p.stem for p in tls.iterdir()} == made | {"secrets"}
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tls.iterdir())
        assert len((tls / "secrets.key").read_bytes()) == 32
        # The cluster got the key: secrets can be made with no flag.
        value = tmp_path / "value"
        value.write_text("s3cret")
        created = run([*BERTH, "secret", "create", "pw", str(value)], env, own_tls=True)
        assert created.returncode == 0 and len(created.stdout.strip()) == 25, created.stderr
        session_ca = Path(os.environ["BERTH_TLS_CA"]).read_bytes()
        assert (tls / "ca.crt").read_bytes() != session_ca  # a CA of its own

        status = run([*BERTHD, "status"], env, own_tls=True)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == 6  # etcd and five services

        # The CLI finds the cluster, its CA and the admin certificate through the default
        # state directory alone.
        ls = [sys.executable, "-m", "berth", "registry", "ls", "--format", "json"]
        listed = run(ls, env, own_tls=True)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        # The registry's OCI HTTP API on its documented port, with the same (empty) catalog.
        http_url = cluster["services"]["registry"]["http_url"]
        assert http_url == f"http://127.0.0.1:{base + 5}"
        with urllib.request.urlopen(f"{http_url}/v2/_catalog", timeout=30) as reply:
            assert json.loads(reply.read()) == {"repositories": []}
        # --tls-ca overrides: another CA does not vouch for the cluster's certificates.
        wrong = run([ls[0], "-m", "berth", "--tls-ca", os.environ["BERTH_TLS_CA"], *ls[3:]], env)
        assert wrong.returncode == 1

        again = run([*BERTHD, "up", "--base-port", str(base)], env, own_tls=True)
        assert again.returncode == 0 and "already running" in again.stderr
    finally:
        stopped = run([*BERTHD, "down"], env, own_tls=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(pid) for pid in pids)
    assert not (state / "cluster.json").exists()
    assert run([*BERTHD, "status"], env, own_tls=True).returncode == 1


def test_ca_init(tmp_path: Path) -> None:
    made = run([*BERTHD, "ca", "init", "--state-dir", str(tmp_path)], {}, own_tls=True)
    assert made.returncode == 0, made.stderr
    assert "made a cluster CA" in made.stdout
    ca = (tmp_path / "tls" / "ca.crt").read_bytes()
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600
    kept = run([*BERTHD, "ca", "init", "--state-dir", str(tmp_path)], {}, own_tls=True)
    assert "kept the cluster CA" in kept.stdout
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == ca


def test_up_refuses_ports_in_use(tmp_path: Path) -> None:
    base = free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 10))
        taken.listen()
        result = run([*BERTHD, "up", "--base-port", str(base)], {"BERTH_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert f"port {base + 10} is already in use" in result.stderr
    assert not (tmp_path / "cluster.json").exists()


def nft_tables() -> list[str]:
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return listed.stdout.splitlines()


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(prefix)]


def test_up_three_nodes_and_kill_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"BERTH_STATE_DIR": str(state)}
    base = free_base_port(nodes=3)
    started = run([*BERTHD, "up", "--base-port", str(base), "--nodes", "3"], env)
    pids: list[int] = []
    try:
        assert started.returncode == 0, started.stderr
        cluster = json.loads((state / "cluster.json").read_text())
        nodes = cluster["nodes"]
        assert sorted(nodes) == ["node-1", "node-2", "node-3"]
        # The port plan: node-1 keeps the node service's ports, the others sit from base+40.
        assert [nodes[n]["address"] for n in sorted(nodes)] == [
            f"127.0.0.1:{base + 12}",
            f"127.0.0.1:{base + 40}",
            f"127.0.0.1:{base + 42}",
        ]
        assert cluster["services"]["node"]["address"] == nodes["node-1"]["address"]
        assert {n["data_dir"] for n in nodes.values()} == {
            str(state.resolve() / f"node-{k}") for k in (1, 2, 3)
        }
        pids = [cluster["etcd"]["pid"], *(s["pid"] for s in cluster["services"].values())]
        pids += [n["pid"] for n in nodes.values()]
        # Each agent's watchdog (berthd.node.watchdog), which outlives its agent by design.
        found = {name: watchdog_pid(Path(n["data_dir"])) for name, n in nodes.items()}
        watchdogs = {name: pid for name, pid in found.items() if pid}
        assert len(watchdogs) == 3, found
        pids += watchdogs.values()
        assert all(alive(pid) for pid in pids)

        status = run([*BERTHD, "status"], env)
        assert status.returncode == 0, status.stdout
        # etcd, registry, three agents, cluster, image, builder
        assert status.stdout.count("healthy") == 8

        # The cluster service sees three ready nodes, each labelled as its own host.
        with secure_channel(cluster["services"]["cluster"]["address"]) as channel:
            stub = cluster_pb2_grpc.ClusterServiceStub(channel)
            listed = stub.ListNodes(cluster_pb2.ListNodesRequest(), timeout=10).nodes
        assert {n.description.id: dict(n.description.labels) for n in listed} == {
            f"node-{k}": {"host": f"node-{k}"} for k in (1, 2, 3)
        }
        assert all(n.state == cluster_pb2.NODE_STATE_READY for n in listed)

        # A container on node-2, then the host dies: its agent, conmon and container go.
        with RegistryClient(cluster["services"]["registry"]["address"]) as registry:
            push_image(registry, "test/busybox", "1", [busybox_layer()], tmp_path)
        with NodeClient(nodes["node-2"]["address"]) as node:
            node.pull("test/busybox:1")
            container = node.run(ContainerConfig("test/busybox:1", command=["sleep", "600"]))
        data = Path(nodes["node-2"]["data_dir"]) / "containers" / container.id
        conmon = int((data / "conmon.pid").read_text())
        assert alive(container.pid) and alive(conmon)
        # A service replica there too: node-2's watchdog has something to guard, and would
        # outlive its agent but for kill-node; on a network, so node-2 has an nftables table.
        with ClusterClient(cluster["services"]["cluster"]["address"]) as client:
            template = ContainerConfig(
                "test/busybox:1", command=["sleep", "600"], network_mode="berth"
            )
            only_2 = Placement(constraints=["node.id==node-2"])
            client.create_service("web", template, replicas=1, placement=only_2)
            deadline = time.monotonic() + 60
            while not [c for c in client.service_ps("web") if c.state == "running"]:
                assert time.monotonic() < deadline, "web.1 not running within 60s"
                time.sleep(0.1)

        assert f"table inet {table_name('node-2')}" in nft_tables()
        killed = run([*BERTHD, "kill-node", "node-2"], env)
        assert killed.returncode == 0, killed.stderr
        assert "killed node-2" in killed.stdout
        # Its table goes with the host: the agents share this namespace, and a dead one's
        # routing mesh rules would stay in the living nodes' path.
        assert f"table inet {table_name('node-2')}" not in nft_tables()
        assert not alive(nodes["node-2"]["pid"])
        assert not alive(conmon) and not alive(container.pid)
        # A host death takes the agent's watchdog too: it cannot stop anything on a dead host.
        assert not alive(watchdogs["node-2"])
        others = [nodes["node-1"]["pid"], nodes["node-3"]["pid"], cluster["etcd"]["pid"]]
        others += [watchdogs["node-1"], watchdogs["node-3"]]
        assert all(alive(pid) for pid in others)

        status = run([*BERTHD, "status"], env)
        assert status.returncode == 1
        rows = [line for line in status.stdout.splitlines() if "node-" in line]
        assert [line.split()[2] for line in rows] == ["healthy", "UNHEALTHY", "healthy"]
        assert rows[1].endswith("UNHEALTHY (no answer: connection refused)"), rows
        assert mounts_under(data)  # the dead host's overlay is still there
    finally:
        stopped = run([*BERTHD, "down"], env)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(pid) for pid in pids)
    # `down` cleans up after the dead node too.
    assert mounts_under(state) == []


def test_start_stop_restart_one_component_keeps_cluster_json_true(tmp_path: Path) -> None:
    """Every component, etcd included, can be stopped, started and restarted by name; the new
    pid is recorded, so `down` stops what runs."""
    state = tmp_path / "state"
    env = {"BERTH_STATE_DIR": str(state)}
    base = free_base_port(nodes=2)
    started = run([*BERTHD, "up", "--base-port", str(base), "--nodes", "2"], env)
    seen: list[int] = []

    def recorded() -> dict:
        cluster = json.loads((state / "cluster.json").read_text())
        seen.extend([cluster["etcd"]["pid"], *(s["pid"] for s in cluster["services"].values())])
        seen.extend(n["pid"] for n in cluster["nodes"].values())
        return cluster

    def pid_of(cluster: dict, name: str) -> int:
        if name == "etcd":
            return cluster["etcd"]["pid"]
        return cluster["nodes"].get(name, cluster["services"].get(name, {})).get("pid", 0)

    try:
        assert started.returncode == 0, started.stderr
        before = recorded()
        for name in ("etcd", "registry", "cluster", "image", "builder", "node-1", "node-2"):
            old = pid_of(before, name)
            restarted = run([*BERTHD, "restart", name], env)
            assert restarted.returncode == 0, (name, restarted.stderr)
            after = recorded()
            new = pid_of(after, name)
            assert new != old and alive(new) and not alive(old), name
            assert f"restarted {name}" in restarted.stdout and f"pid {new}" in restarted.stdout
            before = after
        # services.node is node-1: it follows node-1's new pid.
        assert before["services"]["node"] == before["nodes"]["node-1"]

        stopped = run([*BERTHD, "stop", "registry"], env)
        assert stopped.returncode == 0, stopped.stderr
        assert not alive(pid_of(before, "registry"))
        status = run([*BERTHD, "status"], env)
        assert status.returncode == 1
        (registry_line,) = [line for line in status.stdout.splitlines() if "registry" in line]
        # STATUS, then why: "UNHEALTHY (no answer: connection refused)".
        assert "UNHEALTHY (no answer" in registry_line, registry_line
        again = run([*BERTHD, "stop", "registry"], env)
        assert again.returncode == 0 and "not running" in again.stderr
        back = run([*BERTHD, "start", "registry"], env)
        assert back.returncode == 0, back.stderr
        assert alive(pid_of(recorded(), "registry"))
        twice = run([*BERTHD, "start", "registry"], env)
        assert twice.returncode == 0 and "already running" in twice.stderr

        # `node` names node-1, as services.node does; etcd stops and starts like the others.
        for name in ("node", "etcd"):
            assert run([*BERTHD, "stop", name], env).returncode == 0
            assert run([*BERTHD, "start", name], env).returncode == 0
        after = recorded()
        assert alive(after["nodes"]["node-1"]["pid"]) and alive(after["etcd"]["pid"])
        # Services reconnect to the restarted etcd on their own (the guard only bounds it).
        deadline = time.monotonic() + 60
        while (status := run([*BERTHD, "status"], env)).returncode != 0:
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.5)

        unknown = run([*BERTHD, "restart", "node-9"], env)
        assert unknown.returncode != 0
        assert "no component 'node-9'" in unknown.stderr and "node-2" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    finally:
        stopped = run([*BERTHD, "down"], env)
    assert stopped.returncode == 0, stopped.stderr
    assert seen and not any(alive(pid) for pid in set(seen))


def test_the_local_etcd_compacts_its_history_and_has_a_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd as `berthd up` runs it (its recorded command line) takes the maintenance flags:
    periodic compaction of history older than 5 minutes and a 2 GiB backend quota, as its own
    metrics and log say."""
    monkeypatch.setenv(PLAINTEXT_ENV, "1")  # plaintext: /metrics without a client certificate
    base = free_base_port()
    entry = localcluster.etcd_entry(tmp_path, localcluster.Ports(base))
    (tmp_path / "logs").mkdir()
    started = localcluster._respawn_etcd(entry)
    try:
        with urllib.request.urlopen(f"http://{entry['endpoint']}/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        assert "etcd_server_quota_backend_bytes 2.147483648e+09" in metrics
        log = Path(str(entry["log"])).read_text()
        assert '"auto-compaction-mode":"periodic"' in log
        assert '"auto-compaction-retention":"5m0s"' in log
    finally:
        localcluster.stop_process(int(started["pid"]), str(entry["marker"]))
