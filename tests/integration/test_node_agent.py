"""The node agent for real: registry pulls, overlayfs, conmon + runc, etcd, restarts."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import os
import re
import signal
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from isal import igzip

from berth.client import ContainerConfig, NodeClient, RegistryClient
from berth.containers import InvalidContainerConfig
from berth.errors import BerthClientError
from berthd.common.store import Store
from berthd.node.containers import restart_delay

from .images import busybox_layer, push_image, tar_of


def run(node: NodeClient, image: str, *command: str, **options) -> str:
    """`docker run -d`: returns the container id."""
    return node.run(ContainerConfig(image, command=list(command), **options)).id


def logs(node: NodeClient, container: str) -> str:
    return b"".join(line.data for line in node.logs(container)).decode()


def eventually(check, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


def test_pull_reports_docker_states_and_downloads_a_layer_once(node, busybox) -> None:
    events = []
    image = node.pull(busybox, events.append)
    states = [e.state for e in events]
    assert "Downloading" in states and states[-1] == "Pull complete"
    assert image.references == [busybox] and len(image.chain_ids) == 1
    again = []
    node.pull(busybox, again.append)
    assert [e.state for e in again] == ["Already exists"]
    assert [i.digest for i in node.images()] == [image.digest]


def test_echo_logs_and_exit_codes(node, busybox) -> None:
    node.pull(busybox)
    hello = run(node, busybox, "sh", "-c", "echo hello; echo oops >&2")
    assert node.wait(hello) == 0
    lines = list(node.logs(hello))
    assert [(line.stream, line.data) for line in lines] == [
        ("stdout", b"hello\n"),
        ("stderr", b"oops\n"),
    ]
    failing = run(node, busybox, "sh", "-c", "exit 3")
    assert node.wait(failing) == 3
    info = node.inspect(failing)
    assert info.state == "exited" and info.exit_code == 3 and info.finished_at is not None


def test_memory_limit_kills_a_greedy_process_and_says_oom(node, busybox) -> None:
    node.pull(busybox)
    greedy = run(
        node,
        busybox,
        "sh",
        "-c",
        "x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x=$x$x; done",
        memory_bytes=16 * 1024 * 1024,
    )
    assert node.wait(greedy) == 137
    assert node.inspect(greedy).oom_killed


def test_stop_sends_term_then_kill_after_the_timeout(node, busybox) -> None:
    node.pull(busybox)
    # PID 1 of a container ignores signals it has no handler for, as in Docker.
    loop = "echo ready; while true; do sleep 0.1; done"
    polite = run(node, busybox, "sh", "-c", f"trap 'exit 42' TERM; {loop}")
    stubborn = run(node, busybox, "sh", "-c", f"trap '' TERM; {loop}")
    for box in (polite, stubborn):
        eventually(lambda box=box: "ready" in logs(node, box), what="traps set")
    assert node.stop(polite, timeout=30).exit_code == 42  # its TERM handler ran
    assert node.stop(stubborn, timeout=1).exit_code == 137  # ignored TERM, so KILL
    assert node.inspect(stubborn).state == "exited"


def test_exec_streams_stdin_and_returns_output_and_exit_code(node, busybox) -> None:
    node.pull(busybox)
    box = run(node, busybox, "sleep", "1000")
    result = node.exec(
        box, ["sh", "-c", "cat; echo out; echo err >&2; exit 5"], stdin=[b"from ", b"stdin\n"]
    )
    assert result.stdout == b"from stdin\nout\n"
    assert result.stderr == b"err\n"
    assert result.exit_code == 5
    with pytest.raises(BerthClientError) as err:
        node.exec("no-such-container", ["true"])
    assert err.value.code == "NOT_FOUND"


def test_exec_failures_are_exit_codes_or_statuses_with_one_clear_line(node, busybox) -> None:
    """Docker's codes for a process that cannot start (127 not found, 126 not executable) with
    one line on stderr; bad input is INVALID_ARGUMENT before runc runs; never runc's JSON."""
    node.pull(busybox)
    box = run(node, busybox, "sh", "-c", "echo x > /not-executable; sleep 1000")
    eventually(lambda: node.exec(box, ["test", "-f", "/not-executable"]).exit_code == 0)
    missing = node.exec(box, ["no-such-command"])
    assert missing.exit_code == 127
    assert missing.stdout == b""
    assert missing.stderr.count(b"\n") == 1 and b"{" not in missing.stderr, missing.stderr
    assert b"no-such-command" in missing.stderr and b"not found" in missing.stderr
    absolute = node.exec(box, ["/no/such/file"])
    assert absolute.exit_code == 127 and b"/no/such/file" in absolute.stderr, absolute.stderr
    denied = node.exec(box, ["/not-executable"])
    assert denied.exit_code == 126
    assert denied.stderr.count(b"\n") == 1 and b"permission denied" in denied.stderr.lower()
    for command, env, cwd, field in (
        (["true"], ["A=b\0c"], "", "env"),
        (["tr\0ue"], [], "", "command"),
        (["true"], [], "relative/dir", "working_dir"),
    ):
        with pytest.raises(BerthClientError) as err:
            node.exec(box, command, env=env, working_dir=cwd)
        assert err.value.code == "INVALID_ARGUMENT", (field, err.value)
        assert "{" not in str(err.value) and field.replace("_", " ") in str(err.value), err.value
    # A working directory that is no directory: runc's own words, in one line, as a status.
    with pytest.raises(BerthClientError) as err:
        node.exec(box, ["true"], working_dir="/etc/passwd")
    assert err.value.code == "FAILED_PRECONDITION", err.value
    assert "{" not in str(err.value) and "\n" not in str(err.value), err.value
    assert node.exec(box, ["true"], working_dir="/etc").exit_code == 0


