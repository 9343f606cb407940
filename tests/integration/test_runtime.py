"""The runtime layer against the real runc and conmon: life cycle, logs, exit codes, exec, stats.

Every container has a unique id and a cgroup below /berth-test; each test deletes its containers,
stops their conmon (by pid) and removes their cgroups, whatever happened.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from berthd.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berthd.node import cgroups
from berthd.node.logs import follow_logs, read_logs
from berthd.node.runtime import Runtime

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    for tool in ("runc", "conmon"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make deps`")
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)  # it becomes "/": pytest makes it 0700, which only root could enter
    for name in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (root / name).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> dict[str, Any]:
    """`runc spec`'s default, the shape runc 1.1.5 expects."""
    where = tmp_path_factory.mktemp("spec")
    subprocess.run(["runc", "spec"], cwd=where, check=True)
    return json.loads((where / "config.json").read_text())


@dataclass
class Box:
    """One test container and the files conmon keeps for it."""

    id: str
    dir: Path

    @property
    def cgroup(self) -> str:
        return f"/berth-test/{self.id}"

    @property
    def log(self) -> Path:
        return self.dir / "ctr.log"

    @property
    def exit_dir(self) -> Path:
        return self.dir / "exits"

    @property
    def persist(self) -> Path:
        return self.dir / "persist"

    @property
    def conmon_pid_file(self) -> Path:
        return self.dir / "conmon.pid"

    def files(self) -> dict[str, Path]:
        """The keyword arguments of Runtime.create."""
        return {
            "log_path": self.log,
            "exit_dir": self.exit_dir,
            "persist_dir": self.persist,
            "pid_file": self.dir / "ctr.pid",
            "conmon_pid_file": self.conmon_pid_file,
        }


class Lab:
    """Makes bundles and containers; `cleanup` removes everything they left."""

    def __init__(self, tmp: Path, rootfs: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        self.rootfs = rootfs
        self.config = config
        self.runtime = Runtime(tmp / "runc-root")
        self.boxes: list[Box] = []

    def bundle(self, script: str, *, memory: int | None = None, pid_namespace: bool = True) -> Box:
        box = Box(f"t-{uuid.uuid4().hex[:16]}", self.tmp / f"box-{len(self.boxes)}")
        self.boxes.append(box)
        bundle = box.dir / "bundle"
        bundle.mkdir(parents=True)
        config = json.loads(json.dumps(self.config))
        config["process"].update(terminal=False, args=["sh", "-c", script])
        config["root"] = {"path": str(self.rootfs), "readonly": True}
        config["hostname"] = box.id
        linux = config["linux"]
        linux["cgroupsPath"] = box.cgroup
        # No network needed; without a PID namespace SIGTERM kills a process with no handler
        # (the init of a PID namespace ignores it).
        dropped = {"network"} | (set() if pid_namespace else {"pid"})
        linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] not in dropped]
        if memory is not None:
            # swap = memory + swap in OCI: the same figure means no swap to escape into.
            linux["resources"]["memory"] = {"limit": memory, "swap": memory}
        (bundle / "config.json").write_text(json.dumps(config))
        return box

    async def run(self, script: str, **options: Any) -> Box:
        box = self.bundle(script, **options)
        await self.runtime.create(box.id, box.dir / "bundle", **box.files())
        await self.runtime.start(box.id)
        return box

    async def cleanup(self) -> None:
        failures: list[Exception] = []
        for box in self.boxes:
            try:
                await self.runtime.delete(box.id, force=True)
                await stop_conmon(box)
                cgroups.remove_cgroup(box.cgroup, parents=True)
            except Exception as e:  # clean the other boxes anyway
                failures.append(e)
        if failures:
            raise failures[0]


async def stop_conmon(box: Box) -> None:
    """conmon ends by itself once its container is gone; kill it by pid if it does not."""
    deadline = time.monotonic() + 5
    while (pid := Runtime.conmon_pid(box.conmon_pid_file)) is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        await asyncio.sleep(0.05)


@pytest.fixture
async def lab(tmp_path: Path, rootfs: Path, base_config: dict[str, Any]) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path, rootfs, base_config)
    try:
        yield lab
    finally:
        await lab.cleanup()


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()[1])


