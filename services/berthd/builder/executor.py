"""Build execution: a Dockerfile and its context in, an image in berth's registry out.

Stages are built in order (only those the target needs). Every instruction is one step with a
cache key (berthd.builder.cache); a step found in the cache is not executed: its record gives
the layer and history entry it made before. Otherwise RUN runs on the cluster (runner.py),
COPY/ADD layers are made here from the context or an earlier stage's files (context.py,
layers.py, layerfiles.py), and the other instructions only change the config
(instructions.py), which is recomputed from the Dockerfile on every build, hits included.

Layers live in the cache repository (`berth/build-cache`): COPY layers are pushed there, nodes
push RUN layers there. A state's image (an untagged manifest over its layers) is pushed there
before a RUN runs on it, and at the end of every stage, so every cached layer stays referenced
by a manifest and the registry's garbage collection keeps it. The final image is written under
each tag (its layers mounted into the tag's repository) and recorded as built in the builder's
own `builds/<digest>` family (berthd.common.state.images); its config's `created` is the time
of its last step, so a fully cached rebuild writes the same digest, and one whose tags already
name that digest writes nothing.

The registry, the cluster and the nodes are called through berthd.common.rpc, on the event
loop; `emit` is called on the event loop too (RUN output included).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from berthd.builder import metrics
from berthd.builder.cache import (
    CACHE_REPOSITORY,
    SCRATCH,
    BuildCache,
    CacheRecord,
    PruneResult,
    step_key,
)
from berthd.builder.context import DEFAULT_MAX_FILES, BuildContext, SourceMatch, sources_digest
from berthd.builder.dockerfile import (
    Dockerfile,
    DockerfileError,
    Instruction,
    Stage,
    StageScope,
    Step,
    parse_dockerfile,
    stages_needed,
    unused_build_args,
)
from berthd.builder.errors import (
    BASE_IMAGE_NOT_FOUND,
    BUILD_ARG_INVALID,
    DOCKERFILE_NOT_FOUND,
    TAG_INVALID,
    annotate,
    move_field,
)
from berthd.builder.fstree import SymlinkLoop, Tree, clean_parts, directory
from berthd.builder.instructions import apply_instruction, shell_command
from berthd.builder.layerfiles import LayerFiles
from berthd.builder.layers import LayerBlob, copy_layer, resolve_chown, write_layer
from berthd.builder.model import (
    BuildEvent,
    BuildOptions,
    BuildProgress,
    BuildResult,
    ProgressState,
    StepEvent,
    StepOutput,
    StepStatus,
)
from berthd.builder.runner import RunFailed, Runner, RunResult, RunSpec
from berthd.builder.state import State, history_entry, scratch_state
from berthd.common.errors import BerthError, DataLoss, InvalidArgument, error_for_code
from berthd.common.images import ImageStore, WrittenImage
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import digest_bytes, quoted
from berthd.common.oci.manifest import (
    Descriptor,
    as_oci_layer,
    build_image_manifest,
    encode_json,
)
from berthd.common.oci.reference import Reference, parse_reference
from berthd.common.state.images import BUILDS, BuildRecord
from berthd.common.storage import Storage
from berthd.common.store import Store

log = logging.getLogger("berthd.builder")

FILESYSTEM_STEPS = ("RUN", "COPY", "ADD")
# Context progress goes out at most this often (and once when the context is complete).
CONTEXT_PROGRESS_SECONDS = 0.1


def _tag_reference(text: str) -> Reference:
    try:
        reference = parse_reference(text)
    except InvalidArgument as exc:
        annotate(exc, {"tag": text}, reason=TAG_INVALID)
        raise
    if reference.registry is not None or reference.digest is not None:
        raise InvalidArgument(
            f"invalid tag {quoted(text)}: name the image name[:tag] in berth's registry "
            "(push it elsewhere afterwards with `berth push`)",
            reason=TAG_INVALID,
            metadata={"tag": text},
            field="options.tags",
        )
    return reference


def _check_build_args(build_args: dict[str, str]) -> None:
    """A build arg's name is what ARG declares: not empty, no `=` and no whitespace."""
    for name in build_args:
        if not name or "=" in name or any(c.isspace() for c in name):
            raise InvalidArgument(
                f"invalid build arg name {quoted(name)}: want NAME=VALUE",
                reason=BUILD_ARG_INVALID,
                metadata={"name": name},
                field="options.build_args",
            )