def test_containers_share_the_unpacked_layer(node, busybox, node_agent) -> None:
    node.pull(busybox)
    first = run(node, busybox, "sleep", "1000")
    second = run(node, busybox, "sleep", "1000")
    inodes = {
        (node_agent.data_dir / "containers" / c / "rootfs" / "bin" / "busybox").stat().st_ino
        for c in (first, second)
    }
    layers = list((node_agent.data_dir / "layers").iterdir())
    assert len(layers) == 1
    assert inodes == {(layers[0] / "bin" / "busybox").stat().st_ino}
    stats = node.stats(first)
    assert stats["pids"] >= 1 and stats["memory_bytes"] > 0


def test_stats_without_stream_show_a_busy_container_busy_and_an_idle_one_idle(
    node, busybox
) -> None:
    # One sample (`berth stats --no-stream`) used to show 0.00 % for every container: its CPU
    # percent had no earlier reading to compare with.
    node.pull(busybox)
    busy = run(node, busybox, "sh", "-c", "yes > /dev/null")
    idle = run(node, busybox, "sleep", "1000")
    eventually(lambda: node.stats(busy)["pids"] >= 1, what="the busy loop running")
    # The host is shared (other work competes for its CPUs): "clearly busy" is a few percent.
    assert node.stats(busy)["cpu_percent"] > 2.0
    assert node.stats(idle)["cpu_percent"] < 1.0
    both = node.stats_many([busy, idle])
    assert [s["container_id"] for s in both] == [busy, idle]
    assert both[0]["cpu_percent"] > 2.0 and both[1]["cpu_percent"] < 1.0
    node.remove(busy, force=True)
    node.remove(idle, force=True)