async def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def test_output_streams_and_exit_code(lab: Lab) -> None:
    box = lab.bundle("echo hello; echo err >&2; exit 7")
    began = time.perf_counter()
    pid = await lab.runtime.create(box.id, box.dir / "bundle", **box.files())
    created = time.perf_counter()
    state = await lab.runtime.state(box.id)
    assert pid > 0 and state is not None and (state.status, state.pid) == ("created", pid)
    await lab.runtime.start(box.id)
    print(f"create {created - began:.3f}s, create+start {time.perf_counter() - began:.3f}s")

    assert await lab.runtime.wait_exit(box.exit_dir, box.id, timeout=10) == 7
    by_stream = {r.stream: r.data for r in read_logs(box.log)}
    assert by_stream == {"stdout": b"hello\n", "stderr": b"err\n"}
    state = await lab.runtime.state(box.id)
    assert state is not None and state.status == "stopped"
    assert not lab.runtime.oom_killed(box.persist, box.cgroup)


async def test_container_outlives_the_object_that_made_it(lab: Lab) -> None:
    # Its own PID namespace would make `sleep` an init that ignores SIGTERM.
    box = lab.bundle("exec sleep 1000", pid_namespace=False)
    creator = Runtime(lab.runtime.root)
    await creator.create(box.id, box.dir / "bundle", **box.files())
    await creator.start(box.id)
    conmon = Runtime.conmon_pid(box.conmon_pid_file)
    assert conmon is not None and ppid(conmon) != os.getpid()
    assert os.getsid(conmon) != os.getsid(0)

    del creator
    gc.collect()  # finalizers run here: none may take the container down
    # What a restarted agent does: a new Runtime on the same root finds the container.
    adopted = {s.id: s for s in await lab.runtime.list_containers()}
    assert adopted[box.id].status == "running"
    assert adopted[box.id].bundle == box.dir / "bundle"

    await lab.runtime.kill(box.id, signal.SIGTERM)
    assert await lab.runtime.wait_exit(box.exit_dir, box.id, timeout=10) == 143


CREATOR = """
import asyncio, json, sys
from pathlib import Path
from berthd.node.runtime import Runtime

async def main(root, cid, bundle, files):
    runtime = Runtime(Path(root))
    pid = await runtime.create(cid, Path(bundle), **{k: Path(v) for k, v in files.items()})
    await runtime.start(cid)
    print(pid, flush=True)
    await asyncio.sleep(1000)  # an agent that keeps running until SIGKILLed

asyncio.run(main(*json.loads(sys.argv[1])))
"""


async def test_container_survives_a_killed_agent(lab: Lab) -> None:
    box = lab.bundle("i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done")
    files = {k: str(v) for k, v in box.files().items()}
    args = json.dumps([str(lab.runtime.root), box.id, str(box.dir / "bundle"), files])
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CREATOR, args, stdout=asyncio.subprocess.PIPE
    )
    try:
        pid = int(await asyncio.wait_for(agent.stdout.readline(), 30))
    finally:
        agent.kill()
        await agent.wait()

    conmon = Runtime.conmon_pid(box.conmon_pid_file)
    assert conmon is not None and ppid(conmon) not in (os.getpid(), agent.pid)
    state = await lab.runtime.state(box.id)
    assert state is not None and (state.status, state.pid) == ("running", pid)
    before = len(read_logs(box.log))
    await wait_for(lambda: len(read_logs(box.log)) > before + 3, 10, "logs continue")

    await lab.runtime.kill(box.id, "KILL")
    assert await lab.runtime.wait_exit(box.exit_dir, box.id, timeout=10) == 137
    records = read_logs(box.log)
    assert [r.data for r in records[:3]] == [b"tick 0\n", b"tick 1\n", b"tick 2\n"]