class _ContextProgress:
    """Progress "context" while the context arrives: bytes so far, at most every
    CONTEXT_PROGRESS_SECONDS, then DONE with the total and the time it took."""

    def __init__(self, emit: Callable[[BuildEvent], None]) -> None:
        self.emit = emit
        self.began = time.monotonic()
        self.sent_at: float | None = None
        self.size = 0

    def received(self, size: int) -> None:
        self.size = size
        now = time.monotonic()
        if self.sent_at is None or now - self.sent_at >= CONTEXT_PROGRESS_SECONDS:
            self.sent_at = now
            self.emit(BuildProgress("context", ProgressState.DOWNLOADING, "", size, 0, True))

    def done(self) -> None:
        self.emit(
            BuildProgress(
                "context",
                ProgressState.DONE,
                "",
                self.size,
                self.size,
                True,
                duration=time.monotonic() - self.began,
            )
        )


# --- the service's core ------------------------------------------------------------------------


class Builder:
    def __init__(
        self,
        store: Store,
        images: ImageStore,
        cache: BuildCache,
        runner: Runner,
        scratch: Path,
        max_context_bytes: int,
        max_context_files: int = DEFAULT_MAX_FILES,
    ) -> None:
        self.store = store  # for the builder's own records of the images it built
        self.images = images
        self.registry = images.registry
        self.cache = cache
        self.runner = runner
        self.scratch = scratch
        # Contexts, spools and layers go in scratch: a full disk fails a build as STORAGE_FULL.
        self.disk = Storage("the builder's scratch directory", scratch)
        self.max_context_bytes = max_context_bytes
        self.max_context_files = max_context_files
        self.running: set[str] = set()  # ids of the builds in progress (for the reaper)

    async def build(
        self,
        options: BuildOptions,
        context_chunks: AsyncIterator[bytes],
        emit: Callable[[BuildEvent], None],
    ) -> BuildResult:
        began = time.monotonic()
        outcome = "error"
        try:
            with self.disk.guard("cannot build"):
                result = await self._build(options, context_chunks, emit)
            outcome = "ok"
            return result
        except RunFailed:
            outcome = "failed"
            raise
        finally:
            metrics.BUILDS.labels(outcome).inc()
            metrics.BUILD_SECONDS.observe(time.monotonic() - began)

    async def _build(
        self,
        options: BuildOptions,
        context_chunks: AsyncIterator[bytes],
        emit: Callable[[BuildEvent], None],
    ) -> BuildResult:
        tags = [_tag_reference(t) for t in options.tags]
        _check_build_args(options.build_args)
        build_id = uuid.uuid4().hex[:12]
        scratch = self.scratch / f"build-{build_id}"
        scratch.mkdir(parents=True)
        context: BuildContext | None = None
        build: _Build | None = None
        in_context = None if options.dockerfile_content else options.dockerfile
        self.running.add(build_id)
        try:
            progress = _ContextProgress(emit)
            context = await BuildContext.receive(
                context_chunks,
                scratch,
                self.max_context_bytes,
                self.max_context_files,
                progress.received,
            )
            progress.done()
            await asyncio.to_thread(context.apply_dockerignore, in_context)
            text = options.dockerfile_content or context.read_text(options.dockerfile)
            if text is None:
                raise InvalidArgument(
                    f"Dockerfile not found in the build context: {options.dockerfile}",
                    reason=DOCKERFILE_NOT_FOUND,
                    metadata={"path": options.dockerfile},
                    field="options.dockerfile",
                )
            dockerfile = parse_dockerfile(text, options.build_args)
            stages = stages_needed(dockerfile, options.target or None)
            unused = unused_build_args(dockerfile, stages, options.build_args)
            build = _Build(self, options, dockerfile, stages, context, emit, build_id, scratch)
            if unused:
                names = ", ".join(unused)
                build.warn(f"[Warning] One or more build-args [{names}] were not consumed")
            state = await build.run()
            return await build.export(state, tags)
        except DockerfileError as exc:
            if in_context is None:
                move_field(exc, "options.dockerfile", "options.dockerfile_content")
            raise
        finally:
            self.running.discard(build_id)
            if build is not None:
                await build.close()
            if context is not None:
                context.close()
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    async def prune_cache(self, unused_for: float | None) -> PruneResult:
        """Delete cache records (and the intermediate images they hold); see BuildCache.prune."""

        async def delete_image(digest: str) -> None:
            with contextlib.suppress(BerthError):
                await self.registry.delete_manifest(CACHE_REPOSITORY, digest)

        result = await self.cache.prune(unused_for, delete_image)
        await self.forget_removed_images()
        return result

    async def forget_removed_images(self) -> int:
        """Delete the build records of images no repository holds any more (`berth rmi`
        removed them): the records are the builder's, so the image service cannot. Records
        are read before the registry's names, and a build writes its image before its record,
        so an image being built right now always counts as present."""
        records = await BUILDS.list(self.store)
        present = {entry.digest for entry in await self.registry.list_manifests()}
        gone = [record.id for record in records if record.id not in present]
        for digest in gone:
            await BUILDS.delete(self.store, digest)
        return len(gone)


