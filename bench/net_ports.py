"""Requests per second through a published port against the container's own address (issue 16).

One `berthd up --nodes 1` cluster; one busybox httpd container on the network `berth`, run
with `-p PORT:8080`. `wrk` (Debian's) on the host asks for the same small page, in alternating
rounds, at the container's address (its bridge, no NAT: the peer) and at the published port on
the bridge's gateway address (a local address of the host: DNAT in berth's table, then the same
bridge). The ratio is published / direct; conntrack and the DNAT are all that differ.

    .venv/bin/python -m bench.net_ports [--rounds 5] [--seconds 5] [--connections 16] [--port 18080]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.cluster import IMAGE, Cluster, local_cluster, reported
from berth.client import ClusterClient, ContainerConfig
from berth.ports import PortBinding
from berthd.node.ports import LOCALNET

PAGE = "mkdir -p /www && echo hello > /www/index.html && httpd -f -p 8080 -h /www"


def wrk(url: str, seconds: int, connections: int) -> float:
    """Requests per second wrk measured at `url`."""
    done = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", url],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    # busybox httpd closes each connection (no keep-alive): a stray read error is its, not
    # a failure; a page that is not served is.
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if found is None or errors is not None:
        raise RuntimeError(f"wrk at {url}: {done.stdout.strip()}")
    return float(found.group(1))


def page(url: str) -> None:
    """Wait until `url` serves the page (httpd starts a moment after the container)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.read().strip() == b"hello":
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: {exc}") from None
        time.sleep(0.2)


def serve(cluster: Cluster, port: int) -> tuple[str, str]:
    """The web container; its address and its gateway (the host's side of the bridge)."""
    address = cluster.info["services"]["cluster"]["address"]
    with ClusterClient(address) as client:
        config = ContainerConfig(
            IMAGE,
            name="bench-web",
            command=["sh", "-c", PAGE],
            network_mode="berth",
            ports=[PortBinding(8080, port)],
        )
        container = client.run(config)
        deadline = time.monotonic() + 60
        while not (info := client.inspect(container.id)).published:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench-web did not start: {info.state} {info.error}")
            time.sleep(0.1)
    return info.network["ip_address"], info.network["gateway"]


def measure(args: argparse.Namespace) -> None:
    # The agent turns route_localnet on (127.0.0.1:PORT works); put it back as it was.
    localnet = LOCALNET.read_text()
    try:
        run(args)
    finally:
        LOCALNET.write_text(localnet)


def run(args: argparse.Namespace) -> None:
    with local_cluster("ports", 1) as cluster:
        address, gateway = serve(cluster, args.port)
        direct_url = f"http://{address}:8080/"
        published_url = f"http://{gateway}:{args.port}/"
        for url in (direct_url, published_url):
            page(url)
        direct, published = [], []
        for n in range(args.rounds):
            # Alternating, so a change of the machine's load weighs on both alike.
            direct.append(wrk(direct_url, args.seconds, args.connections))
            published.append(wrk(published_url, args.seconds, args.connections))
            print(f"  round {n + 1}: direct {direct[-1]:.0f} req/s,"
                  f" published {published[-1]:.0f} req/s", flush=True)  # fmt: skip
    d, p = statistics.median(direct), statistics.median(published)
    # The ratio of each round's pair, measured back to back, then their median: the shared
    # machine's load swings between rounds more than within one.
    ratio = statistics.median(b / a for a, b in zip(direct, published, strict=True))
    print(f"published port {p:.0f} req/s, container address {d:.0f} req/s (peer): "
          f"ratio {ratio:.2f} (median of {args.rounds} rounds' ratios, {args.seconds}s each, "
          f"{args.connections} connections)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(
            "net_ports needs wrk (apt-get install wrk; `make bench` installs it)", file=sys.stderr
        )
        return 1
    print("Requests per second through a published port (busybox httpd, wrk)")
    return reported("net_ports", lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