async def test_exec_with_pipes_env_user_and_cwd(lab: Lab) -> None:
    box = await lab.run("exec sleep 1000")
    proc = await lab.runtime.exec(box.id, ["sh", "-c", "cat; echo out; echo err >&2; exit 5"])
    out, err = await asyncio.wait_for(proc.communicate(b"fed via stdin\n"), 10)
    assert (out, err, proc.returncode) == (b"fed via stdin\nout\n", b"err\n", 5)

    proc = await lab.runtime.exec(
        box.id,
        ["sh", "-c", "echo $GREETING; id -u; id -g; pwd; echo $PATH"],
        env=["GREETING=hi"],
        cwd="/tmp",
        uid=65534,
        gid=65533,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    greeting, uid, gid, cwd, path = out.decode().splitlines()
    assert (greeting, uid, gid, cwd) == ("hi", "65534", "65533", "/tmp")
    assert "/bin" in path.split(":")  # the container's environment is kept

    await lab.runtime.kill(box.id, "KILL", all=True)
    await lab.runtime.wait_exit(box.exit_dir, box.id, timeout=10)
    with pytest.raises(FailedPrecondition):
        await lab.runtime.exec(box.id, ["true"])
    with pytest.raises(NotFound):
        await lab.runtime.exec("t-missing", ["true"])


async def test_stats_of_a_running_container(lab: Lab) -> None:
    box = await lab.run(
        "sleep 1000 & i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo counted; wait",
        memory=64 << 20,
    )
    # Once it has counted, it has used CPU, and sh and sleep are both alive.
    await wait_for(lambda: [r.data for r in read_logs(box.log)] == [b"counted\n"], 30, "counted")
    stats = cgroups.read_stats(box.cgroup)
    assert stats is not None
    assert stats.pids >= 2
    assert stats.memory_bytes > 0
    assert stats.memory_limit_bytes == 64 << 20
    assert stats.cpu_nanos > 0
    assert stats.oom_kills == 0

    await lab.runtime.delete(box.id, force=True)
    assert cgroups.read_stats(box.cgroup) is None  # runc removed it
    cgroups.remove_cgroup(box.cgroup)  # nothing left: no error


async def test_oom_kill_is_reported(lab: Lab, tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "agent-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where the agent happens to run
    box = await lab.run('echo start; x=a; while :; do x="$x$x"; done', memory=16 << 20)
    assert await lab.runtime.wait_exit(box.exit_dir, box.id, timeout=30) == 137
    # Both records agree on this host: conmon's file and the cgroup's counter.
    assert (box.persist / "oom").exists()
    # conmon writes a second `oom` into its working directory: the container's, not the agent's.
    assert list(elsewhere.iterdir()) == []
    assert cgroups.oom_kills(box.cgroup) == 1
    assert lab.runtime.oom_killed(box.persist)
    assert lab.runtime.oom_killed(box.dir / "empty", box.cgroup)


async def test_follow_delivers_lines_written_after_it_started(lab: Lab) -> None:
    long = "head -c 20000 /dev/zero | tr '\\0' x; echo"  # conmon splits it into partials
    box = lab.bundle(f"sleep 0.3; for i in 1 2 3; do echo line $i; sleep 0.2; done; {long}")
    await lab.runtime.create(box.id, box.dir / "bundle", **box.files())

    def exited() -> bool:
        return lab.runtime.exit_code(box.exit_dir, box.id) is not None

    async def follow() -> list[tuple[str, bytes]]:
        return [(r.stream, r.data) async for r in follow_logs(box.log, stop=exited)]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    await lab.runtime.start(box.id)
    records = await asyncio.wait_for(task, 20)
    assert records == [
        ("stdout", b"line 1\n"),
        ("stdout", b"line 2\n"),
        ("stdout", b"line 3\n"),
        ("stdout", b"x" * 20000 + b"\n"),
    ]


async def test_runc_errors_map_to_domain_errors(lab: Lab) -> None:
    box = lab.bundle("true")
    config_path = box.dir / "bundle" / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["args"] = ["/no/such/program"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(FailedPrecondition, match="no such file or directory"):
        await lab.runtime.create(box.id, box.dir / "bundle", **box.files())
    assert await lab.runtime.state(box.id) is None

    running = await lab.run("exec sleep 1000")
    with pytest.raises(AlreadyExists):
        await lab.runtime.create(running.id, running.dir / "bundle", **running.files())
    with pytest.raises(FailedPrecondition, match=r"not stopped|running"):
        await lab.runtime.delete(running.id)
    assert [s.id for s in await lab.runtime.list_containers()] == [running.id]

    with pytest.raises(NotFound):
        await lab.runtime.kill("t-missing", "TERM")
    with pytest.raises(InvalidArgument):
        await lab.runtime.state("../escape")
    with pytest.raises(InvalidArgument, match=r"config\.json"):
        await lab.runtime.create("t-nobundle", lab.tmp / "nowhere", **box.files())
    await lab.runtime.delete("t-missing")  # already gone is fine
    version = await lab.runtime.version()
    assert version.startswith("runc 1.") and ", conmon 2." in version