# --- one build -----------------------------------------------------------------------------------


class _Build:
    def __init__(
        self,
        builder: Builder,
        options: BuildOptions,
        dockerfile: Dockerfile,
        stages: list[Stage],
        context: BuildContext,
        emit: Callable[[BuildEvent], None],
        build_id: str,
        scratch: Path,
    ) -> None:
        self.store = builder.store
        self.images = builder.images
        self.registry = builder.registry
        self.cache = builder.cache
        self.runner = builder.runner
        self.options = options
        self.dockerfile = dockerfile
        self.stages = stages
        self.context = context
        self.emit = emit
        self.build_id = build_id
        self.scratch = scratch
        self.total = sum(1 + len(s.instructions) for s in stages)
        self.number = 0
        self.cached = 0
        self.warnings = 0
        self.states: dict[int, State] = {}  # finished stages
        self.files: dict[int, tuple[LayerFiles, int]] = {}  # stage -> (its files, layers applied)
        self.blobs: dict[str, Path] = {}  # layer digest -> its blob in scratch
        self.linked: set[str] = set()  # layers known to be in the cache repository
        self.touches: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for files, _ in self.files.values():
            files.close()
        await asyncio.gather(*self.touches, return_exceptions=True)

    # --- stages ---------------------------------------------------------------------------

    def label(self, stage: Stage) -> str:
        if stage.name:
            return stage.name
        return f"stage-{stage.index}" if len(self.dockerfile.stages) > 1 else ""

    async def run(self) -> State:
        for stage in self.stages:
            state = await self.from_step(stage)
            base_layers = len(state.layers)
            scope = self.dockerfile.scope(state.config.get("Env") or [], self.options.build_args)
            for instruction in stage.instructions:
                state = await self.step(stage, scope, instruction, state)
            if stage is not self.stages[-1] and len(state.layers) > base_layers:
                # Keeps the stage's layers referenced while its records live.
                state = replace(state, image=await self.state_image(state))
            self.states[stage.index] = state
        return state

    async def from_step(self, stage: Stage) -> State:
        self.number += 1
        began = time.monotonic()
        line = stage.line
        # As BuildKit shows it: the base with its ARGs expanded.
        original = f"FROM {stage.base}" + (f" AS {stage.name}" if stage.name else "")
        try:
            if stage.base_stage is not None:
                state = self.states[stage.base_stage]
            elif stage.base == "scratch":
                state = scratch_state()
            else:
                state = await self.base_image(stage)
        except BerthError as exc:
            self._event(stage, line, original, StepStatus.FAILED)
            facts = {"step": self.number, "line": line}
            if exc.code.name == "NOT_FOUND":
                facts |= {"image": stage.base, "cause": exc.reason}
            annotate(exc, facts)
            details = exc.details
            if exc.code.name == "NOT_FOUND":
                details = replace(details, reason=BASE_IMAGE_NOT_FOUND)
            message = f"Dockerfile:{line}: FROM {stage.base}: {exc}"
            raise error_for_code(exc.code.name, message, details) from exc
        status = StepStatus.DONE if self.options.no_cache else StepStatus.CACHED
        self._count(status)
        self._event(stage, line, original, status, duration=time.monotonic() - began)
        return state

    async def base_image(self, stage: Stage) -> State:
        image = await self.images.resolve(stage.base)
        config = image.config
        if config.config.get("OnBuild"):
            self.warn(f"[Warning] {stage.base}: ONBUILD triggers are not run")
        platform = {"architecture": config.architecture, "os": config.os}
        if isinstance(config.raw.get("variant"), str):
            platform["variant"] = config.raw["variant"]
        author_ = config.raw.get("author")
        return State(
            key=image.digest,
            layers=tuple(as_oci_layer(layer) for layer in image.parsed.layers),
            diff_ids=config.diff_ids,
            config=copy.deepcopy(config.config),
            history=config.history,
            platform=platform,
            author=author_ if isinstance(author_, str) else "",
            created=config.created or "",
        )

    # --- steps ----------------------------------------------------------------------------

    async def step(
        self, stage: Stage, scope: StageScope, instruction: Instruction, state: State
    ) -> State:
        self.number += 1
        began = time.monotonic()
        try:
            step = scope.step(instruction)
            sources, source_key, matches = await self.copy_inputs(step)
            key = step_key(state.key, step.cache_text, step.used_args, sources, source_key)
            config = apply_instruction(state.config, step)
            record = None if self.options.no_cache else await self.lookup(key)
            if record is not None:
                status = StepStatus.CACHED
            else:
                self._event(stage, instruction.line, instruction.original, StepStatus.RUNNING)
                record = await self.execute(stage, step, state, key, matches)
                status = StepStatus.DONE
        except BerthError as exc:
            self._event(
                stage,
                instruction.line,
                instruction.original,
                StepStatus.FAILED,
                duration=time.monotonic() - began,
                exit_code=exc.exit_code if isinstance(exc, RunFailed) else None,
            )
            annotate(exc, {"step": self.number, "line": instruction.line})
            if str(exc).startswith("Dockerfile:"):
                raise
            # What a service said (no node for a RUN, the registry away) names the step too.
            message = f"Dockerfile:{instruction.line}: {instruction.original}: {exc}"
            raise error_for_code(exc.code.name, message, exc.details) from exc
        self._count(status)
        self._event(
            stage,
            instruction.line,
            instruction.original,
            status,
            layer_digest=record.layer.digest if record.layer else "",
            duration=time.monotonic() - began,
        )
        return state.after(key, config, record, step)

    async def copy_inputs(self, step: Step) -> tuple[str, str, list[SourceMatch] | None]:
        """The COPY/ADD parts of the key: the digest of what the sources match in the context
        (and the matches), or the last key of the stage `--from` names. That key fixes the
        stage's files, so they need not be read on a cache hit."""
        cmd = step.instruction.cmd
        if cmd not in ("COPY", "ADD"):
            return "", "", None
        source = self.source_stage(step)
        if source is not None:
            return "", self.states[source.index].key, None
        sources, line = list(step.words[:-1]), step.instruction.line
        matches = await asyncio.to_thread(self.context.match, sources, line, cmd)
        return await asyncio.to_thread(sources_digest, matches), "", matches

    def source_stage(self, step: Step) -> Stage | None:
        """The stage a COPY --from names (parse_dockerfile checked it exists and is earlier)."""
        source = step.flags.get("from")
        found = None if source is None else self.dockerfile.stage(source)
        assert source is None or found is not None
        return found

    async def lookup(self, key: str) -> CacheRecord | None:
        """The step's record, if its layer is still in the registry."""
        found = await self.cache.get(key)
        if found is None:
            return None
        record, revision = found
        if record.layer is not None:
            if await self.registry.stat_blob(CACHE_REPOSITORY, record.layer.digest) is None:
                return None
            self.linked.add(record.layer.digest)
        task = asyncio.create_task(self._touch(record, revision))
        self.touches.add(task)
        task.add_done_callback(self.touches.discard)
        return record

    async def _touch(self, record: CacheRecord, revision: int) -> None:
        try:
            await self.cache.touch(record, revision)
        except BerthError as exc:  # only statistics are lost
            log.warning("cannot refresh build cache record %s: %s", record.key, exc)

    async def execute(
        self,
        stage: Stage,
        step: Step,
        state: State,
        key: str,
        matches: list[SourceMatch] | None,
    ) -> CacheRecord:
        cmd = step.instruction.cmd
        result = RunResult(None)
        if cmd == "RUN":
            result = await self.run_step(stage, step, state)
        elif cmd in ("COPY", "ADD"):
            result = await self.copy_step(stage, step, state, matches)
        elif cmd == "WORKDIR":
            result = await self.workdir_step(stage, step, state)
        history = history_entry(step, state.config, empty=result.layer is None)
        record = CacheRecord(key, step.instruction.original, result.layer, result.diff_id, history)
        await self.cache.put(record)
        return record

    async def run_step(self, stage: Stage, step: Step, state: State) -> RunResult:
        instruction = step.instruction
        image = await self.state_image(state)
        spec = RunSpec(
            step=self.number,
            line=instruction.line,
            instruction=instruction.original,
            image=f"{CACHE_REPOSITORY}@{image}",
            argv=shell_command(step, state.config),
            env=list(step.run_env),
            working_dir=state.config.get("WorkingDir") or "/",
            user=state.config.get("User") or "",
            build_id=self.build_id,
            name=f"build-{self.build_id}-{self.number}",
        )

        number = self.number

        def output(stream: str, data: bytes) -> None:
            self.emit(StepOutput(number, stream, data))

        result = await self.runner.run(spec, output)
        if result.layer is not None:
            self.linked.add(result.layer.digest)
        return result

    async def copy_step(
        self, stage: Stage, step: Step, state: State, matches: list[SourceMatch] | None
    ) -> RunResult:
        """COPY/ADD: `matches` in the context, or (None) the sources in the `--from` stage."""
        instruction = step.instruction
        cmd, line = instruction.cmd, instruction.line
        files = await self.stage_files(stage.index, state)
        source = self.source_stage(step)
        if source is not None:
            origin = await self.stage_files(source.index, self.states[source.index])
            matches = await asyncio.to_thread(origin.match, list(step.words[:-1]), line, cmd)
        assert matches is not None
        chown = None
        if "chown" in step.flags:
            chown = await asyncio.to_thread(
                resolve_chown, step.flags["chown"], files.read_file, line, cmd
            )
        chmod = int(step.flags["chmod"], 8) if "chmod" in step.flags else None
        blob: LayerBlob = await asyncio.to_thread(
            copy_layer,
            matches,
            step.words[-1],
            state.config.get("WorkingDir") or "/",
            chown,
            chmod,
            self.scratch,
            cmd == "ADD",
            files.tree,
        )
        return await self.push_layer(blob)

    async def workdir_step(self, stage: Stage, step: Step, state: State) -> RunResult:
        """WORKDIR makes its directory if it is missing, owned by USER, as BuildKit does (so
        a USER can write there); runc would make it at the next RUN, but root's."""
        path = apply_instruction(state.config, step)["WorkingDir"]
        files = await self.stage_files(stage.index, state)
        owner = None
        if user := state.config.get("User"):
            line = step.instruction.line
            owner = await asyncio.to_thread(resolve_chown, user, files.read_file, line, "WORKDIR")
        blob = await asyncio.to_thread(workdir_layer, files.tree, path, owner, self.scratch)
        return RunResult(None) if blob is None else await self.push_layer(blob)

    async def push_layer(self, blob: LayerBlob) -> RunResult:
        """A layer made here, pushed to the cache repository (kept in scratch for the build)."""
        if blob.empty:
            blob.path.unlink()
            return RunResult(None)
        await self.registry.push_blob(CACHE_REPOSITORY, blob.path, blob.digest, blob.size)
        self.blobs[blob.digest] = blob.path
        self.linked.add(blob.digest)
        layer = Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, blob.digest, blob.size)
        return RunResult(layer, blob.diff_id)

    # --- files and images of states ---------------------------------------------------------

    async def stage_files(self, index: int, state: State) -> LayerFiles:
        """The files of `state`, a state of stage `index` (its layers read once per build)."""
        files, applied = self.files.get(index, (None, 0))
        if files is None:
            paths = [await self.layer_blob(layer) for layer in state.layers]
            stage = self.dockerfile.stages[index]
            where = f"stage {stage.name or stage.index}"
            files = await asyncio.to_thread(LayerFiles, paths, self.scratch, where)
        else:
            for layer in state.layers[applied:]:
                await asyncio.to_thread(files.add_layer, await self.layer_blob(layer))
        self.files[index] = (files, len(state.layers))
        return files

    async def layer_blob(self, layer: Descriptor) -> Path:
        """A layer's blob in scratch, downloaded from the cache repository if need be."""
        path = self.blobs.get(layer.digest)
        if path is None:
            await self.link([layer])
            path = self.scratch / f"blob-{layer.digest.removeprefix('sha256:')}"
            await self.registry.pull_blob(CACHE_REPOSITORY, layer.digest, path, size=layer.size)
            self.blobs[layer.digest] = path
        return path

    async def link(
        self, layers: tuple[Descriptor, ...] | list[Descriptor], repository: str = CACHE_REPOSITORY
    ) -> None:
        """Make the layers (stored in the registry under any repository) part of `repository`."""
        cache = repository == CACHE_REPOSITORY
        missing = [layer.digest for layer in layers if not (cache and layer.digest in self.linked)]
        if not missing:
            return
        for digest in missing:
            if not await self.registry.mount_blob(repository, digest):
                raise DataLoss(f"layer {digest} is no longer in the registry; build again")
        if cache:
            self.linked.update(missing)

    async def state_image(self, state: State) -> str:
        """The digest of `state`'s image in the cache repository, pushed if need be."""
        if state.image:
            return state.image
        await self.link(state.layers)
        config = encode_json(state.image_config())
        descriptor = await self.registry.push_bytes(
            CACHE_REPOSITORY, config, mediatypes.OCI_IMAGE_CONFIG
        )
        digest = await self.images.write_manifest(
            CACHE_REPOSITORY, None, descriptor, list(state.layers)
        )
        if state.key != SCRATCH and not state.key.startswith("sha256:"):
            # The state after a step: that step's record holds the image from now on.
            await self.cache.set_image(state.key, digest)
        return digest

    # --- the result -----------------------------------------------------------------------

    async def export(self, state: State, tags: list[Reference]) -> BuildResult:
        began = time.monotonic()
        self.emit(BuildProgress("export", ProgressState.RUNNING, "exporting to image"))
        result = await self._export(state, tags)
        self.emit(
            BuildProgress(
                "export",
                ProgressState.DONE,
                "exporting to image",
                duration=time.monotonic() - began,
            )
        )
        return result

    async def _export(self, state: State, tags: list[Reference]) -> BuildResult:
        config = state.image_config(self.options.labels)
        layers = list(state.layers)
        targets = [(t.repository, t.tag) for t in tags] or [(CACHE_REPOSITORY, None)]
        unchanged = await self.already_tagged(config, layers, tags)
        if unchanged is not None:
            # A rebuild that changed nothing: every tag names this very image already.
            digest, image_id = unchanged
            return BuildResult(
                digest=digest,
                id=image_id,
                tags=[f"{t.repository}:{t.tag}" for t in tags],
                cached_steps=self.cached,
                total_steps=self.total,
            )
        written: WrittenImage | None = None
        for repository, tag in targets:
            await self.link(layers, repository)
            written = await self.images.write_image(repository, tag, config, layers)
        assert written is not None
        # The same manifest bytes under every tag: one record for the image.
        await BUILDS.put(self.store, written.digest, BuildRecord(self.options.dockerfile))
        return BuildResult(
            digest=written.digest,
            id=written.id,
            tags=[f"{t.repository}:{t.tag}" for t in tags],
            cached_steps=self.cached,
            total_steps=self.total,
        )

    async def already_tagged(
        self, config: dict[str, Any], layers: list[Descriptor], tags: list[Reference]
    ) -> tuple[str, str] | None:
        """(manifest digest, image id) when every tag already names the image these would make
        (write_image encodes the same bytes), else None: the export can skip every write."""
        if not tags:
            return None
        config_bytes = encode_json(config)
        image_id = digest_bytes(config_bytes)
        descriptor = Descriptor(mediatypes.OCI_IMAGE_CONFIG, image_id, len(config_bytes))
        digest = digest_bytes(build_image_manifest(descriptor, layers))
        for tag in tags:
            if await self.registry.tag_digest(tag.repository, str(tag.tag)) != digest:
                return None
        return digest, image_id

    # --- events ---------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        self.warnings += 1
        self.emit(BuildProgress(f"warning/{self.warnings}", ProgressState.DONE, message))

    def _count(self, status: StepStatus) -> None:
        cached = status == StepStatus.CACHED
        self.cached += cached
        metrics.STEPS.labels("cached" if cached else "executed").inc()

    def _event(
        self,
        stage: Stage,
        line: int,
        instruction: str,
        status: StepStatus,
        *,
        layer_digest: str = "",
        duration: float | None = None,
        exit_code: int | None = None,
    ) -> None:
        self.emit(
            StepEvent(
                number=self.number,
                total=self.total,
                stage=self.label(stage),
                instruction=instruction,
                line=line,
                status=status,
                layer_digest=layer_digest,
                duration=duration,
                exit_code=exit_code,
            )
        )


def workdir_layer(
    base: Tree, path: str, owner: tuple[int, int] | None, scratch: Path
) -> LayerBlob | None:
    """A layer with directory `path` and its missing parents (0755, `owner`'s), None when the
    path exists in `base` (or cannot be a directory: the step that runs there reports it)."""
    try:
        parts, node = base.resolve(clean_parts(path))
    except (NotADirectoryError, SymlinkLoop):
        return None
    if node is not None:
        return None
    created = directory(uid=owner[0], gid=owner[1]) if owner else directory()
    tree = Tree()
    for depth in range(1, len(parts) + 1):
        existing = base.get(parts[:depth])
        tree.put(parts[:depth], existing.entry if existing is not None else created)
    return write_layer(tree, scratch)