def test_deleted_file_shows_in_changes_and_exported_layer_hides_it(
    node, busybox, client: RegistryClient, tmp_path: Path
) -> None:
    node.pull(busybox)
    box = run(node, busybox, "sh", "-c", "rm /etc/group; echo hi > /root/new; sleep 1000")
    eventually(lambda: ("A", "/root/new") in node.changes(box), what="changes")
    changes = node.changes(box)
    assert ("D", "/etc/group") in changes
    assert ("C", "/root") in changes

    digest, diff_id, _size = node.export_layer(box, "test/busybox")
    out = tmp_path / "layer.tar.gz"
    client.pull_blob("test/busybox", digest, out)
    raw = igzip.decompress(out.read_bytes())
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
    assert "etc/.wh.group" in names and "root/new" in names

    # The layer on top of the image makes a new image in which the file is gone.
    push_image(
        client,
        "test/derived",
        "1",
        [busybox_layer(), raw],
        tmp_path,
        cmd=["sh", "-c", "ls /etc; cat /root/new"],
    )
    node.pull("test/derived:1")
    derived = run(node, "test/derived:1")
    assert node.wait(derived) == 0
    output = logs(node, derived)
    assert "passwd" in output and "group" not in output and "hi" in output


def test_hostile_layer_is_rejected_and_nothing_lands_outside(
    node, client: RegistryClient, tmp_path: Path, node_agent
) -> None:
    sentinel = tmp_path / "escaped"
    evil = tar_of({f"../../../../../../..{sentinel}": b"pwned", "ok": b"fine"})
    push_image(client, "test/evil", "1", [evil], tmp_path)
    with pytest.raises(BerthClientError) as err:
        node.pull("test/evil:1")
    assert err.value.code == "INVALID_ARGUMENT"
    assert ".." in str(err.value)
    assert not sentinel.exists()
    assert node.images() == []
    assert [p for p in (node_agent.data_dir / "layers").iterdir()] == []


def test_restart_policy_on_failure_retries_then_gives_up(node, busybox) -> None:
    node.pull(busybox)
    flaky = run(
        node,
        busybox,
        "sh",
        "-c",
        "echo try; exit 1",
        restart_policy="on-failure",
        restart_max_retries=2,
    )
    info = eventually(
        lambda: (i := node.inspect(flaky)).state == "exited" and i.restart_count == 2 and i,
        what="two restarts",
    )
    assert info.exit_code == 1
    assert logs(node, flaky).count("try") == 3


def test_restart_backoff_doubles(node, busybox) -> None:
    """docs/node.md: restart backoff doubles from 100 ms. Read from the timestamps conmon
    wrote on each run's first line: run k+1 starts at least restart_delay(k) after run k."""
    node.pull(busybox)
    crashing = run(node, busybox, "sh", "-c", "echo start; exit 1", restart_policy="always")
    # Seven restarts for six gaps: the stop may kill the last run before its first line.
    eventually(lambda: node.inspect(crashing).restart_count >= 7, 60, "seven restarts")
    node.stop(crashing, timeout=0)
    starts = [line.time for line in node.logs(crashing) if line.data == b"start\n"]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert len(gaps) >= 6
    assert all(gap >= restart_delay(k) for k, gap in enumerate(gaps[:6])), gaps


def test_containers_outlive_the_agent_and_are_adopted(node_agent, busybox) -> None:
    with NodeClient(node_agent.address) as node:
        node.pull(busybox)
        box = run(
            node,
            busybox,
            "sh",
            "-c",
            "echo before; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo after; exit 4",
        )
        eventually(lambda: "before" in logs(node, box), what="first log line")
        pid = node.inspect(box).pid
    node_agent.process.proc.send_signal(signal.SIGKILL)
    node_agent.process.proc.wait()
    os.kill(pid, 0)  # still running with the agent gone

    node_agent.start()
    with NodeClient(node_agent.address) as node:
        info = node.inspect(box)
        assert info.state == "running" and info.pid == pid
        assert node.exec(box, ["touch", "/tmp/go"]).exit_code == 0
        assert node.wait(box) == 4
        assert logs(node, box) == "before\nafter\n"


