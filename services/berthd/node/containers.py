"""Container lifecycle on one node: create, start, stop, kill, remove, restart policies, adoption.

Each container runs under its own conmon, so it outlives the agent. The agent keeps a record per
container on disk and a monitor task that learns of exits (a pidfd of each running container's
conmon, berthd.node.exits, then conmon's exit file), applies restart policies and reports each
container's status to etcd (`containers/<id>/status`, a ContainerStatus of
berthd.common.state.containers). An agent that starts finds every record again and adopts the
containers, whatever happened while it was down. An idle node does no periodic work per
container but a safety sweep every SWEEP_INTERVAL; cgroup figures are read when asked (stats,
/metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from berth import health as health_model
from berth.containers import NETWORK_MODES, USERNS_REMAP
from berthd.common.containers import ContainerConfig, MountSpec, validate
from berthd.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berthd.common.state.containers import START_FAILED, STATUSES, ContainerStatus
from berthd.common.storage import Storage
from berthd.common.store import Store
from berthd.node import cgroups, idmap, metrics
from berthd.node.dns import NameService, default_upstreams
from berthd.node.exits import ExitWatcher
from berthd.node.health import Health, HealthMonitor
from berthd.node.idmap import IdMap
from berthd.node.layers import ImageStore, LayerStore
from berthd.node.network import Attachment, NetworkManager
from berthd.node.ports import INGRESS_LABEL, Mesh, MeshPort, PortHolder, bindings_of, to_json
from berthd.node.records import (
    EXITED,
    RESTARTING,
    RUNNING,
    STATES,
    ContainerDir,
    ContainerRecord,
    load_records,
)
from berthd.node.runtime import ProcessNotStarted, Runtime
from berthd.node.secrets import RUN_ROOT, SecretMounts, default_dir, run_dir
from berthd.node.spec import (
    build_runtime_config,
    effective_user,
    prepare_etc_files,
    resolve_process,
    resolve_user,
    write_init_layer,
)

log = logging.getLogger("berthd.node.containers")

# How often every running container's exit file is looked at anyway: a safety net for an exit
# whose event was missed (exits are learnt from conmon's pidfd at once, not by this).
SWEEP_INTERVAL = 30.0
# runc's states of a container that has not exited.
ALIVE = ("creating", "created", "running", "paused")
DEFAULT_STOP_TIMEOUT = 10
# Restart backoff: Docker doubles from 100 ms; capped so a crash loop stays cheap.
FIRST_RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 5.0


def restart_delay(restart_count: int) -> float:
    """Seconds to wait before restarting a container that has restarted `restart_count`
    times: 0.1, 0.2, 0.4, ... doubling, at most MAX_RESTART_DELAY."""
    return min(FIRST_RESTART_DELAY * 2 ** min(restart_count, 16), MAX_RESTART_DELAY)


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    if target.is_mount():
        return
    # overlayfs lists lowerdirs top first; image layers are stored bottom first.
    lowerdir = ":".join(str(p) for p in reversed(lowers))
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise FailedPrecondition(f"cannot mount the container's root filesystem: {result.stderr}")


def unmount(target: Path) -> None:
    if target.is_mount():
        subprocess.run(["umount", str(target)], capture_output=True, check=False)
    if target.is_mount():
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def parse_signal(value: str | int) -> int:
    if isinstance(value, int):
        return value
    text = value.strip().upper() or "KILL"
    if text.isdigit():
        return int(text)
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidArgument(f"unknown signal {value!r}") from None


def on_network(config: ContainerConfig) -> bool:
    """The container joins a berth network (network_mode is its name)."""
    return config.network_mode not in NETWORK_MODES


def container_not_found(ref: str) -> NotFound:
    return NotFound(
        f"no such container: {ref}",
        reason="CONTAINER_NOT_FOUND",
        metadata={"container": ref},
        resource=("container", ref),
    )


class ContainerManager:
    def __init__(
        self,
        data_dir: Path,
        node_id: str,
        runtime: Runtime,
        images: ImageStore,
        layers: LayerStore,
        store: Store | None,
        secrets: SecretMounts | None = None,
        remap: IdMap | None = None,
        names: NameService | None = None,
    ) -> None:
        self.root = data_dir / "containers"
        self.root.mkdir(parents=True, exist_ok=True)
        self.disk = Storage("the node's data directory", data_dir)
        self.volumes = data_dir / "volumes"
        # `--userns remap`: the node's range for new containers (a record keeps its own).
        self.remap = remap or IdMap.parse(idmap.DEFAULT_RANGE)
        # Where remapped containers' root filesystems are mounted: runc enters the user
        # namespace before it bind-mounts the root, so every directory above it must be
        # searchable by the mapped root, which the data directory's need not be (Docker
        # refuses a data root below a 0700 directory; this works with any).
        self.remapped_root = run_dir(data_dir) / "rootfs"
        self.node_id = node_id
        self.runtime = runtime
        self.images = images
        self.layers = layers
        self.store = store
        # Without a way to the cluster, a container that names secrets cannot be created.
        self.secrets = secrets or SecretMounts(default_dir(data_dir), None)
        self.records: dict[str, ContainerRecord] = {}
        self._reserved_names: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Condition()
        self._monitor: asyncio.Task[None] | None = None
        self._reporter_task: asyncio.Task[None] | None = None
        self._reports: asyncio.Queue[str] = asyncio.Queue()
        self._restarts: dict[str, asyncio.Task[None]] = {}
        # The probe timers of running containers with a health check (none for the others).
        self._health: dict[str, HealthMonitor] = {}
        # Ids of containers whose conmon exited (or that need a look now), for the monitor.
        self._exits: asyncio.Queue[str] = asyncio.Queue()
        self.watcher = ExitWatcher(self._exits.put_nowait)
        # Running containers whose conmon died without an exit file (warned about once).
        self._orphans: set[str] = set()
        self.networks = NetworkManager(store, node_id, data_dir, run_dir(data_dir))
        # Names on networks: endpoint records and a resolver per bridge (berthd.node.dns).
        self.names = names or NameService(store, node_id, default_upstreams())
        # The sockets holding published ports, and the routing mesh's view of the cluster.
        self.ports = PortHolder()
        self.mesh = Mesh(store, self._mesh_changed) if store is not None else None

    # Records --------------------------------------------------------------------------------

    def dir(self, container_id: str) -> ContainerDir:
        return ContainerDir(self.root / container_id)

    def rootfs(self, record: ContainerRecord) -> Path:
        """Where the container's overlay root filesystem is mounted."""
        if record.idmap:
            return self.remapped_root / record.id
        return self.dir(record.id).rootfs

    def cgroups_path(self, container_id: str) -> str:
        return f"/berth/{self.node_id}/{container_id}"

    def lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    def resolve(self, ref: str) -> ContainerRecord:
        """An id, a unique id prefix, or a name, as Docker accepts."""
        if not ref:
            raise InvalidArgument("no container given")
        if ref in self.records:
            return self.records[ref]
        by_name = [r for r in self.records.values() if r.name == ref]
        if by_name:
            return by_name[0]
        matches = [r for r in self.records.values() if r.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(
                f"container id prefix {ref!r} is ambiguous",
                reason="AMBIGUOUS_ID",
                metadata={"prefix": ref, "matches": len(matches)},
            )
        raise container_not_found(ref)

    async def _save(self, record: ContainerRecord) -> None:
        with self.disk.guard(
            f"cannot save the record of container {record.name}", container_id=record.id
        ):
            await asyncio.to_thread(self.dir(record.id).save, record)
        await self._saved(record)

    async def _saved(self, record: ContainerRecord) -> None:
        """A record now on disk: report it to the cluster and wake whoever waits on it."""
        self._reports.put_nowait(record.id)
        self._update_gauges()
        async with self._changed:
            self._changed.notify_all()

    async def _reporter(self) -> None:
        """Write statuses to etcd off the request path. Each write sends the record's state
        at that moment, so a burst of changes ends with the latest one, in any order."""
        while True:
            container_id = await self._reports.get()
            record = self.records.get(container_id)
            if record is not None:
                await self._report(record)

    async def _report(self, record: ContainerRecord) -> None:
        if self.store is None:
            return
        status = ContainerStatus(
            node=self.node_id,
            name=record.name,
            state=record.state,
            pid=record.pid,
            exit_code=record.exit_code,
            oom_killed=record.oom_killed,
            started_at=record.started_at,
            finished_at=record.finished_at,
            restart_count=record.restart_count,
            failure_reason=(record.failure_reason or START_FAILED) if record.error else "",
            failure_message=record.error,
            image_digest=record.image_digest,
            attempt=record.attempt,
            created_at=record.created_at,
            network=dict(record.network),
            ingress=record.config.labels.get(INGRESS_LABEL, ""),
            health=dict(record.health),
            withdrawn=record.withdrawn,
        )
        try:
            await STATUSES.put(self.store, record.id, status)
        except Exception as exc:
            log.warning("cannot report status of %s: %s", record.id, exc)

    def _update_gauges(self) -> None:
        for state in STATES:
            metrics.CONTAINERS.labels(state).set(
                sum(1 for r in self.records.values() if r.state == state)
            )

    # Adoption and monitoring ------------------------------------------------------------------

    async def start_background(self) -> None:
        """Load every record, adopt what still runs, settle what exited while we were away."""
        self.records.update(await asyncio.to_thread(load_records, self.root))
        # Secrets of containers removed while the agent was away (or mid-removal) go now.
        await asyncio.to_thread(self.secrets.sweep, list(self.records))
        await asyncio.to_thread(self._sweep_remapped, set(self.records))
        for record in list(self.records.values()):
            await self._adopt(record)
        # Namespaces of containers that no longer have one, then berth's table rebuilt from
        # the running containers' attachments (or deleted when there are none).
        await asyncio.to_thread(
            self.networks.sweep, {r.id for r in self.records.values() if r.network}
        )
        self._hold_adopted_ports()
        await self._sync_network_rules()
        if self.mesh is not None:
            self.mesh.start()
        self._update_gauges()
        metrics.CONTAINER_USAGE.sources.append(self._running)
        self._monitor = asyncio.create_task(self._monitor_loop())
        self._reporter_task = asyncio.create_task(self._reporter())

    def _running(self) -> list[tuple[str, str, str]]:
        """(id, name, cgroups path) of each running container, for /metrics."""
        return [
            (r.id, r.name, self.cgroups_path(r.id))
            for r in list(self.records.values())
            if r.state == RUNNING
        ]

    async def _adopt(self, record: ContainerRecord) -> None:
        if record.network and record.state != RUNNING:
            # The agent died between attaching and starting it: the attachment goes.
            await self._detach(record)
            await asyncio.to_thread(self.dir(record.id).save, record)
        if record.state in (RUNNING, RESTARTING) or self.rootfs(record).is_mount():
            await asyncio.to_thread(self._ensure_rootfs, record)
        if record.state == RUNNING:
            state = await self.runtime.state(record.id)
            if state is not None and state.status == "running":
                log.info("adopted running container", extra={"container": record.id})
                self._start_watching(record)
                self._start_health(record)
                return
            await self._settle_exit(record)
        elif record.state == RESTARTING:
            self._schedule_restart(record)
        await self._report(record)

    async def stop_background(self) -> None:
        for monitor in list(self._health.values()):
            await monitor.stop()
        self._health.clear()
        for task in [self._monitor, self._reporter_task, *self._restarts.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.mesh is not None:
            await self.mesh.stop()
        self.ports.close()
        self.watcher.close()
        await self.networks.close()
        await self.names.stop()
        metrics.EXIT_WATCHES.set(0)
        with contextlib.suppress(ValueError):
            metrics.CONTAINER_USAGE.sources.remove(self._running)

    def _watch(self, record: ContainerRecord) -> bool:
        """Watch the running container's conmon (its pidfd); False when conmon is gone."""
        pid_file = self.dir(record.id).conmon_pid_file
        watching = self.watcher.watch(record.id, lambda: self.runtime.conmon_pid(pid_file))
        metrics.EXIT_WATCHES.set(len(self.watcher))
        return watching

    def _start_watching(self, record: ContainerRecord) -> None:
        """After a start or an adoption: a conmon already gone (a command that ended at once)
        is looked at now instead."""
        if not self._watch(record):
            self._exits.put_nowait(record.id)

    async def _monitor_loop(self) -> None:
        """Sleeps until a conmon exits (its id arrives from the watcher), or until the next
        safety sweep: no work per container while nothing happens."""
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_sweep - time.monotonic())):
                    container_ids = [await self._exits.get()]
            except TimeoutError:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                container_ids = [r.id for r in self.records.values() if r.state == RUNNING]
            metrics.MONITOR_WAKEUPS.inc()
            for container_id in container_ids:
                try:
                    await self._check_exit(container_id)
                except Exception:
                    log.exception("monitoring %s failed", container_id)

    async def _check_exit(self, container_id: str) -> None:
        """Settle the container if it has exited: its exit file is there, or its conmon is
        gone and runc says it no longer runs (a conmon killed before it could write the file)."""
        record = self.records.get(container_id)
        if record is None or record.state != RUNNING:
            return
        async with self.lock(container_id):
            if record.state != RUNNING or self.records.get(container_id) is not record:
                return
            metrics.EXIT_CHECKS.inc()
            if self.runtime.exit_code(self.dir(record.id).exit_dir, record.id) is None:
                if container_id in self.watcher or self._watch(record):
                    return  # conmon lives: its exit will come as an event
                state = await self.runtime.state(record.id)
                if state is not None and state.status in ALIVE:
                    # conmon died and the container runs on: the sweep keeps an eye on it.
                    if container_id not in self._orphans:
                        self._orphans.add(container_id)
                        log.warning(
                            "the container runs without its conmon: its exit is looked for "
                            "every %.0fs",
                            SWEEP_INTERVAL,
                            extra={"container": record.id},
                        )
                    return
            await self._settle_exit(record)

    async def _settle_exit(self, record: ContainerRecord) -> None:
        """The main process is gone: record how it ended, clean runc up, maybe restart."""
        cdir = self.dir(record.id)
        code = self.runtime.exit_code(cdir.exit_dir, record.id)
        record.exit_code = code if code is not None else 255
        record.oom_killed = self.runtime.oom_killed(cdir.persist, self.cgroups_path(record.id))
        record.finished_at = record.finished_at or time.time()
        if code is not None:
            with contextlib.suppress(OSError):
                record.finished_at = (cdir.exit_dir / record.id).stat().st_mtime
        record.pid = 0
        await self._stop_health(record)
        await self._detach(record)
        self.watcher.unwatch(record.id)
        self._orphans.discard(record.id)
        metrics.EXIT_WATCHES.set(len(self.watcher))
        await self.runtime.delete(record.id, force=True)
        with contextlib.suppress(FailedPrecondition):
            cgroups.remove_cgroup(self.cgroups_path(record.id), parents=True)
        if self._should_restart(record):
            record.state = RESTARTING
            await self._save(record)
            self._schedule_restart(record)
        else:
            record.state = EXITED
            await self._save(record)
        log.info(
            "container exited",
            extra={"container": record.id, "exit_code": record.exit_code, "oom": record.oom_killed},
        )

    def _should_restart(self, record: ContainerRecord) -> bool:
        policy = record.config.restart_policy
        if record.stopped_by_user or policy == "no":
            return False
        if policy == "always":
            return True
        limit = record.config.restart_max_retries
        return record.exit_code != 0 and (limit == 0 or record.restart_count < limit)

    def _schedule_restart(self, record: ContainerRecord) -> None:
        if record.id in self._restarts and not self._restarts[record.id].done():
            return
        delay = restart_delay(record.restart_count)

        async def restart() -> None:
            await asyncio.sleep(delay)
            async with self.lock(record.id):
                if record.state != RESTARTING or record.id not in self.records:
                    return
                record.restart_count += 1
                metrics.RESTARTS.inc()
                await self._run(record)

        self._restarts[record.id] = asyncio.create_task(restart())

    # Health checks ----------------------------------------------------------------------------

    def _health_config(self, record: ContainerRecord) -> health_model.HealthConfig | None:
        """The container's health check over its image's (None: it has none)."""
        try:
            image_config = self.images.get(record.image_digest).config
        except NotFound:
            image_config = {}
        image = health_model.from_image(image_config.get("Healthcheck"))
        return health_model.effective(record.config.health_check, image)

    def _start_health(self, record: ContainerRecord) -> None:
        """Start the probe timer of a container that now runs (a new start: status starting;
        an adoption: where the record left it)."""
        config = self._health_config(record)
        if config is None or record.id in self._health:
            return
        health = Health.from_json(record.health) or Health()
        record.health = health.to_json()

        async def probe(argv: list[str], timeout: float) -> tuple[int, bytes]:
            return await self._probe(record, argv, timeout)

        async def changed() -> None:
            async with self.lock(record.id):
                if self._health.get(record.id) is not monitor or record.state != RUNNING:
                    return
                record.health = monitor.health.to_json()
                await self._save(record)
            # Service DNS answers with healthy replicas only.
            await self.names.sync(self.records.values())
            log.info(
                "health status %s",
                monitor.health.status,
                extra={"container": record.id, "failing_streak": monitor.health.failing_streak},
            )

        monitor = HealthMonitor(config, health, record.started_at or time.time(), probe, changed)
        self._health[record.id] = monitor
        monitor.start()

    async def _stop_health(self, record: ContainerRecord) -> None:
        """The container stopped: no more probes, no health (Docker keeps none either)."""
        monitor = self._health.pop(record.id, None)
        if monitor is not None:
            await monitor.stop()
        record.health = {}

    async def _probe(
        self, record: ContainerRecord, argv: list[str], timeout: float
    ) -> tuple[int, bytes]:
        """One probe: an exec in the container as its user, stdout and stderr together."""
        image_config = self.images.get(record.image_digest).config
        user = effective_user(image_config, record.config)
        uid, gid, _ = await asyncio.to_thread(resolve_user, self.rootfs(record), user)
        cwd = record.config.working_dir or image_config.get("WorkingDir") or "/"
        proc = await self.runtime.exec(record.id, argv, cwd=cwd, uid=uid, gid=gid)
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            # runc passes SIGTERM on to the probe; SIGKILL would only end runc.
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await proc.wait()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        return proc.returncode or 0, out + err

    # Create ---------------------------------------------------------------------------------

    async def create(
        self, config: ContainerConfig, container_id: str | None = None
    ) -> ContainerRecord:
        """Create a container; `container_id` is given when the cluster chose it."""
        validate(config)
        if container_id is not None and not re.fullmatch(r"[0-9a-f]{64}", container_id):
            raise InvalidArgument(f"container id {container_id!r} is not 64 hex characters")
        if container_id in self.records:
            raise FailedPrecondition(f"container {container_id} already exists")
        image = self.images.get(config.image)
        name = config.name or self._generate_name()
        if self._name_taken(name):
            raise AlreadyExists(
                f'the container name "{name}" is already in use',
                reason="NAME_IN_USE",
                metadata={"name": name},
                resource=("container", name),
            )
        # Reserved until the record exists: preparing awaits, and a concurrent create of
        # the same name must not slip in meanwhile.
        self._reserved_names.add(name)
        container_id = container_id or secrets.token_hex(32)
        config.name = name
        remapped = config.userns == USERNS_REMAP
        record = ContainerRecord(
            id=container_id,
            name=name,
            config=config,
            image_digest=image.digest,
            chain_ids=list(image.chain_ids),
            idmap=[self.remap.start, self.remap.size] if remapped else [],
        )
        try:
            if record.id_map is not None:
                for ref in config.secrets:
                    record.id_map.check(f"secret {ref.name}'s uid", [ref.uid])
                    record.id_map.check(f"secret {ref.name}'s gid", [ref.gid])
            # Before anything is made: SECRET_UNAVAILABLE when the cluster does not give them.
            await self.secrets.ensure(container_id, name, config.secrets, record.id_map)
            # A full disk fails the create as STORAGE_FULL, and _discard leaves nothing of it.
            with self.disk.guard(f"cannot create container {name}", container_id=container_id):
                await asyncio.to_thread(self._prepare, record, image.config)
                await asyncio.to_thread(self.dir(record.id).save, record)
            self.records[container_id] = record
        except BaseException:
            await asyncio.to_thread(self._discard, record)
            raise
        finally:
            self._reserved_names.discard(name)
        await self._saved(record)
        return record

    def _name_taken(self, name: str) -> bool:
        return name in self._reserved_names or any(r.name == name for r in self.records.values())

    def _generate_name(self) -> str:
        while True:
            name = f"berth_{secrets.token_hex(4)}"
            if not self._name_taken(name):
                return name

    def lower_dirs(self, record: ContainerRecord) -> list[Path]:
        """Image layers bottom first, then the container's init layer."""
        layers = [self.layers.path(chain) for chain in record.chain_ids]
        return [*layers, self.dir(record.id).init]

    def _ensure_rootfs(self, record: ContainerRecord) -> None:
        cdir = self.dir(record.id)
        lowers = self.lower_dirs(record)
        missing = [p for p in lowers if not p.is_dir()]
        if missing:
            raise FailedPrecondition(
                f"layer {missing[0].name} of container {record.name} is missing on this node"
            )
        id_map = record.id_map
        if id_map is None:
            mount_overlay(lowers, cdir.upper, cdir.work, cdir.rootfs)
            return
        target = self.rootfs(record)
        if target.is_mount():
            return
        self._make_remapped_root()
        target.mkdir(mode=0o755, exist_ok=True)
        idmap.mount_overlay(lowers, cdir.upper, cdir.work, target, id_map)

    def _make_remapped_root(self) -> None:
        """The directory of remapped root filesystems, searchable by any mapped root (0711:
        traversable, not listable), as is every directory above it."""
        self.remapped_root.mkdir(parents=True, exist_ok=True)
        self.remapped_root.chmod(0o711)
        for directory in self.remapped_root.parents:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                if directory.is_relative_to(RUN_ROOT):  # ours: /run/berth, /run/berth/<hash>
                    directory.chmod(stat.S_IMODE(mode) | 0o011)
                    continue
                raise FailedPrecondition(
                    f"{directory} (mode {stat.S_IMODE(mode):04o}) is not searchable by others: "
                    "a remapped container's root cannot reach its root filesystem below it"
                )

    def _sweep_remapped(self, keep: set[str]) -> None:
        """Unmount remapped root filesystems of containers this agent no longer has (one that
        died between a mount and saving the record, or a record that did not load)."""
        if not self.remapped_root.is_dir():
            return
        for path in self.remapped_root.iterdir():
            if path.name not in keep and re.fullmatch(r"[0-9a-f]{64}", path.name):
                log.info("unmounting a stale root filesystem", extra={"container": path.name})
                unmount(path)
                with contextlib.suppress(OSError):
                    path.rmdir()

    def _prepare(self, record: ContainerRecord, image_config: dict) -> None:
        """Directories, overlay root filesystem, /etc files and the OCI bundle."""
        cdir = self.dir(record.id)
        cdir.make()
        id_map = record.id_map
        owner = id_map.root if id_map is not None else None
        if owner is not None:
            # The container's root owns its root directory and everything it writes (the
            # upper dir cannot be idmapped); the work dir is overlayfs's, made alike.
            for directory in (cdir.upper, cdir.work):
                os.chown(directory, *owner)
        write_init_layer(cdir.init, secrets=bool(record.config.secrets))
        self._ensure_rootfs(record)
        rootfs = self.rootfs(record)
        config = record.config
        hostname = config.hostname or record.id[:12]
        args, env, cwd = resolve_process(image_config, config, hostname=hostname)
        uid, gid, extra_gids = resolve_user(rootfs, effective_user(image_config, config))
        etc_files = prepare_etc_files(cdir.etc, hostname, config.network_mode, owner=owner)
        mounts = [self._volume_source(m, owner) for m in config.mounts]
        runtime_config = build_runtime_config(
            rootfs=rootfs,
            args=args,
            env=env,
            cwd=cwd,
            uid=uid,
            gid=gid,
            additional_gids=extra_gids,
            hostname=hostname,
            config=config,
            mounts=mounts,
            etc_files=etc_files,
            cgroups_path=self.cgroups_path(record.id),
            network_namespace_path=(
                str(self.networks.netns_path(record.id)) if on_network(config) else None
            ),
            secrets_dir=self.secrets.path(record.id) if config.secrets else None,
            idmap=id_map,
        )
        (cdir.bundle / "config.json").write_text(json.dumps(runtime_config, indent=1))

    def _volume_source(self, mount: MountSpec, owner: tuple[int, int] | None) -> MountSpec:
        """Named volumes live under `<data>/volumes/<name>`; paths are bind mounts. A volume
        made for a remapped container belongs to its root (`owner`), as Docker's do; an
        existing one is used as it is."""
        if mount.source.startswith("/"):
            if not Path(mount.source).exists():
                raise InvalidArgument(
                    f"bind mount source {mount.source} does not exist on this node"
                )
            return mount
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", mount.source):
            raise InvalidArgument(f"invalid volume name {mount.source!r}")
        path = self.volumes / mount.source
        self.volumes.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            pass
        else:
            if owner is not None:
                os.chown(path, *owner)
        return MountSpec(str(path), mount.target, mount.read_only)

    def _discard(self, record: ContainerRecord) -> None:
        cdir = self.dir(record.id)
        self.secrets.release(record.id)
        unmount(cdir.rootfs)
        if record.idmap:
            remapped = self.rootfs(record)
            unmount(remapped)
            with contextlib.suppress(OSError):
                remapped.rmdir()
        shutil.rmtree(cdir.root, ignore_errors=True)

    # Start, stop, kill, remove ------------------------------------------------------------------

    async def start(self, ref: str) -> ContainerRecord:
        record = self.resolve(ref)
        async with self.lock(record.id):
            if record.state == RUNNING:
                raise FailedPrecondition(f"container {record.name} is already running")
            record.stopped_by_user = False
            await self._run(record)
            if record.state != RUNNING:
                raise FailedPrecondition(
                    f"container {record.name} failed to start: {record.error}",
                    reason="CONTAINER_START_FAILED",
                    metadata={"container_id": record.id, "failure_reason": START_FAILED},
                )
        return record

    async def _run(self, record: ContainerRecord) -> None:
        """Start the container's process under a new conmon. Caller holds the lock."""
        cdir = self.dir(record.id)
        began = time.perf_counter()

        async def create() -> int:
            return await self.runtime.create(
                record.id,
                cdir.bundle,
                log_path=cdir.log,
                exit_dir=cdir.exit_dir,
                persist_dir=cdir.persist,
                pid_file=cdir.pid_file,
                conmon_pid_file=cdir.conmon_pid_file,
                terminal=record.config.tty,
                stdin=record.config.stdin_open,
            )

        try:
            await self._attach(record)
            # Filled again when a reboot emptied /run (a no-op when mounted).
            await self.secrets.ensure(record.id, record.name, record.config.secrets, record.id_map)
            await asyncio.to_thread(self._ensure_rootfs, record)
            try:
                record.pid = await create()
            except AlreadyExists:
                # runc still holds a previous run (its cleanup was interrupted): clear it.
                await self.runtime.delete(record.id, force=True)
                record.pid = await create()
            await self.runtime.start(record.id)
        except Exception as exc:
            record.state = EXITED
            # Docker's codes: 127 no such command, 126 not executable, else 128.
            record.exit_code = exc.exit_code if isinstance(exc, ProcessNotStarted) else 128
            record.error = str(exc)
            record.failure_reason = START_FAILED
            record.finished_at = time.time()
            await self.runtime.delete(record.id, force=True)
            await self._detach(record)
            await self._save(record)
            log.warning("container failed to start: %s", exc, extra={"container": record.id})
            return
        metrics.START_SECONDS.observe(time.perf_counter() - began)
        record.state = RUNNING
        record.error = ""
        record.failure_reason = ""
        record.oom_killed = False
        record.started_at = time.time()
        record.finished_at = None
        record.health = {}
        # Before the save, which may fail (a full disk): the process runs either way.
        self._start_watching(record)
        self._start_health(record)
        await self._save(record)

    async def withdraw(self, container_id: str) -> None:
        """Take a replica out of traffic before the cluster stops it (the drain): its status
        says so (every node's routing mesh drops it) and its service's DNS names leave it."""
        async with self.lock(container_id):
            record = self.records.get(container_id)
            if record is None or record.withdrawn:
                return
            record.withdrawn = True
            await self._save(record)
        await self.names.sync(self.records.values())

    async def stop(self, ref: str, timeout: float | None = None) -> ContainerRecord:
        """SIGTERM, then SIGKILL after `timeout` seconds (None: 10; 0: SIGKILL at once)."""
        record = self.resolve(ref)
        timeout = DEFAULT_STOP_TIMEOUT if timeout is None else timeout
        record.stopped_by_user = True
        if record.state == RESTARTING:
            async with self.lock(record.id):
                # The restart may have held the lock and started the process meanwhile:
                # then it is stopped as any running container is.
                if record.state == RESTARTING:
                    record.state = EXITED
                    await self._save(record)
                    return record
        if record.state != RUNNING:
            return record
        if timeout > 0:
            await self._signal(record, signal.SIGTERM)
        if timeout <= 0 or not await self._wait_exited(record, timeout):
            await self._signal(record, signal.SIGKILL)
            await self._wait_exited(record, 10)
        return record

    async def kill(self, ref: str, sig: str | int = "KILL") -> None:
        record = self.resolve(ref)
        number = parse_signal(sig)
        if record.state != RUNNING:
            raise FailedPrecondition(
                f"container {record.name} is not running",
                reason="CONTAINER_NOT_RUNNING",
                metadata={"container_id": record.id},
            )
        if number in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            record.stopped_by_user = True
        await self._signal(record, number, strict=True)

    async def _signal(self, record: ContainerRecord, number: int, *, strict: bool = False) -> None:
        """Signal the main process. It may have exited a moment ago, before the monitor saw
        it: then stop and remove have nothing left to do, and kill reports it (strict)."""
        try:
            await self.runtime.kill(record.id, number)
        except (FailedPrecondition, NotFound):
            state = await self.runtime.state(record.id)
            if state is not None and state.status == "running":
                raise
            if strict:
                raise FailedPrecondition(f"container {record.name} is not running") from None

    async def _wait_exited(self, record: ContainerRecord, timeout: float) -> bool:
        try:
            # Not wait_for: Python 3.11's drops a cancellation that arrives with the exit.
            async with asyncio.timeout(timeout):
                await self._until(lambda: record.state != RUNNING)
            return True
        except TimeoutError:
            return False

    async def _until(self, condition: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(condition)

    async def remove(self, ref: str, force: bool = False) -> None:
        record = self.resolve(ref)
        if record.state == RUNNING:
            if not force:
                raise FailedPrecondition(
                    f"container {record.name} is running: stop it first or remove with force",
                    reason="CONTAINER_RUNNING",
                    metadata={"container_id": record.id},
                )
            record.stopped_by_user = True
            await self._signal(record, signal.SIGKILL)
            await self._wait_exited(record, 10)
        async with self.lock(record.id):
            if self.records.get(record.id) is not record:
                # Another remove (a retry, the converger) got here first: as if this one had
                # come a moment later.
                raise container_not_found(ref)
            task = self._restarts.pop(record.id, None)
            if task is not None:
                task.cancel()
            await self._stop_health(record)
            self.watcher.unwatch(record.id)
            self._orphans.discard(record.id)
            metrics.EXIT_WATCHES.set(len(self.watcher))
            await self.runtime.delete(record.id, force=True)
            cgroups.remove_cgroup(self.cgroups_path(record.id), parents=True)
            await self._detach(record)
            del self.records[record.id]
            await asyncio.to_thread(self._discard, record)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await STATUSES.delete(self.store, record.id)
        self._update_gauges()

    async def wait(self, ref: str) -> ContainerRecord:
        record = self.resolve(ref)
        await self._until(lambda: record.state == EXITED or record.id not in self.records)
        return record

    def list(
        self,
        *,
        all: bool = False,
        labels: dict[str, str] | None = None,
        name: str = "",
        state: str = "",
    ) -> list[ContainerRecord]:
        result = []
        for record in self.records.values():
            if not all and not state and record.state != RUNNING:
                continue
            if state and record.state != state:
                continue
            if name and name not in record.name:
                continue
            if labels and any(record.config.labels.get(k) != v for k, v in labels.items()):
                continue
            result.append(record)
        return sorted(result, key=lambda r: r.created_at, reverse=True)

    # Networks --------------------------------------------------------------------------------

    async def _attach(self, record: ContainerRecord) -> None:
        """Before a run: the container's namespace on its network, its address in its
        /etc/hosts, and berth's table with it."""
        if not on_network(record.config) or record.network:
            return
        attachment = await self.networks.attach(
            record.id, record.config.network_mode, self._attachments(exclude=record.id)
        )
        record.network = attachment.to_json()
        try:
            # On disk at once (not reported yet): an agent killed before the start finds the
            # attachment in the record and detaches it, its address lease included.
            await asyncio.to_thread(self.dir(record.id).save, record)
            if record.config.ports:
                # Before the start, as docker-proxy's bind: a taken port fails the start.
                held = self.ports.hold(record.id, record.config.ports)
                record.network["ports"] = to_json(held)
            hostname = record.config.hostname or record.id[:12]
            cdir = self.dir(record.id)
            owner = record.id_map.root if record.id_map is not None else None
            await asyncio.to_thread(
                prepare_etc_files,
                cdir.etc,
                hostname,
                record.config.network_mode,
                address=attachment.ip_address,
                nameserver=attachment.gateway,
                owner=owner,
            )
            await self._sync_network_rules()
        except BaseException:
            await self._detach(record)
            raise

    async def _detach(self, record: ContainerRecord) -> None:
        """After a run (or a failed start, or at removal): CNI DEL, the namespace gone; the
        network's bridge and slice too when this was the node's last container on it."""
        if not record.network:
            return
        attachment = Attachment.from_json(record.network)
        record.network = {}
        self.ports.release(record.id)
        others = self._attachments(exclude=record.id)
        try:
            await self.networks.detach(record.id, attachment, others)
        finally:
            await self._sync_network_rules()

    def _attachments(self, exclude: str = "") -> list[Attachment]:
        return [
            Attachment.from_json(r.network)
            for r in self.records.values()
            if r.network and r.id != exclude
        ]

    def _hold_adopted_ports(self) -> None:
        """A restarted agent holds its running containers' ports again (the same ones)."""
        for record in self.records.values():
            if record.state == RUNNING and record.network.get("ports"):
                try:
                    self.ports.hold(record.id, bindings_of(record.network))
                except FailedPrecondition as exc:
                    log.warning("%s", exc, extra={"container": record.id})

    async def _mesh_changed(self, ports: list[MeshPort]) -> None:
        self.networks.mesh = ports
        if self.mesh is not None:
            self.networks.mesh_networks = self.mesh.networks()
        await self._sync_network_rules()

    async def _sync_network_rules(self) -> None:
        try:
            await self.networks.sync_rules(self._attachments())
        except FailedPrecondition as exc:
            log.error("cannot write berth's nftables table: %s", exc)
        await self.names.sync(self.records.values())

    def in_use_layers(self) -> set[str]:
        return {chain for r in self.records.values() for chain in r.chain_ids}
