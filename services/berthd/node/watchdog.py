"""The node watchdog: the fence of a node whose agent is dead.

The agent's fence (berthd.node.fence) runs inside the agent. When the agent itself dies
(SIGKILL, a crash loop) its containers run on under their conmons, its lease expires, the
cluster starts its replicas on other nodes, and nothing stops the old ones: duplicates until
an agent comes back. So every agent starts a watchdog, `python -m berthd.node.watchdog`, in a
session of its own (the agent's death does not take it along), and records its pid in
`<data>/watchdog.pid`; a new agent kills the previous agent's watchdog (by that pid, checked
against its command line) before it adopts the containers, then starts its own.

While its agent lives the watchdog waits on a pidfd of the agent and does nothing: the fence
is in charge. Once the agent is dead it reads the agent's container records, checks every
CHECK_INTERVAL whether the node's registration (`nodes/<id>`) is in etcd, and when it has been
unseen for --stop-after-disconnect (the cluster has moved the replicas by then) it stops the
node's service replicas itself, through runc under the node's runc root: SIGTERM, SIGKILL
after STOP_GRACE. An unreachable etcd counts only while the peers the agent last knew
(`<data>/peers.json`) do not say it is down for everyone. Standalone cluster containers only
with --stop-standalone-after-disconnect; containers made on the node directly never. The rule
is the fence's own (`fence.victims`, `fence.observe`), with replicas told by their label.
Before it signals a container it marks its record stopped by the user, so the agent that comes
back adopts it as exited and does not restart it (its converger then removes it if the cluster
moved it). It exits once nothing it could stop is left, or when a new agent has replaced it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import grpc

from berth.files import atomic_write
from berth.tls import plaintext_mode
from berthd.common.errors import BerthError, FailedPrecondition, NotFound
from berthd.common.logs import setup_logging
from berthd.common.rpc.channels import Channels, CredentialSource
from berthd.common.security.tls import InstanceCredentials
from berthd.common.store import Store
from berthd.node.fence import (
    CHECK_INTERVAL,
    PEERS_FILE,
    STOP_GRACE,
    Disconnection,
    Observation,
    Peers,
    is_replica,
    observe,
    victims,
)
from berthd.node.records import EXITED, RESTARTING, RUNNING, ContainerDir, ContainerRecord
from berthd.node.records import load_records as load_container_records
from berthd.node.runtime import Runtime

log = logging.getLogger("berthd.node.watchdog")

PID_FILE = "watchdog.pid"
MODULE = "berthd.node.watchdog"
# How often a stopping container is looked at (its exit file, then runc).
EXIT_POLL = 0.1
# How long a replaced watchdog may take to die after SIGKILL.
KILL_WAIT = 10.0


# --- the decision, without I/O ---------------------------------------------------------------


class Guard:
    """What a dead agent's watchdog stops, and when: the fence's rule over the records the
    agent left, with time counted from the first check that did not see the registration."""

    def __init__(
        self, records: Iterable[ContainerRecord], stop_after: float, standalone_after: float
    ) -> None:
        self.records = list(records)
        self.stop_after = stop_after
        self.standalone_after = standalone_after
        self.lost = Disconnection()
        self.stopped: set[str] = set()

    def _victims(self, lost_for: float) -> list[ContainerRecord]:
        return victims(
            self.records,
            lost_for,
            self.stop_after,
            self.standalone_after,
            replica=is_replica,  # by label: the desired state died with the agent
            spared=self.stopped,
        )

    @property
    def done(self) -> bool:
        """Nothing left that would ever be stopped: the watchdog may exit."""
        return not self._victims(math.inf)

    def step(self, observation: Observation, now: float) -> list[ContainerRecord]:
        """One check (`fence.observe`): the containers to stop now (each once)."""
        lost_for = self.lost.observe(observation, now)
        if lost_for <= 0:
            return []
        found = self._victims(lost_for)
        self.stopped.update(record.id for record in found)
        return found


# --- the pid file ----------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _running(pid: int) -> bool:
    """A zombie counts as gone: it runs nothing any more."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def watchdog_pid(data_dir: Path) -> int | None:
    """The pid of the watchdog of the node whose data directory this is, if it runs (checked
    against its command line: pids get reused)."""
    try:
        pid = int((data_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    mine = MODULE in argv and f"--data-dir={data_dir.absolute()}" in argv
    return pid if mine and _running(pid) else None


def kill_watchdog(data_dir: Path) -> int | None:
    """SIGKILL the node's watchdog and wait until it is gone; its pid, or None if none ran.
    For a new agent (which replaces it), `berthd kill-node` and `down`, and tests."""
    pid = watchdog_pid(data_dir)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while _running(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node watchdog pid {pid} survived SIGKILL")
        time.sleep(0.02)
    return pid


# --- the agent's side ------------------------------------------------------------------------


def watchdog_argv(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """The watchdog's command line, from the agent's own flags (etcd and TLS settings too)."""

    def path(value: str) -> str:
        return str(Path(value).absolute()) if value else ""

    return [
        sys.executable,
        "-m",
        MODULE,
        f"--agent-pid={os.getpid()}",
        f"--data-dir={data_dir.absolute()}",
        f"--node-id={args.node_id}",
        f"--etcd={args.etcd}",
        f"--etcd-prefix={args.etcd_prefix}",
        f"--tls-ca={path(args.tls_ca)}",
        f"--tls-cert={path(args.tls_cert)}",
        f"--tls-key={path(args.tls_key)}",
        f"--tls-ca-key={path(args.tls_ca_key)}",
        f"--tls-lifetime={args.tls_lifetime}",
        f"--runc={args.runc}",
        f"--conmon={args.conmon}",
        f"--stop-after-disconnect={args.stop_after_disconnect}",
        f"--stop-standalone-after-disconnect={args.stop_standalone_after_disconnect}",
        f"--log-level={args.log_level}",
    ]


def replace_watchdog(data_dir: Path, argv: list[str] | None) -> int | None:
    """Kill the previous agent's watchdog, start this agent's (`argv`; None: fencing is off)
    and record its pid. Call before adopting the containers: the old one must not act on
    records this agent owns. Its pid, or None."""
    old = kill_watchdog(data_dir)
    if old is not None:
        log.info("replaced the previous agent's watchdog", extra={"watchdog_pid": old})
    if argv is None:
        (data_dir / PID_FILE).unlink(missing_ok=True)
        return None
    # Its own session: a signal to the agent's process group (a terminal's ^C) spares it.
    # stderr is the agent's: its lines go where the agent's go (a log file, the journal).
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    # Reaped if it exits while the agent lives (it has nothing to guard once the agent dies).
    threading.Thread(target=proc.wait, daemon=True, name="watchdog reaper").start()
    try:
        atomic_write(data_dir / PID_FILE, f"{proc.pid}\n".encode())
    except OSError as exc:
        # A full data directory must not keep the agent from starting; a watchdog nobody can
        # find by its pid would never be replaced: none runs.
        proc.kill()
        log.error(
            "no node watchdog: cannot record its pid in %s: %s", data_dir, exc.strerror or exc
        )
        return None
    log.info("started the node watchdog", extra={"watchdog_pid": proc.pid})
    return proc.pid


# --- the watchdog process --------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Stop a dead node agent's service replicas once the cluster moved them "
        "(started by `berthd node`; see docs/node.md).",
    )
    parser.add_argument("--agent-pid", type=int, required=True, help="the agent it guards for")
    parser.add_argument("--data-dir", type=Path, required=True, help="the agent's data dir")
    parser.add_argument("--node-id", required=True, help="the node's id")
    parser.add_argument("--etcd", required=True, help="etcd client endpoint host:port")
    parser.add_argument("--etcd-prefix", default="/berth/", help="key prefix of berth's keys")
    parser.add_argument("--tls-ca", default="", help="the cluster CA certificate")
    parser.add_argument("--tls-cert", default="", help="the agent's certificate file")
    parser.add_argument("--tls-key", default="", help="the agent's key file")
    parser.add_argument("--tls-ca-key", default="", help="the CA key, when the agent has it")
    parser.add_argument("--tls-lifetime", type=float, default=86400.0, help="of certificates")
    parser.add_argument("--runc", default="runc", help="runc binary")
    parser.add_argument("--conmon", default="conmon", help="conmon binary")
    parser.add_argument("--stop-after-disconnect", type=float, default=0.0, help="seconds")
    parser.add_argument("--stop-standalone-after-disconnect", type=float, default=0.0)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


class CertFiles:
    """The agent's certificate files as a credential source (berthd.common.rpc.channels): read
    again at each connection, and a new generation (new channels) once its renewal rewrote
    them."""

    def __init__(self, ca: bytes, cert: Path, key: Path) -> None:
        self.ca, self.cert, self.key = ca, cert, key

    @property
    def generation(self) -> int:
        try:
            return self.cert.stat().st_mtime_ns
        except OSError:
            return 0

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key.read_bytes(), self.cert.read_bytes())


def credential_source(
    args: argparse.Namespace,
) -> tuple[CredentialSource | None, InstanceCredentials | None]:
    """(the credentials for etcd and the peers, what keeps them renewed or None). The agent's
    certificate files; without files, a certificate issued here with the CA key, kept in
    memory: never written over the agent's files. None: plaintext, or the environment's."""
    if plaintext_mode() or not args.tls_ca:
        return None, None
    ca = Path(args.tls_ca).read_bytes()
    cert, key = Path(args.tls_cert or "/nonexistent"), Path(args.tls_key or "/nonexistent")
    if cert.is_file() and key.is_file():
        return CertFiles(ca, cert, key), None
    credentials = InstanceCredentials(
        f"node:{args.node_id}",
        ["localhost", "127.0.0.1"],
        args.tls_ca,
        ca_key_path=args.tls_ca_key,
        lifetime=args.tls_lifetime,
    )
    return credentials, credentials


async def agent_exit(pid: int) -> None:
    """Returns once the process `pid` has exited. A pidfd, opened while `pid` is still our
    parent, cannot be fooled by a reused pid."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if os.getppid() != pid:
            return  # it died before the pidfd was open: the pid may be another process's
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def _mark_stopped(cdir: ContainerDir, record: ContainerRecord) -> None:
    """What the agent's own stop records, written whole before any signal: the next agent
    adopts the container as exited and does not restart it."""
    record.stopped_by_user = True
    if record.state == RESTARTING:
        record.state = EXITED  # no process: a restart would only be scheduled
    cdir.save(record)


async def _exited(runtime: Runtime, cdir: ContainerDir, container_id: str) -> bool:
    if runtime.exit_code(cdir.exit_dir, container_id) is not None:
        return True
    with contextlib.suppress(BerthError):
        state = await runtime.state(container_id)
        return state is None or state.status not in ("running", "paused", "creating", "created")
    return False


async def _wait_exited(
    runtime: Runtime, cdir: ContainerDir, container_id: str, timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while not await _exited(runtime, cdir, container_id):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(EXIT_POLL)
    return True


async def stop_container(runtime: Runtime, cdir: ContainerDir, record: ContainerRecord) -> None:
    """SIGTERM, SIGKILL after STOP_GRACE, as the agent's stop does, through runc."""
    try:
        await asyncio.to_thread(_mark_stopped, cdir, record)
    except OSError as exc:  # a full disk: stop it all the same (the agent may restart it)
        log.warning(
            "cannot mark it stopped: %s", exc.strerror or exc, extra={"container": record.id}
        )
    if record.state != RUNNING:
        return
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        with contextlib.suppress(NotFound, FailedPrecondition):  # exited a moment ago
            await runtime.kill(record.id, int(sig))
        if await _wait_exited(runtime, cdir, record.id, wait):
            log.info("stopped: the node's agent is dead", extra={"container": record.id})
            return
    log.warning("the container did not stop after SIGKILL", extra={"container": record.id})


async def _stop_one(runtime: Runtime, data: Path, record: ContainerRecord) -> None:
    try:
        await stop_container(runtime, ContainerDir(data / "containers" / record.id), record)
    except (BerthError, OSError) as exc:
        log.warning("cannot stop it: %s", exc, extra={"container": record.id})


async def guard(args: argparse.Namespace) -> None:
    await agent_exit(args.agent_pid)
    data: Path = args.data_dir
    records = await asyncio.to_thread(load_container_records, data / "containers")
    watch = Guard(
        records.values(), args.stop_after_disconnect, args.stop_standalone_after_disconnect
    )
    if watch.done:
        log.info("the node agent exited; nothing to guard")
        return
    log.warning(
        "the node agent exited: its containers run on; stopping its replicas once the "
        "node's registration has been gone for %.0fs",
        args.stop_after_disconnect,
        extra={"agent_pid": args.agent_pid},
    )
    source, renewer = credential_source(args)
    store = Store(args.etcd, args.etcd_prefix, source.channel_credentials if source else None)
    # The peers the agent last knew, asked (over its TLS) should etcd be unreachable.
    channels = Channels(source)
    peers = Peers(args.node_id, data / PEERS_FILE, channels)
    await asyncio.to_thread(peers.load)
    renewal = None
    if renewer is not None:
        renewer.on_renew.append(store.reconnect)
        renewal = asyncio.create_task(renewer.keep_renewed())
    runtime = Runtime(data / "runc", runc=args.runc, conmon=args.conmon)
    try:
        while not watch.done:
            if watchdog_pid(data) != os.getpid():
                log.info("replaced by a new agent's watchdog")
                return
            observation = await observe(store, args.node_id, peers)
            now = time.monotonic()
            found = watch.step(observation, now)
            if found:
                log.warning(
                    "no registration for %.0fs and no agent: stopping %d container(s) "
                    "(--stop-after-disconnect)",
                    now - (watch.lost.since or now),
                    len(found),
                )
            # All at once: one container's grace must not delay the others'.
            await asyncio.gather(*(_stop_one(runtime, data, record) for record in found))
            if not watch.done:
                await asyncio.sleep(CHECK_INTERVAL)
        log.info("nothing left to guard")
    finally:
        if renewal is not None:
            renewal.cancel()
        await channels.close()
        with contextlib.suppress(Exception):
            await store.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("node-watchdog", args.node_id, args.log_level)
    try:
        asyncio.run(guard(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
