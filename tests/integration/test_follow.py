"""Services that follow a tag, in the two-host harness of test_networks: a push that moves
`app:prod` rolls every replica of a 3-replica service published on the mesh to the new digest
(start-first, one slot at a time) while a client loops on the published port and sees no
failed request, with the follow event first; then a stop-first update by hand drops none
either (the drain takes each replica out of the mesh before it stops); a semver range picks
1.4.3 over 1.4.2 and ignores 1.5.0, then moves to a newer 1.4 and not to a newer 1.5.
Real registry, cluster and node agents."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest

from . import test_networks
from .test_networks import Net, leftovers

network_cluster = test_networks.network_cluster

pytestmark = pytest.mark.integration

# An image whose own CMD serves a page naming its version on port 8080.
PUSH = """
import json, pathlib, sys, tempfile
from berth.client import RegistryClient
from tests.integration.images import busybox_layer, push_image

address, repository = sys.argv[1], sys.argv[2]
digests = {}
with RegistryClient(address) as client, tempfile.TemporaryDirectory() as tmp:
    for tag in sys.argv[3:]:
        version = tag.split("=")[-1]
        cmd = ["sh", "-c", f"mkdir -p /www && echo {version} > /www/index.html && "
               "exec httpd -f -p 8080 -h /www"]
        digests[tag.split("=")[0]] = push_image(
            client, repository, tag.split("=")[0], [busybox_layer()], pathlib.Path(tmp), cmd=cmd)
print(json.dumps(digests))
"""

# Requests through the mesh until the stop file exists; the tally as JSON in the out file.
LOOP = """
import json, os, socket, sys, time
host, port, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tally = {"ok": 0, "failed": 0, "pages": {}, "errors": []}
while not os.path.exists(stop):
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        head, _, body = data.decode().partition("\\r\\n\\r\\n")
        if not head.startswith("HTTP/1.") or " 200 " not in head.split("\\r\\n")[0]:
            raise OSError(head.split("\\r\\n")[0] or "empty answer")
        page = body.strip()
        tally["ok"] += 1
        tally["pages"][page] = tally["pages"].get(page, 0) + 1
    except OSError as exc:
        tally["failed"] += 1
        tally["errors"].append(f"{time.time():.3f} {type(exc).__name__}: {exc}"[:200])
    time.sleep(0.02)
with open(out, "w") as f:
    json.dump(tally, f)
"""

STATE = """
service = cluster.service(sys.argv[3])
active = cluster.service_ps(sys.argv[3])
replicas = [c for c in active if c.state == "running"]
slots = {}
for c in active:
    slots[c.slot] = slots.get(c.slot, 0) + 1
out({"image": service.image, "follow": service.follow, "followed": service.followed,
     "version": service.version, "state": service.update_state,
     "replicas": sorted(c.image for c in replicas), "doubled": sum(n > 1 for n in slots.values())})
