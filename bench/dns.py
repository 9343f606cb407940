"""The node's resolver (berthd.node.dns) against aardvark-dns, podman's, answering the same
names: queries per second over UDP from one client, one query at a time.

Both servers run as their own processes on loopback addresses of this host's loopback (berth's
on 127.0.0.2, aardvark-dns on 127.0.0.3, one free port), with one network of --containers
containers, one of them named `web` and --replicas of a service `api` (aardvark-dns: one
container per replica, each with the alias `api`). Rounds alternate between the two; a round
asks one name --queries times. Printed: each server's rate per name, and berth's over
aardvark's.

    .venv/bin/python -m bench.dns [--containers 50] [--replicas 4] [--queries 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query

AARDVARK = "/usr/lib/podman/aardvark-dns"
NETWORK_ID = "be" * 32
BERTH_ADDRESS, AARDVARK_ADDRESS = "127.0.0.2", "127.0.0.3"

# berth's resolver alone: the same Listener and table the agent runs, filled directly.
BERTH_SERVER = """
import asyncio, sys
from berthd.common.state.networks import EndpointRecord, endpoint_id
from berthd.node.dns import Bridge, Listener, NameTable, Resolver

address, port, network, containers, replicas = sys.argv[1], int(sys.argv[2]), sys.argv[3], \\
    int(sys.argv[4]), int(sys.argv[5])

async def main():
    table = NameTable()
    for n in range(containers):
        name = "web" if n == 0 else f"c{n}"
        table.put(endpoint_id(network, f"{n:064x}"),
                  EndpointRecord(name, f"10.89.1.{n + 2}", "n1"))
    for n in range(replicas):
        table.put(endpoint_id(network, f"{n + 1000:064x}"),
                  EndpointRecord(f"api.{n + 1}", f"10.89.2.{n + 2}", "n1", [], "api"))
    listener = Listener(Resolver(table, []), Bridge(network, address, False))
    await listener.open(port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def berth_server(port: int, containers: int, replicas: int) -> Iterator[None]:
    argv = [sys.executable, "-c", BERTH_SERVER, BERTH_ADDRESS, str(port), NETWORK_ID]
    proc = subprocess.Popen(
        [*argv, str(containers), str(replicas)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def aardvark_server(port: int, containers: int, replicas: int) -> Iterator[None]:
    """aardvark-dns 1.4 over a config directory as netavark writes it: the network's file,
    its gateway on the first line, then `<id> <ipv4> <ipv6> <names>` per container."""
    config = Path(tempfile.mkdtemp(prefix="bench-aardvark-"))
    lines = [AARDVARK_ADDRESS]
    for n in range(containers):
        name = "web" if n == 0 else f"c{n}"
        lines.append(f"{n:064x} 10.89.1.{n + 2}  {name}")
    for n in range(replicas):
        lines.append(f"{n + 1000:064x} 10.89.2.{n + 2}  api.{n + 1},api")
    (config / "bench").write_text("\n".join(lines) + "\n")
    # It daemonizes and writes the daemon's pid into the config directory.
    subprocess.run(
        [AARDVARK, "--config", str(config), "-p", str(port), "run"],
        check=True,
        capture_output=True,
    )
    pid_file = config / "aardvark.pid"
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "aardvark-dns wrote no pid file"
            time.sleep(0.05)
        wait_answering(AARDVARK_ADDRESS, port)
        yield
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        shutil.rmtree(config, ignore_errors=True)


def wait_answering(address: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            dns.query.udp(dns.message.make_query("web", "A"), address, timeout=0.5, port=port)
            return
        except dns.exception.Timeout:
            assert time.monotonic() < deadline, f"no DNS answer from {address}:{port}"


def rate(address: str, port: int, name: str, queries: int, expect: int) -> float:
    """Queries per second for `name`, each answer checked to hold `expect` addresses."""
    query = dns.message.make_query(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        began = time.perf_counter()
        for _ in range(queries):
            reply = dns.query.udp(query, address, timeout=2, port=port, sock=sock)
            assert sum(len(r) for r in reply.answer) == expect, reply
        return queries / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not Path(AARDVARK).exists():
        print(f"bench.dns: {AARDVARK} is missing (Debian's aardvark-dns; make bench-apt)")
        return 1
    port = free_port()
    names = {"web": 1, "api": args.replicas}
    best: dict[tuple[str, str], float] = {}
    with (
        berth_server(port, args.containers, args.replicas),
        aardvark_server(port, args.containers, args.replicas),
    ):
        wait_answering(BERTH_ADDRESS, port)
        for round_ in range(args.rounds):
            servers = [("berth", BERTH_ADDRESS), ("aardvark-dns", AARDVARK_ADDRESS)]
            for server, address in servers if round_ % 2 == 0 else servers[::-1]:
                for name, expect in names.items():
                    got = rate(address, port, name, args.queries, expect)
                    best[server, name] = max(best.get((server, name), 0.0), got)
    print(f"DNS answers over UDP, one at a time, best of {args.rounds} rounds")
    print(f"{'name':<10}{'berth q/s':>12}{'aardvark q/s':>14}{'ratio':>8}")
    for name in names:
        ours, peer = best["berth", name], best["aardvark-dns", name]
        print(f"{name:<10}{ours:>12.0f}{peer:>14.0f}{ours / peer:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
