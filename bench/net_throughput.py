"""TCP throughput container to container across two hosts, through berth's overlay, against
host to host over the same link (issue 16; goal: a ratio of at least 0.8).

The multi-host harness of the integration tests (tests/integration/hosts.py: network
namespaces linked by veths to one bridge, etcd, registry and cluster in a control namespace,
node agents in host1 and host2). The peer is `iperf3 -c` in host2's namespace against
`iperf3 -s` in host1's, over the hosts' own addresses; berth's is the same from a container on
host2 to one on host1 on a berth network (bridge, vxlan, the link, vxlan, bridge). The image
holds busybox and Debian's iperf3 with its libraries, copied from this host. Rounds alternate
between the two so both see the same machine; the medians are compared.

    .venv/bin/python -m bench.net_throughput [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

from berthd.common.security.ca import CA_CERT, CA_KEY, CertificateAuthority
from tests.integration.hosts import HostService, TestNetwork, force_remove_containers

IMAGE = "bench/iperf3:1"
PORT = 5201

PUSH = """
import json, pathlib, sys, tempfile
from berth.client import RegistryClient
from tests.integration.images import busybox_layer, push_image

with RegistryClient(sys.argv[1]) as client, tempfile.TemporaryDirectory() as tmp:
    repository, tag = sys.argv[2].split(":")
    layers = [busybox_layer(), pathlib.Path(sys.argv[3]).read_bytes()]
    print(json.dumps(push_image(client, repository, tag, layers, pathlib.Path(tmp))))
"""

CLIENT = """
import json, sys, time
from berth.client import ContainerConfig, Placement
from berth.client.cluster import ClusterClient
from berth.client.networks import NetworkClient

cluster = ClusterClient(sys.argv[1])
networks = NetworkClient(sys.argv[1])
IMAGE = sys.argv[2]

def running(name, command, node):
    c = cluster.run(ContainerConfig(IMAGE, name=name, command=command, network_mode="bench"),
                    Placement(constraints=[f"node.id=={node}"]))
    deadline = time.monotonic() + 60
    while not (info := cluster.inspect(c.id)).network or info.state != "running":
        assert time.monotonic() < deadline, f"{name} is {info.state}: {info.error}"
        time.sleep(0.1)
    return info.network["ip_address"]
"""

SETUP = """
networks.create("bench")
server = running("iperf-server", ["iperf3", "-s", "-p", sys.argv[3]], "host1")
running("iperf-client", ["sleep", "3600"], "host2")
print(json.dumps(server))
"""

ROUND = """
r = cluster.exec("iperf-client", ["iperf3", "-c", sys.argv[3], "-p", sys.argv[4], "-t",
                                  sys.argv[5], "-J"])
assert r.exit_code == 0, r.stdout.decode() + r.stderr.decode()
print(json.dumps(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]))
"""

TEARDOWN = """
for name in ("iperf-client", "iperf-server"):
    cluster.remove(name, force=True)
networks.remove("bench")
print(json.dumps(True))
"""


def iperf_layer() -> bytes:
    """A tar of /usr/bin/iperf3 and the libraries `ldd` names, at their paths."""
    binary = shutil.which("iperf3")
    if binary is None:
        raise SystemExit("iperf3 is not installed (make deps)")
    listed = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    paths = [binary]
    for line in listed.stdout.splitlines():
        fields = line.split()
        path = fields[2] if "=>" in fields else fields[0]
        if path.startswith("/"):
            paths.append(path)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("usr", "usr/bin", "lib", "lib/x86_64-linux-gnu", "lib64"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path in paths:
            # The file itself under the name the loader looks for (not the symlink).
            tar.add(os.path.realpath(path), arcname=path.lstrip("/"))
        # busybox's PATH is /bin: a link to iperf3 there.
        link = tarfile.TarInfo("bin/iperf3")
        link.type, link.linkname = tarfile.SYMTYPE, "/usr/bin/iperf3"
        tar.addfile(link)
    return out.getvalue()


def host_round(net: TestNetwork, seconds: int) -> float:
    """One host-to-host run: host2's namespace to host1's address."""
    done = subprocess.run(
        [
            *net.exec_argv(net.host(2)),
            *("iperf3", "-c", net.address(net.host(1)), "-p", str(PORT), "-t", str(seconds)),
            "-J",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"])


def credentials(directory: Path) -> None:
    """A CA for the run, in the environment the harness's processes inherit (as the tests'
    conftest.cluster_ca), and an admin certificate for the clients."""
    ca = CertificateAuthority.create("berth bench CA")
    ca.save(directory)
    ca.issue("user:admin", []).write(directory / "client.crt", directory / "client.key")
    os.environ.update(
        BERTH_TLS_CA=str(directory / CA_CERT),
        BERTH_TLS_CA_KEY=str(directory / CA_KEY),
        BERTH_TLS_CERT=str(directory / "client.crt"),
        BERTH_TLS_KEY=str(directory / "client.key"),
        BERTH_AUTH_FILE=str(directory / "auth.json"),
    )
    os.environ.pop("BERTH_TOKEN", None)


def measure(args: argparse.Namespace, run_dir: Path) -> tuple[list[float], list[float]]:
    (run_dir / "tls").mkdir()
    credentials(run_dir / "tls")
    net = TestNetwork(run_dir)
    prefix = f"/berth-bench-net-{uuid.uuid4().hex[:8]}/"
    agents: dict[str, HostService] = {}
    try:
        registry = net.start_control(2, prefix)
        cluster = net.start_service(net.ctl, "cluster", prefix=prefix)
        registry.wait_ready()
        agents.update(net.start_agents(registry.address, prefix, 3))
        cluster.wait_ready()
        for agent in agents.values():
            agent.wait_ready()
        layer = run_dir / "iperf3.tar"
        layer.write_bytes(iperf_layer())
        net.python_json(net.ctl, PUSH, registry.address, IMAGE, str(layer), timeout=120)

        def client(body: str, *extra: str, timeout: float = 120) -> object:
            return net.python_json(
                net.ctl, CLIENT + body, cluster.address, IMAGE, *extra, timeout=timeout
            )

        server = str(client(SETUP, str(PORT)))
        peer = net.spawn(
            net.host(1),
            ["iperf3", "-s", "-B", net.address(net.host(1)), "-p", str(PORT)],
            run_dir / "iperf3-host.log",
        )
        hosts, containers = [], []
        try:
            for _ in range(args.rounds):
                hosts.append(host_round(net, args.seconds))
                bits = client(ROUND, server, str(PORT), str(args.seconds))
                containers.append(float(bits))  # type: ignore[arg-type]
        finally:
            peer.terminate()
            peer.wait(timeout=10)
            client(TEARDOWN)
        return hosts, containers
    finally:
        for node_id, agent in agents.items():
            agent.stop()
            force_remove_containers(run_dir / node_id)  # left by a failed round, if any
        net.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each (alternating)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="berth-bench-net-") as tmp:
        hosts, containers = measure(args, Path(tmp))
    host, container = statistics.median(hosts), statistics.median(containers)
    print(f"{'TCP throughput, host2 -> host1 (median)':44}{'Gbit/s':>10}")
    print(f"{'host to host (iperf3 in the namespaces)':44}{host / 1e9:>10.2f}")
    print(f"{'container to container (berth overlay)':44}{container / 1e9:>10.2f}")
    print(f"{'ratio (goal >= 0.8)':44}{container / host:>10.2f}")
    print(f"rounds: {args.rounds} x {args.seconds} s each, alternating")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