"""


def push(net: Net, repository: str, *tags: str) -> dict[str, str]:
    """Push `tag=version` images (the page says `version`); their digests by tag."""
    found = net.net.python_json(net.net.ctl, PUSH, net.registry, repository, *tags, timeout=60)
    assert isinstance(found, dict)
    return found


def state(net: Net, service: str) -> dict:
    found = net.client(STATE, service)
    assert isinstance(found, dict)
    return found


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def cli_argv(net: Net, *argv: str) -> list[str]:
    code = "import sys; from berth.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "--host", net.cluster.address, *argv]


def test_a_push_that_moves_a_followed_tag_rolls_every_replica(network_cluster: Net) -> None:
    net = network_cluster
    first = push(net, "app", "prod=v1")["prod"]
    made = net.cli(
        "service", "create", "--name", "web", "--replicas", "3", "-p", "8090:8080",
        "--update-order", "start-first", "--update-monitor", "2s", "--follow", "--", "app:prod",
    )  # fmt: skip
    events_log = net.run_dir / "follow-events.log"
    stop, tally_file = net.run_dir / "follow-stop", net.run_dir / "follow-tally.json"
    events = loop = None
    try:
        assert made.returncode == 0, made.stderr
        # The record keeps the digest, and what it follows.
        created = state(net, "web")
        assert (created["image"], created["follow"], created["followed"]) == (
            f"app@{first}",
            "tag",
            "app:prod",
        )
        wait_for(lambda: len(state(net, "web")["replicas"]) == 3, 90, "3 running replicas")
        mesh = net.net.address(net.net.host(1))
        wait_for(lambda: _page_once(net, mesh) == "v1", 30, "the mesh to serve v1")

        events = net.net.spawn(
            net.net.ctl, cli_argv(net, "events", "--filter", "service=web"), events_log
        )
        loop = net.net.spawn(
            net.net.ctl,
            [sys.executable, "-c", LOOP, mesh, "8090", str(stop), str(tally_file)],
            net.run_dir / "follow-loop.log",
        )
        time.sleep(1)
        second = push(net, "app", "prod=v2")["prod"]
        assert second != first

        doubled: list[int] = []

        def rolled(image: str) -> bool:
            now = state(net, "web")
            doubled.append(now["doubled"])
            return (
                now["image"] == image
                and now["state"] == "completed"
                and now["replicas"] == [image] * 3
            )

        wait_for(lambda: rolled(f"app@{second}"), 120, "every replica on the new digest")
        wait_for(lambda: _page_once(net, mesh) == "v2", 30, "the mesh to serve v2")
        # Start-first: a slot held its old and new replica at once, one slot at a time
        # (parallelism 1).
        assert max(doubled) == 1, doubled
        time.sleep(1)
        # Stop-first by hand, back to v1: no slot doubles, and the drain drops no request.
        doubled.clear()
        back = net.cli(
            "service", "update", "--no-follow", "--update-order", "stop-first",
            "--image", f"app@{first}", "web",
        )  # fmt: skip
        assert back.returncode == 0, back.stderr
        wait_for(lambda: rolled(f"app@{first}"), 120, "every replica back on v1")
        wait_for(lambda: _page_once(net, mesh) == "v1", 30, "the mesh to serve v1")
        assert max(doubled) == 0, doubled
        time.sleep(1)
    finally:
        stop.touch()
        if loop is not None:
            loop.wait(30)
        if events is not None:
            events.terminate()
            events.wait(10)
        net.cli("service", "rm", "web")
        # The mesh's device and table go with the last replica (the harness checks).
        wait_for(lambda: not any(leftovers(net).values()), 60, "the mesh to be gone")
    lines = events_log.read_text().splitlines()
    follow = [i for i, line in enumerate(lines) if " service follow: " in line]
    assert follow, lines
    assert f"service follow: web app:prod -> {second}" in lines[follow[0]]
    assert "(actor=service:cluster" in lines[follow[0]]
    # The rollout's own events follow the follow event.
    assert any(" service update " in line for line in lines[follow[0] + 1 :]), lines
    tally = json.loads(tally_file.read_text())
    assert tally["pages"].get("v1") and tally["pages"].get("v2"), tally
    print(f"requests during the rollouts: {tally['ok']} ok, {tally['failed']} failed")
    assert tally["failed"] == 0, tally["errors"]


def _page_once(net: Net, mesh: str) -> str:
    code = LOOP.replace("while not os.path.exists(stop):", "for _ in [1]:")
    out = net.run_dir / "follow-once.json"
    net.net.python_in(net.net.ctl, code, mesh, "8090", "unused", str(out))
    tally = json.loads(out.read_text())
    return next(iter(tally["pages"]), "")


def test_a_semver_range_picks_the_highest_matching_tag_and_follows_it(network_cluster: Net) -> None:
    net = network_cluster
    digests = push(net, "lib", "1.4.2=a", "1.4.3=b", "1.5.0=c", "1.4.9-rc.1=d", "latest=e")
    bad = net.cli("service", "create", "--name", "lib", "--follow", "semver:~1.x", "lib")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith('Error: invalid semver range "~1.x": "~1.x" is not')
    none = net.cli("service", "create", "--name", "lib", "--follow", "semver:^3", "lib")
    assert none.returncode == 1
    assert "cannot follow lib semver:^3: none of its 5 tags" in none.stderr
    made = net.cli("service", "create", "--name", "lib", "--follow", "semver:~1.4",
                   "lib", "sleep", "600")  # fmt: skip
    try:
        assert made.returncode == 0, made.stderr
        created = state(net, "lib")
        assert (created["image"], created["follow"], created["followed"]) == (
            f"lib@{digests['1.4.3']}",
            "semver:~1.4",
            "lib:1.4.3",
        )
        newer = push(net, "lib", "1.5.1=f", "1.4.4=g")
        wait_for(lambda: state(net, "lib")["image"] == f"lib@{newer['1.4.4']}", 30, "1.4.4")
        moved = state(net, "lib")
        assert (moved["followed"], moved["version"]) == ("lib:1.4.4", created["version"] + 1)
        # An update of something else keeps following (and the pinned digest).
        assert net.cli("service", "update", "--env", "A=1", "lib").returncode == 0
        assert state(net, "lib")["image"] == f"lib@{newer['1.4.4']}"
        assert net.cli("service", "update", "--no-follow", "lib").returncode == 0
        push(net, "lib", "1.4.5=h")
        time.sleep(2)
        stopped = state(net, "lib")
        assert (stopped["image"], stopped["follow"]) == (f"lib@{newer['1.4.4']}", "")
    finally:
        net.cli("service", "rm", "lib")
        wait_for(lambda: not any(leftovers(net).values()), 60, "the replicas to be gone")