def test_an_agent_starts_past_a_container_record_it_cannot_read(node_agent, busybox) -> None:
    """A record whose config no longer validates (written by hand, or by an agent with other
    rules) is skipped with a log line; the agent still starts and keeps the other containers."""
    with NodeClient(node_agent.address) as node:
        node.pull(busybox)
        box = run(node, busybox, "sleep", "60")
        bad = run(node, busybox, "true")
    node_agent.process.stop()
    record_file = node_agent.data_dir / "containers" / bad / "container.json"
    original = record_file.read_text()
    record = json.loads(original)
    record["config"]["memory_bytes"] = 1  # under Docker's 6 MB minimum: InvalidArgument
    record_file.write_text(json.dumps(record))
    try:
        node_agent.start()
        with NodeClient(node_agent.address) as node:
            assert node.inspect(box).state == "running"
            assert [c.id for c in node.list(all=True)] == [box]
        assert "skipping unreadable container record" in node_agent.process.log.read_text()
    finally:
        # Readable again, so the fixture's clean-up removes it (and unmounts its rootfs).
        node_agent.process.stop()
        record_file.write_text(original)


def test_exit_while_the_agent_is_down_is_not_lost(node_agent, busybox) -> None:
    with NodeClient(node_agent.address) as node:
        node.pull(busybox)
        box = run(node, busybox, "sh", "-c", "while [ ! -f /tmp/go ]; do sleep 0.1; done; exit 9")
        always = run(
            node, busybox, "sh", "-c", "echo run; sleep 0.3; exit 1", restart_policy="always"
        )
        eventually(lambda: node.inspect(box).state == "running", what="running")
        node.exec(box, ["touch", "/tmp/go"])  # it will exit while the agent is down
    node_agent.process.proc.send_signal(signal.SIGKILL)
    node_agent.process.proc.wait()
    # Its monitor (conmon) writes the exit code while nobody listens.
    exit_file = node_agent.data_dir / "containers" / box / "exit" / box
    eventually(lambda: exit_file.exists() and exit_file.read_text().strip(), what="the exit")
    node_agent.start()
    with NodeClient(node_agent.address) as node:
        info = eventually(lambda: (i := node.inspect(box)).state == "exited" and i, what="exit")
        assert info.exit_code == 9
        # The restart policy keeps working across the agent's restart.
        eventually(lambda: node.inspect(always).restart_count >= 3, what="restarts")


async def test_node_registers_in_etcd_and_vanishes_when_its_lease_lapses(
    node_agent, etcd_endpoint: str, etcd_prefix: str, busybox
) -> None:
    store = Store(etcd_endpoint, etcd_prefix)
    await store.connect()
    try:
        entry = await store.get(f"nodes/{node_agent.node_id}")
        assert entry is not None and entry.lease != 0
        info = entry.json()
        assert info["address"] == node_agent.address
        assert info["cpus"] >= 1 and info["memory_bytes"] > 0 and info["runtime_version"]

        with NodeClient(node_agent.address) as node:
            node.pull(busybox)
            box = run(node, busybox, "true")
            node.wait(box)
        # The agent publishes the exit to etcd after it settles the container (the wait's
        # answer does not wait for etcd): wait for the status, a guard only bounds a hang.
        deadline = time.monotonic() + 60
        while (status := (await store.get(f"containers/{box}/status")).json())["state"] != "exited":
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        assert status["node"] == node_agent.node_id

        # A frozen agent stops keeping its lease: its node key vanishes once the lease lapses
        # (the guard is far beyond the TTL: it only bounds a hang).
        node_agent.process.proc.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while await store.get(f"nodes/{node_agent.node_id}") is not None:
                assert time.monotonic() < deadline, "node key never went"
                await asyncio.sleep(0.2)
        finally:
            node_agent.process.proc.send_signal(signal.SIGCONT)
        # Thawed, it notices the lapsed lease and registers again; SIGTERM deregisters it.
        deadline = time.monotonic() + 60
        while await store.get(f"nodes/{node_agent.node_id}") is None:
            assert time.monotonic() < deadline, "node did not register again"
            await asyncio.sleep(0.2)
        assert node_agent.process.stop() == 0
        assert await store.get(f"nodes/{node_agent.node_id}") is None
    finally:
        await store.close()


