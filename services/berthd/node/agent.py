"""The node agent's core: images, containers and what can be asked of a container.

Everything the gRPC servicer needs, with no gRPC in it: the servicer converts messages and
calls one method here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from berthd.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from berthd.common.rpc.registry import RegistryApi
from berthd.common.state.nodes import NODE_LAYERS, NodeLayers, NodeRecord
from berthd.common.storage import Storage
from berthd.common.store import Store
from berthd.node import cgroups, diff, metrics
from berthd.node.containers import ContainerManager
from berthd.node.layers import ImageRecord, ImageStore, LayerStore, PullEvent, pull_image
from berthd.node.logs import LogRecord, follow_logs, read_logs
from berthd.node.records import CREATED, EXITED, RUNNING, ContainerRecord
from berthd.node.runtime import Runtime
from berthd.node.spec import effective_user, resolve_user

STATS_INTERVAL = 1.0  # between the samples of a stream
# Between the two cgroup readings behind a first (or only) sample's CPU percent: long enough for
# a busy container to show (the kernel charges CPU time at least every scheduler tick), short
# enough for `berth stats --no-stream` over many containers to stay interactive.
FIRST_SAMPLE_INTERVAL = 0.1

log = logging.getLogger("berthd.node.agent")


@dataclass(frozen=True)
class StatsSample:
    time: float
    cpu_nanos: int
    cpu_percent: float
    memory_bytes: int
    memory_limit_bytes: int
    pids: int


@dataclass(frozen=True)
class _Reading:
    time: float  # wall clock, for the sample's timestamp
    cpu: cgroups.CpuReading
    raw: cgroups.CgroupStats | None  # None: not running, or its cgroup is gone


def _sample(before: cgroups.CpuReading | None, after: _Reading) -> StatsSample:
    """A sample from a full reading and the CPU counter before it (None: there was none)."""
    raw = after.raw
    return StatsSample(
        time=after.time,
        cpu_nanos=after.cpu.cpu_nanos,
        cpu_percent=cgroups.cpu_percent(before, after.cpu) if before and raw else 0.0,
        memory_bytes=raw.memory_bytes if raw else 0,
        memory_limit_bytes=raw.memory_limit_bytes if raw else 0,
        pids=raw.pids if raw else 0,
    )


def check_exec(command: list[str], env: list[str], working_dir: str, user: str) -> None:
    """Refuse what runc would refuse, before it runs, in the words of the request's fields."""
    if not command:
        raise InvalidArgument("exec needs a command", field="command")
    for field, values in (("command", command), ("env", env), ("working dir", [working_dir])):
        if any("\0" in value for value in values):
            raise InvalidArgument(f"the {field} contains a NUL byte", field=field.replace(" ", "_"))
    if "\0" in user:
        raise InvalidArgument("the user contains a NUL byte", field="user")
    for item in env:
        if not item.partition("=")[0] or "=" not in item:
            raise InvalidArgument(f"environment entry {item!r} is not KEY=VALUE", field="env")
    if working_dir and not working_dir.startswith("/"):
        raise InvalidArgument(
            f"the working dir {working_dir!r} is not an absolute path", field="working_dir"
        )


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class NodeAgent:
    def __init__(
        self,
        data_dir: Path,
        node_id: str,
        labels: dict[str, str],
        registry: RegistryApi,
        manager: ContainerManager,
        runtime: Runtime,
        images: ImageStore,
        layers: LayerStore,
        pull_concurrency: int = 3,
        store: Store | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.disk = Storage("the node's data directory", data_dir)
        self.node_id = node_id
        self.labels = labels
        self.registry = registry
        self.containers = manager
        self.runtime = runtime
        self.images = images
        self.layers = layers
        self.pull_concurrency = pull_concurrency
        self.store = store
        self.address = ""
        self.runtime_version = ""

    async def describe(self) -> NodeRecord:
        """This node as it registers itself (`nodes/<id>`) and answers GetNode."""
        if not self.runtime_version:
            self.runtime_version = await self.runtime.version()
        return NodeRecord(
            id=self.node_id,
            address=self.address,
            labels=self.labels,
            cpus=os.cpu_count() or 1,
            memory_bytes=host_memory_bytes(),
            version=version("berth"),
            runtime_version=self.runtime_version,
        )

    # Images ------------------------------------------------------------------------------

    async def pull(self, reference: str, progress: Callable[[PullEvent], None]) -> ImageRecord:
        blobs = self.data_dir / "downloads"
        # Downloads, layers and image records all live in the data directory: a full disk
        # fails the pull as STORAGE_FULL, and pull_image leaves nothing partial behind.
        with self.disk.guard(f"cannot pull {reference}", image=reference):
            blobs.mkdir(parents=True, exist_ok=True)
            result = await pull_image(
                self.registry,
                self.images,
                self.layers,
                reference,
                blobs,
                progress,
                concurrency=self.pull_concurrency,
            )
        metrics.PULLED_BYTES.inc(result.bytes_downloaded)
        metrics.LAYER_CACHE.labels("hit").inc(result.layers_cached)
        metrics.LAYER_CACHE.labels("miss").inc(result.layers_pulled)
        await self.publish_layers()
        return result.image

    async def publish_layers(self) -> None:
        """Tell the cluster which layers this node holds, for image locality in placement."""
        if self.store is None:
            return
        held = {layer.digest: layer.size for image in self.images.list() for layer in image.layers}
        try:
            await NODE_LAYERS.put(self.store, self.node_id, NodeLayers(held))
        except Unavailable as exc:  # placement just loses locality until the next pull
            log.warning("cannot publish the node's layers: %s", exc)

    async def remove_image(self, reference: str) -> list[str]:
        image = self.images.get(reference)
        users = [r.name for r in self.containers.records.values() if r.image_digest == image.digest]
        if users:
            raise FailedPrecondition(
                f"image {reference} is used by container {users[0]}; remove the container first"
            )
        freed = self.images.remove(image.digest, in_use=self.containers.in_use_layers())
        for chain_id in freed:
            await asyncio.to_thread(self.layers.remove, chain_id)
        await self.publish_layers()
        return freed

    # Logs, exec, stats ---------------------------------------------------------------------

    async def logs(
        self, ref: str, follow: bool, tail: int, since: datetime | None
    ) -> AsyncIterator[LogRecord]:
        record = self.containers.resolve(ref)
        path = self.containers.dir(record.id).log
        if tail < 0:
            raise InvalidArgument("tail must not be negative")
        if not follow:
            for line in await asyncio.to_thread(read_logs, path, tail, since):
                yield line
            return

        def finished() -> bool:
            current = self.containers.records.get(record.id)
            return current is None or current.state not in (CREATED, RUNNING)

        # Until the container (created and not started yet, or running) stops running and its
        # last lines are out.
        async for line in follow_logs(path, since, stop=finished, tail=tail):
            yield line

    async def exec(
        self, ref: str, command: list[str], env: list[str], cwd: str, user: str
    ) -> asyncio.subprocess.Process:
        record = self.containers.resolve(ref)
        if record.state != RUNNING:
            raise FailedPrecondition(f"container {record.name} is not running")
        check_exec(command, env, cwd, user)
        rootfs = self.containers.rootfs(record)
        image = self.images.get(record.image_digest)
        uid, gid, _ = resolve_user(rootfs, user or effective_user(image.config, record.config))
        if record.id_map is not None:
            record.id_map.check("uid", [uid])
            record.id_map.check("gid", [gid])
        return await self.runtime.exec(
            record.id,
            command,
            env=env,
            cwd=cwd or record.config.working_dir or "/",
            uid=uid,
            gid=gid,
        )

    async def stats(self, ref: str, stream: bool) -> AsyncIterator[StatsSample]:
        """A sample, then (with `stream`) one every STATS_INTERVAL until the container exits.
        The first one's CPU percent is over FIRST_SAMPLE_INTERVAL, each later one's since the
        one before, as `docker stats` compares its previous and current sample."""
        record = self.containers.resolve(ref)
        previous = self._cpu_reading(record)
        await asyncio.sleep(FIRST_SAMPLE_INTERVAL if record.state == RUNNING else 0)
        while True:
            current = self._reading(record)
            yield _sample(previous, current)
            if not stream or record.state == EXITED:
                return
            previous = current.cpu if current.raw else None
            await asyncio.sleep(STATS_INTERVAL)

    async def stats_many(self, refs: list[str]) -> list[tuple[str, StatsSample]]:
        """One sample of each container (every running one when refs is empty), (id, sample)
        in the order asked: every CPU counter read, one FIRST_SAMPLE_INTERVAL for all, then
        every cgroup read in full."""
        if refs:
            records = [self.containers.resolve(ref) for ref in refs]
        else:
            running = (r for r in self.containers.records.values() if r.state == RUNNING)
            records = sorted(running, key=lambda r: r.name)
        before = [self._cpu_reading(record) for record in records]
        if any(record.state == RUNNING for record in records):
            await asyncio.sleep(FIRST_SAMPLE_INTERVAL)
        after = [self._reading(record) for record in records]
        return [
            (record.id, _sample(first, second))
            for record, first, second in zip(records, before, after, strict=True)
        ]

    def _cpu_reading(self, record: ContainerRecord) -> cgroups.CpuReading | None:
        """The CPU counter alone, for the first of two readings: the memory and pids figures
        come from the second (a full reading costs about ten times as much)."""
        if record.state != RUNNING:
            return None
        nanos = cgroups.read_cpu(self.containers.cgroups_path(record.id))
        return None if nanos is None else cgroups.CpuReading(time.monotonic_ns(), nanos)

    def _reading(self, record: ContainerRecord) -> _Reading:
        running = record.state == RUNNING
        raw = cgroups.read_stats(self.containers.cgroups_path(record.id)) if running else None
        cpu = cgroups.CpuReading(time.monotonic_ns(), raw.cpu_nanos if raw else 0)
        return _Reading(time.time(), cpu, raw)

    # Filesystem changes ----------------------------------------------------------------------

    async def changes(self, ref: str) -> list[tuple[str, str]]:
        record = self.containers.resolve(ref)
        upper = self.containers.dir(record.id).upper
        lowers = self.containers.lower_dirs(record)
        return await asyncio.to_thread(diff.changes, upper, lowers, record.id_map)

    async def export(
        self, ref: str, repository: str, pause: bool = False
    ) -> tuple[diff.ExportResult, str]:
        """Pack the container's changes as a layer and push it; the bytes never leave the node
        except to the registry. With `pause`, a running container is frozen while its upper dir
        is read (one consistent snapshot) and thawed before the push. Returns the layer and its
        media type."""
        record = self.containers.resolve(ref)
        upper = self.containers.dir(record.id).upper
        scratch = self.data_dir / "downloads"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch, suffix=".tar.gz") as out:
            state = await self.runtime.state(record.id) if pause else None
            frozen = state is not None and state.status == "running"
            if frozen:
                await self.runtime.pause(record.id)
            try:
                result = await asyncio.to_thread(diff.export_layer, upper, out, idmap=record.id_map)
            finally:
                if frozen:
                    await self.runtime.resume(record.id)
            out.flush()
            await self.registry.push_blob(repository, Path(out.name), result.digest, result.size)
        return result, "application/vnd.oci.image.layer.v1.tar+gzip"


def default_node_id() -> str:
    return platform.node() or "node"
