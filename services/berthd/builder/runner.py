"""RUN steps on the cluster: one container per step, its output streamed, its changes a layer.

The step's state is an image in the cache repository (the executor pushes it). The cluster
places the container (preferring a node that holds the state's layers), the node pulls the
image, runs the command with runc and keeps the container after it exits; the node then packs
the container's upper dir as a layer and pushes it straight to the registry, so layer bytes
never pass through the builder. The container is removed whatever happens.

runc creates a missing working directory (mode 0755, root's) before it starts the command, and
it lands in the step's layer; the executor's WORKDIR step normally made it already, owned by
USER as BuildKit does, so this only matters for a base image whose WorkingDir is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from berth.client.cluster import ClusterContainer
from berthd.builder.errors import (
    NO_NODE,
    RUN_FAILED,
    RUN_NOT_STARTED,
    RUN_START_TIMEOUT,
    annotate,
)
from berthd.common.containers import ContainerConfig
from berthd.common.errors import BerthError, FailedPrecondition, Unavailable
from berthd.common.oci import mediatypes
from berthd.common.oci.manifest import Descriptor
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.node import NodeApi
from berthd.common.state.containers import IMAGE_PULL_FAILED, SECRET_UNAVAILABLE

log = logging.getLogger("berthd.builder.runner")

BUILD_LABEL = "berth.build"  # a step container's build id
BUILDER_LABEL = "berth.builder"  # the builder instance running that build (reaper.py)
# How often the container's state is read while its node pulls and creates it.
POLL_SECONDS = 0.02
STARTED = ("running", "exited")
# What a node retries by itself (a registry or the cluster away a moment): the step waits for
# it, up to its start timeout, instead of failing on the first report.
TRANSIENT_FAILURES = frozenset({IMAGE_PULL_FAILED, SECRET_UNAVAILABLE})


@dataclass(frozen=True)
class RunSpec:
    """One RUN step: where it comes from in the Dockerfile, and what the container runs."""

    step: int  # its number in the build
    line: int
    instruction: str  # as written, for messages
    image: str  # the state, `berth/build-cache@sha256:...`
    argv: list[str]
    env: list[str]
    working_dir: str
    user: str
    build_id: str
    name: str


@dataclass(frozen=True)
class RunResult:
    """The layer the step added (None when it changed nothing) and its diff_id."""

    layer: Descriptor | None
    diff_id: str = ""


# A line of output: the stream ("stdout" or "stderr") and the bytes, newline included.
Output = Callable[[str, bytes], None]


class RunFailed(FailedPrecondition):
    """The command exited non-zero (BuildKit's words)."""

    def __init__(self, spec: RunSpec, exit_code: int) -> None:
        super().__init__(
            f"Dockerfile:{spec.line}: {spec.instruction}: process "
            f'"{" ".join(spec.argv)}" did not complete successfully: exit code: {exit_code}',
            reason=RUN_FAILED,
            metadata={"step": spec.step, "line": spec.line, "exit_code": exit_code},
        )
        self.exit_code = exit_code


def _not_started(spec: RunSpec, node_id: str, message: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"Dockerfile:{spec.line}: {spec.instruction}: {message}",
        reason=RUN_NOT_STARTED,
        metadata={"step": spec.step, "line": spec.line, "node_id": node_id},
    )


class Runner:
    def __init__(
        self,
        cluster: ClusterApi,
        repository: str,
        *,
        network: str = "none",
        instance: str = "",
        start_timeout: float = 300.0,
        node_api: Callable[[str], NodeApi] = NodeApi,
    ) -> None:
        self.cluster = cluster
        self.node_api = node_api  # a node agent's API by its address
        self.repository = repository  # where the node pushes the step's layer
        self.network = network
        # This builder's instance id, on every step container it runs.
        self.owner = {BUILDER_LABEL: instance} if instance else {}
        # A node retries a container it cannot create (a bad USER, a failing pull) forever;
        # past this the step fails instead of hanging.
        self.start_timeout = start_timeout
        self._removals: set[asyncio.Future[None]] = set()

    async def run(self, spec: RunSpec, output: Output) -> RunResult:
        """Run the step; `output` gets each line it prints (on the event loop). Raises
        RunFailed on a non-zero exit, FailedPrecondition (NO_NODE) when no node can take it."""
        config = ContainerConfig(
            image=spec.image,
            name=spec.name,
            entrypoint=list(spec.argv),
            env=list(spec.env),
            working_dir=spec.working_dir,
            user=spec.user,
            labels={BUILD_LABEL: spec.build_id} | self.owner,
            restart_policy="no",
            network_mode=self.network,
        )
        try:
            container = await self.cluster.run(config)
        except FailedPrecondition as exc:
            # The scheduler's refusal: every node's reason stays in the violations.
            annotate(exc, {"step": spec.step, "line": spec.line, "cause": exc.reason})
            exc.details = replace(exc.details, reason=NO_NODE)
            raise
        try:
            return await self._complete(container.id, spec, output)
        finally:
            # Shielded: a cancelled build still removes its container (the task is kept
            # referenced until it is done, since the cancelled build no longer waits for it).
            removal = asyncio.ensure_future(self._remove(container.id))
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)
            await asyncio.shield(removal)

    async def _complete(self, container: str, spec: RunSpec, output: Output) -> RunResult:
        info = await self._started(container, spec)
        await self._follow(container, output)
        exit_code = await self.cluster.wait(container)
        if exit_code != 0:
            raise RunFailed(spec, exit_code)
        node = self.node_api((await self.cluster.node(info.node_id)).address)
        if not await node.has_changes(container):
            return RunResult(None)
        digest, diff_id, size = await node.export_layer(container, self.repository)
        return RunResult(Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, digest, size), diff_id)

    async def _started(self, container: str, spec: RunSpec) -> ClusterContainer:
        """The container once its node has started it (or it already exited)."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            info = await self.cluster.inspect(container)
            if info.state in STARTED:
                if info.error:  # runc refused to start it: no process ever ran
                    raise _not_started(spec, info.node_id, info.error)
                return info
            if info.error and info.failure_reason not in TRANSIENT_FAILURES:
                # Its node cannot create it (the image, the user): trying again changes nothing.
                raise _not_started(
                    spec, info.node_id, f"node {info.node_id} cannot run the step: {info.error}"
                )
            if time.monotonic() > deadline:
                cause = f": {info.error}" if info.error else " (see that node agent's log)"
                raise Unavailable(
                    f"Dockerfile:{spec.line}: {spec.instruction}: the step's container did not "
                    f"start within {self.start_timeout:g}s on node {info.node_id}{cause}",
                    reason=RUN_START_TIMEOUT,
                    metadata={"step": spec.step, "line": spec.line, "node_id": info.node_id},
                )
            await asyncio.sleep(POLL_SECONDS)

    async def _follow(self, container: str, output: Output) -> None:
        """Every line the container prints, newline included, until it exits (its last bytes
        included, with no newline if it wrote none); stdout and stderr apart."""
        pending: dict[str, bytes] = {}
        async with contextlib.aclosing(self.cluster.logs(container, follow=True)) as records:
            async for record in records:
                stream = record.stream or "stdout"
                *lines, rest = (pending.pop(stream, b"") + record.data).split(b"\n")
                for line in lines:
                    output(stream, line + b"\n")
                if rest:
                    pending[stream] = rest
        for stream, rest in pending.items():
            output(stream, rest)

    async def _remove(self, container: str) -> None:
        try:
            await self.cluster.remove(container, force=True)
        except BerthError as exc:
            log.warning("cannot remove build container %s: %s", container, exc)