def test_create_errors_are_clear(node, busybox) -> None:
    with pytest.raises(BerthClientError) as missing:
        node.run(ContainerConfig("test/not-pulled:1"))
    assert missing.value.code == "NOT_FOUND" and "pull" in str(missing.value)
    node.pull(busybox)
    run(node, busybox, "true", name="dup")
    with pytest.raises(BerthClientError) as dup:
        run(node, busybox, "true", name="dup")
    assert "already in use" in str(dup.value)
    bad_env = ContainerConfig(busybox, env=["NOEQUALS"])
    with pytest.raises(BerthClientError) as env:
        node.run(bad_env)  # the client does not check: this is the node's answer
    assert env.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidContainerConfig) as checked:
        bad_env.validate()
    assert env.value.message == checked.value.message  # the same words on both sides


def test_etc_files_and_spec_options_reach_the_process(node, busybox) -> None:
    node.pull(busybox)
    box = run(
        node,
        busybox,
        "sh",
        "-c",
        "hostname; cat /etc/hostname; id -u; pwd; echo $GREETING; "
        "[ -c /proc/timer_list ] && echo masked; touch /x 2>/dev/null || echo readonly",
        hostname="berthbox",
        user="65534",
        working_dir="/tmp",
        env=["GREETING=hi"],
        read_only_rootfs=True,
    )
    assert node.wait(box) == 0
    assert logs(node, box).split() == [
        "berthbox",
        "berthbox",
        "65534",
        "/tmp",
        "hi",
        "masked",
        "readonly",
    ]


def test_json_status_is_inspectable(node, busybox) -> None:
    node.pull(busybox)
    box = run(node, busybox, "sleep", "1000", labels={"app": "web"})
    listed = node.list(labels={"app": "web"})
    assert [c.id for c in listed] == [box]
    assert node.list(labels={"app": "db"}) == []
    assert json.dumps(listed[0].labels) == '{"app": "web"}'


def test_image_in_use_is_kept_and_shared_layers_stay(node, busybox, client, tmp_path) -> None:
    node.pull(busybox)
    # A second image on the same base layer, plus one layer of its own.
    push_image(client, "test/extra", "1", [busybox_layer(), tar_of({"extra": b"x"})], tmp_path)
    extra = node.pull("test/extra:1")
    box = run(node, busybox, "sleep", "1000")
    with pytest.raises(BerthClientError) as busy:
        node.remove_image(busybox)
    assert busy.value.code == "FAILED_PRECONDITION" and "container" in str(busy.value)
    # Removing the other image frees only its own layer: the base is shared.
    assert node.remove_image("test/extra:1") == [extra.chain_ids[1]]
    node.remove(box, force=True)
    assert len(node.remove_image(busybox)) == 1
    assert node.images() == []


def test_network_modes(node, busybox) -> None:
    node.pull(busybox)
    isolated = run(node, busybox, "sh", "-c", "ls /sys/class/net")
    shared = run(node, busybox, "sh", "-c", "ls /sys/class/net", network_mode="host")
    node.wait(isolated)
    node.wait(shared)
    assert logs(node, isolated).split() == ["lo"]
    host_interfaces = sorted(os.listdir("/sys/class/net"))
    assert sorted(logs(node, shared).split()) == host_interfaces


def test_logs_follow_streams_until_the_container_exits(node, busybox) -> None:
    node.pull(busybox)
    box = run(node, busybox, "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done")
    followed = [line.data for line in node.logs(box, follow=True)]
    assert followed == [b"line1\n", b"line2\n", b"line3\n"]
    assert [line.data for line in node.logs(box, tail=1)] == [b"line3\n"]


def test_concurrent_creates_of_one_name_leave_one_container(node, busybox) -> None:
    from concurrent.futures import ThreadPoolExecutor

    node.pull(busybox)

    def create(_: int) -> str:
        try:
            return node.create(ContainerConfig(busybox, name="only-one", command=["true"])).id
        except BerthClientError as err:
            return f"{err.code} {err.reason}"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(create, range(4)))
    assert sorted(r for r in results if len(r) != 64) == ["ALREADY_EXISTS NAME_IN_USE"] * 3
    assert [c.name for c in node.list(all=True)] == ["only-one"]


def test_concurrent_removes_of_one_container_are_not_found_never_internal(node, busybox) -> None:
    """Removes of one container that race (a client retrying, the cluster's converger and a
    person): one removes it, the others find nothing to remove (they used to fail INTERNAL
    with a KeyError). A running one too, with force, while it exits."""
    from concurrent.futures import ThreadPoolExecutor

    node.pull(busybox)
    created = node.create(ContainerConfig(busybox, command=["true"])).id
    exiting = run(node, busybox, "sh", "-c", "while [ ! -f /tmp/go ]; do sleep 0.1; done")
    eventually(lambda: node.inspect(exiting).state == "running", what="running")
    node.exec(exiting, ["touch", "/tmp/go"])  # it exits while the removes come

    def remove(container: str) -> str:
        try:
            node.remove(container, force=True)
            return "OK"
        except BerthClientError as err:
            return f"{err.code} {err.reason}"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(remove, [created] * 4 + [exiting] * 4))
    for outcome in (results[:4], results[4:]):
        assert "OK" in outcome, results
        assert set(outcome) <= {"OK", "NOT_FOUND CONTAINER_NOT_FOUND"}, results
    assert node.list(all=True) == []


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of an agent's /metrics, by name."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        name: float(value) for name, value in re.findall(r"^([a-z_]+) (\S+)$", text, re.MULTILINE)
    }


def test_an_idle_agent_does_not_poll_its_containers(node_agent, node, busybox) -> None:
    """Issue 14: exits come from conmon's pidfd, not from reading every exit file 20 times a
    second. Over a quiet window the monitor does not wake (a safety sweep, every 30 s, may fall
    in it once) and reads no exit file but the sweep's; exits still arrive."""
    node.pull(busybox)
    boxes = [run(node, busybox, "sleep", "1000") for _ in range(3)]
    eventually(lambda: all(node.inspect(b).state == "running" for b in boxes), what="running")
    metrics = node_agent.process.metrics
    before = scrape(metrics)
    assert before["berth_node_exit_watches"] == len(boxes)
    time.sleep(2)  # the window observed, not a deadline: polling wakes 40 times in it
    after = scrape(metrics)
    wakeups = after["berth_node_monitor_wakeups_total"] - before["berth_node_monitor_wakeups_total"]
    checks = after["berth_node_exit_checks_total"] - before["berth_node_exit_checks_total"]
    assert wakeups <= 1, f"the monitor woke {wakeups:.0f} times with nothing happening"
    assert checks <= len(boxes), f"{checks:.0f} exit files read with nothing happening"
    # CPU and memory of each running container are read when /metrics is asked.
    text = urllib.request.urlopen(metrics, timeout=10).read().decode()
    for box in boxes:
        assert f'berth_node_container_memory_bytes{{container="{box[:12]}"' in text
    node.kill(boxes[0], "KILL")
    assert node.wait(boxes[0]) == 137
    assert scrape(metrics)["berth_node_exit_watches"] == len(boxes) - 1


def test_a_container_whose_conmon_dies_without_an_exit_file_is_seen_exited(
    node_agent, node, busybox
) -> None:
    """conmon killed before it could write the exit code (frozen, then SIGKILL, as a host's
    OOM killer may do): the agent learns of it from conmon's pidfd, finds the container
    stopped in runc and reports it exited, code unknown (255), instead of running for ever."""
    node.pull(busybox)
    box = run(node, busybox, "sleep", "1000")
    eventually(lambda: node.inspect(box).state == "running", what="running")
    pid = node.inspect(box).pid
    conmon = int((node_agent.data_dir / "containers" / box / "conmon.pid").read_text())
    os.kill(conmon, signal.SIGSTOP)  # it must not see the container exit and write the file
    os.kill(pid, signal.SIGKILL)
    os.kill(conmon, signal.SIGKILL)
    # A guard, not a deadline: without the pidfd the safety sweep finds it within 30 s.
    info = eventually(lambda: (i := node.inspect(box)).state == "exited" and i, 60, "exited")
    assert info.exit_code == 255
    assert not (node_agent.data_dir / "containers" / box / "exit" / box).exists()
