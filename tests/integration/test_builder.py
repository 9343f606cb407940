"""The builder service end to end: builds driven through its gRPC API, RUN steps on a real node
agent placed by the cluster, layers and images in a real registry, the step cache in etcd.

Full builds are few (each RUN starts a container): one multi-stage build is shared by the
tests that read its image, its events and its cache. The test that prunes the cache comes last.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from berth.builder.v1 import builder_pb2 as pb
from berth.builder.v1 import builder_pb2_grpc
from berth.client import BuilderClient, BuildOptions, ClusterClient, ContainerConfig, RegistryClient
from berth.client.builder import BuildOutput
from berth.errors import BerthClientError
from berth.tls import secure_channel
from berth.types.v1 import progress_pb2
from berthd.common.state.images import BUILDS, IMAGES
from berthd.common.store import Store

from .builder_cluster import BASE, Build, BuildCluster, build_cluster, requests
from .conftest import wait_until
from .images import tar_of

pytestmark = pytest.mark.integration
__all__ = ["build_cluster"]  # the module's fixture: imported so that pytest finds it

DOCKERFILE = """\
# Two stages: the first writes a message, the second copies it in and runs a script.
ARG BASE=test/busybox:1
FROM ${BASE} AS build
ARG GREETING=hello
ENV OUT=/out.txt \\
    UNUSED=x
WORKDIR /src/app
COPY greeting.txt ./
ADD bundle.tar /opt/
RUN echo "$GREETING from $PWD" > $OUT && cat greeting.txt /opt/b/in.txt >> $OUT && echo built

FROM test/busybox:1
LABEL stage=final
COPY --from=build /out.txt /app/message.txt
COPY --chown=nobody run.sh /app/
USER nobody
WORKDIR /app/data
EXPOSE 8080
ENTRYPOINT ["/bin/sh", "/app/run.sh"]
CMD ["world"]
"""
RUN_SH = """\
cat /app/message.txt
echo "args: $*"
echo "uid: $(id -u)"
echo "cwd: $(pwd) $(stat -c %u:%g .)"
echo "run.sh owner: $(stat -c %u:%g /app/run.sh)"
"""
FILES = {
    "Dockerfile": DOCKERFILE,
    "greeting.txt": "nice to meet you\n",
    "bundle.tar": tar_of({"b/in.txt": b"unpacked by ADD\n"}),
    "run.sh": RUN_SH,
}
OPTIONS = {"tags": ["test/app:1"], "build_args": {"GREETING": "hi"}, "labels": {"by": "test"}}
FIRST_STAGE = [
    "FROM test/busybox:1 AS build",  # the base with its ARG expanded, as BuildKit shows it
    "ARG GREETING=hello",
    "ENV OUT=/out.txt     UNUSED=x",  # continuations joined, as the parser gives them
    "WORKDIR /src/app",
    "COPY greeting.txt ./",
    "ADD bundle.tar /opt/",
    'RUN echo "$GREETING from $PWD" > $OUT && cat greeting.txt /opt/b/in.txt >> $OUT && echo built',
]
SECOND_STAGE = [
    "FROM test/busybox:1",
    "LABEL stage=final",
    "COPY --from=build /out.txt /app/message.txt",
    "COPY --chown=nobody run.sh /app/",
    "USER nobody",
    "WORKDIR /app/data",
    "EXPOSE 8080",
    'ENTRYPOINT ["/bin/sh", "/app/run.sh"]',
    'CMD ["world"]',
]


def succeeded(build: Build) -> pb.BuildResult:
    assert build.error is None, build.error.details()
    assert build.result is not None
    return build.result


@pytest.fixture(scope="module")
def first(build_cluster: BuildCluster) -> Build:
    """The multi-stage build, built once for the module."""
    return build_cluster.build(FILES, **OPTIONS)


def test_a_cold_build_executes_every_step_and_streams_run_output(first: Build) -> None:
    result = succeeded(first)
    statuses = first.statuses()
    assert list(statuses) == FIRST_STAGE + SECOND_STAGE
    # A base image is in the registry already: nothing to fetch, as BuildKit shows it.
    assert statuses[FIRST_STAGE[0]] == statuses["FROM test/busybox:1"] == "CACHED"
    assert {statuses[i] for i in FIRST_STAGE[1:] + SECOND_STAGE[1:]} == {"DONE"}
    assert (result.cached_steps, result.total_steps) == (2, 16)
    assert list(result.tags) == ["test/app:1"]
    assert first.output() == ["built"]
    run = [s for s in first.steps if s.instruction == FIRST_STAGE[-1]]
    assert run[-1].layer_digest.startswith("sha256:")
    assert run[-1].progress.duration.ToNanoseconds() > 0
    assert {o.step for o in first.outputs} == {run[-1].number}
    assert [o.data for o in first.outputs] == [b"built\n"]
    assert {s.stage for s in first.steps} == {"build", "stage-1"}
    lines = {s.instruction: s.line for s in first.steps}
    assert [lines[i] for i in (FIRST_STAGE[0], FIRST_STAGE[-1], SECOND_STAGE[0])] == [3, 10, 12]


def test_the_image_has_the_config_and_history_of_its_dockerfile(
    first: Build, build_cluster: BuildCluster
) -> None:
    succeeded(first)
    config = build_cluster.image_config("test/app", "1")
    settings = config["config"]
    assert settings["Entrypoint"] == ["/bin/sh", "/app/run.sh"]
    assert settings["Cmd"] == ["world"]
    assert settings["User"] == "nobody"
    assert settings["WorkingDir"] == "/app/data"
    assert settings["Labels"] == {"stage": "final", "by": "test"}
    assert settings["ExposedPorts"] == {"8080/tcp": {}}
    assert not any(e.startswith("OUT=") for e in settings["Env"])  # the first stage's ENV
    history = config["history"]
    # Only the steps that changed files added a layer; each step has its entry.
    assert [h["created_by"] for h in history if not h.get("empty_layer")] == [
        "tests/integration/images.py",
        "COPY /out.txt /app/message.txt # buildkit",
        "COPY run.sh /app/ # buildkit",
        "WORKDIR /app/data",
    ]
    assert [h["created_by"] for h in history if h.get("empty_layer")] == [
        "LABEL stage=final",
        "USER nobody",
        "EXPOSE 8080",
        'ENTRYPOINT ["/bin/sh" "/app/run.sh"]',
        'CMD ["world"]',
    ]
    assert len(config["rootfs"]["diff_ids"]) == 4
    assert config["created"] == history[-1]["created"]


def test_the_built_image_runs_on_the_cluster(first: Build, build_cluster: BuildCluster) -> None:
    succeeded(first)
    with ClusterClient(build_cluster.cluster.address) as cluster:
        container = cluster.run(ContainerConfig("test/app:1"))
        try:
            # The cluster's wait needs a status to wait on: the node's first report.
            while cluster.inspect(container.id).state not in ("running", "exited"):
                time.sleep(0.02)
            assert cluster.wait(container.id) == 0
            output = b"".join(line.data for line in cluster.logs(container.id)).decode()
        finally:
            cluster.remove(container.id, force=True)
    # GREETING came from --build-arg; /src/app was created for RUN by WORKDIR.
    assert output.splitlines() == [
        "hi from /src/app",
        "nice to meet you",
        "unpacked by ADD",
        "args: world",
        "uid: 65534",
        "cwd: /app/data 65534:65534",  # WORKDIR made it, owned by USER
        "run.sh owner: 65534:65534",  # --chown=nobody: the user's group, from /etc/passwd
    ]


def test_a_rebuild_without_changes_is_cached_and_gives_the_same_image(
    first: Build, build_cluster: BuildCluster
) -> None:
    again = build_cluster.build(FILES, **OPTIONS)
    result = succeeded(again)
    assert set(again.statuses().values()) == {"CACHED"}
    assert result.cached_steps == result.total_steps == 16
    assert again.output() == []
    assert (result.digest, result.id) == (succeeded(first).digest, succeeded(first).id)


async def test_the_builder_records_its_images_in_its_own_family(
    first: Build, build_cluster: BuildCluster
) -> None:
    digest = succeeded(first).digest
    store = Store(build_cluster.services.etcd, build_cluster.services.prefix)
    await store.connect()
    try:
        found = await BUILDS.read(store, digest)
        assert found is not None and found.record.dockerfile == "Dockerfile"
        assert await IMAGES.get(store, digest) is None  # the image service's family
        # A rebuild whose tags name the image already writes nothing, the record included.
        again = await asyncio.to_thread(build_cluster.build, FILES, **OPTIONS)
        assert succeeded(again).digest == digest
        still = await BUILDS.read(store, digest)
        assert still is not None and still.mod_revision == found.mod_revision
    finally:
        await store.close()


def test_changing_a_copied_file_rebuilds_that_step_and_the_later_ones(
    first: Build, build_cluster: BuildCluster
) -> None:
    succeeded(first)
    changed = build_cluster.build({**FILES, "run.sh": RUN_SH + "echo changed\n"}, **OPTIONS)
    result = succeeded(changed)
    statuses = changed.statuses()
    assert [statuses[i] for i in FIRST_STAGE] == ["CACHED"] * 7
    assert [statuses[i] for i in SECOND_STAGE] == ["CACHED"] * 3 + ["DONE"] * 6
    assert result.digest != succeeded(first).digest

    # The tag now names the changed image: a cached rebuild of the first must move it back
    # (the export skips its writes only when every tag already names the image).
    back = succeeded(build_cluster.build(FILES, **OPTIONS))
    assert back.digest == succeeded(first).digest
    with RegistryClient(build_cluster.registry.address) as registry:
        assert registry.get_manifest("test/app", "1").digest == back.digest


def test_builds_and_steps_are_counted_in_the_metrics(
    first: Build, build_cluster: BuildCluster
) -> None:
    succeeded(first)
    failed = build_cluster.build({"Dockerfile": "FROM test/missing:1\n"})
    assert failed.error is not None
    with urllib.request.urlopen(build_cluster.builder.metrics, timeout=10) as response:
        text = response.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("berth_builder_")
    }
    assert values['berth_builder_builds_total{outcome="ok"}'] >= 1
    assert values['berth_builder_builds_total{outcome="error"}'] >= 1
    assert values['berth_builder_steps_total{result="executed"}'] >= 14  # the first build's
    assert values['berth_builder_steps_total{result="cached"}'] >= 2
    assert values["berth_builder_build_seconds_count"] >= 2


def test_a_target_builds_only_the_stages_it_needs(
    first: Build, build_cluster: BuildCluster
) -> None:
    succeeded(first)
    options = {**OPTIONS, "tags": []}
    partial = build_cluster.build(FILES, target="build", **options)
    result = succeeded(partial)
    assert list(partial.statuses()) == FIRST_STAGE
    assert result.total_steps == len(FIRST_STAGE) and list(result.tags) == []
    # Untagged: the image is kept by digest in the cache repository.
    config = build_cluster.image_config("berth/build-cache", result.digest)
    assert config["config"]["WorkingDir"] == "/src/app"


def test_a_failing_run_reports_its_exit_code_and_output(build_cluster: BuildCluster) -> None:
    dockerfile = f"FROM {BASE}\nRUN echo about to fail && exit 3\n"
    failed = build_cluster.build({"Dockerfile": dockerfile})
    assert failed.error is not None and failed.result is None
    assert failed.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.error.details() == (
        'Dockerfile:2: RUN echo about to fail && exit 3: process "/bin/sh -c echo about to '
        'fail && exit 3" did not complete successfully: exit code: 3'
    )
    assert failed.output() == ["about to fail"]
    last = failed.steps[-1]
    assert (last.progress.state, last.exit_code) == (progress_pb2.PROGRESS_STATE_FAILED, 3)
    details = failed.details()
    assert details.reason == "RUN_FAILED"
    assert details.metadata == {"step": "2", "line": "2", "exit_code": "3"}
    with ClusterClient(build_cluster.cluster.address) as cluster:
        assert [c for c in cluster.list(all=True) if "berth.build" in c.labels] == []


def test_a_cancelled_build_removes_its_container(build_cluster: BuildCluster) -> None:
    files = {"Dockerfile": f"FROM {BASE}\nRUN echo started && sleep 600\n"}
    with secure_channel(build_cluster.builder.address) as channel:
        call = builder_pb2_grpc.BuilderServiceStub(channel).Build(requests(files), timeout=120)
        for response in call:
            if response.output.data == b"started\n":
                call.cancel()
                break
    with ClusterClient(build_cluster.cluster.address) as cluster:

        def building() -> list[str]:
            return [c.id for c in cluster.list(all=True) if "berth.build" in c.labels]

        wait_until(lambda: not building(), 60, "the build container's removal")


@pytest.mark.parametrize(
    ("files", "code", "message", "reason", "metadata"),
    [
        (
            {"Dockerfile": f"FROM {BASE}\nRUN echo ok\nFOO bar\n"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Dockerfile:3: unknown instruction: FOO",
            "DOCKERFILE_INVALID",
            {"line": "3"},
        ),
        (
            {"Dockerfile": "FROM test/missing:1\nRUN true\n"},
            grpc.StatusCode.NOT_FOUND,
            "Dockerfile:1: FROM test/missing:1: ",
            "BASE_IMAGE_NOT_FOUND",
            {"image": "test/missing:1", "step": "1", "line": "1"},
        ),
        (
            {"other.txt": "x"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Dockerfile not found in the build context: Dockerfile",
            "DOCKERFILE_NOT_FOUND",
            {"path": "Dockerfile"},
        ),
        (
            {"Dockerfile": f"FROM {BASE}\nCOPY absent.txt /\n"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Dockerfile:2: COPY failed: file not found in build context: absent.txt",
            "COPY_FAILED",
            {"step": "2", "line": "2"},
        ),
        (
            # The node cannot create the step's container: it says so in the status at once
            # (no waiting for the start timeout).
            {"Dockerfile": f"FROM {BASE}\nUSER nobody-here\nRUN true\n"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "Dockerfile:3: RUN true: node ",
            "RUN_NOT_STARTED",
            {"step": "3", "line": "3"},
        ),
    ],
)
def test_errors_name_their_dockerfile_line(
    build_cluster: BuildCluster,
    files: dict[str, str],
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
) -> None:
    failed = build_cluster.build(files)
    assert failed.error is not None and failed.error.code() == code
    assert failed.error.details().startswith(message), failed.error.details()
    details = failed.details()
    assert details.reason == reason
    assert metadata.items() <= details.metadata.items(), details.metadata
    if "USER" in files.get("Dockerfile", ""):
        assert "nobody-here" in failed.error.details()


def test_the_builder_applies_dockerignore_to_what_a_raw_client_sent(
    build_cluster: BuildCluster,
) -> None:
    """A client that sends everything: what .dockerignore names is not there for COPY."""
    files = {
        "Dockerfile": f"FROM {BASE}\nCOPY . /ctx/\nRUN ls -A /ctx\n",
        ".dockerignore": "secret.txt\n",
        "secret.txt": "password",
        "app.txt": "app",
    }
    listed = build_cluster.build(files, no_cache=True)
    succeeded(listed)
    assert sorted(listed.output()) == [".dockerignore", "Dockerfile", "app.txt"]
    failed = build_cluster.build({**files, "Dockerfile": f"FROM {BASE}\nCOPY secret.txt /\n"})
    assert failed.details().reason == "COPY_FAILED"


def test_context_progress_comes_before_the_steps(build_cluster: BuildCluster) -> None:
    files = {"Dockerfile": f"FROM {BASE}\n", "big.bin": b"x" * 300_000}
    built = build_cluster.build(files)
    succeeded(built)
    context = [p for p in built.progress if p.id == "context"]
    assert context[0].state == progress_pb2.PROGRESS_STATE_DOWNLOADING
    assert context[-1].state == progress_pb2.PROGRESS_STATE_DONE
    assert context[-1].current > 300_000 and context[-1].unit == progress_pb2.PROGRESS_UNIT_BYTES
    assert [p.id for p in built.progress if p.id == "export"] == ["export", "export"]


def test_list_prune_and_no_cache(build_cluster: BuildCluster) -> None:
    files = {"Dockerfile": f"FROM {BASE}\nCOPY a.txt /a.txt\n", "a.txt": "a"}
    succeeded(build_cluster.build(files, tags=["test/prune:1"]))
    rebuilt = build_cluster.build(files, tags=["test/prune:1"], no_cache=True)
    succeeded(rebuilt)
    assert rebuilt.statuses() == {f"FROM {BASE}": "DONE", "COPY a.txt /a.txt": "DONE"}

    with secure_channel(build_cluster.builder.address) as channel:
        stub = builder_pb2_grpc.BuilderServiceStub(channel)
        listed = stub.ListCache(pb.ListCacheRequest())
        copy = [e for e in listed.entries if e.instruction == "COPY a.txt /a.txt"]
        assert len(copy) == 1 and copy[0].layer_digest.startswith("sha256:") and copy[0].size > 0
        assert listed.total_bytes >= copy[0].size
        recent = stub.PruneCache(pb.PruneCacheRequest(unused_for=Duration(seconds=3600)))
        assert recent.deleted == 0
        everything = stub.PruneCache(pb.PruneCacheRequest())
        assert everything.deleted == len(listed.entries)
        assert everything.reclaimed_bytes == listed.total_bytes
        assert list(stub.ListCache(pb.ListCacheRequest()).entries) == []

    again = build_cluster.build(files, tags=["test/prune:1"])
    succeeded(again)
    assert again.statuses()["COPY a.txt /a.txt"] == "DONE"


async def test_prune_forgets_the_build_records_of_removed_images(
    first: Build, build_cluster: BuildCluster
) -> None:
    """`builds/<digest>` is the builder's: once an image is gone from the registry (rmi), the
    builder's prune deletes its record; the records of images still there stay."""
    files = {"Dockerfile": f"FROM {BASE}\nCOPY b.txt /b.txt\n", "b.txt": "b"}
    built = await asyncio.to_thread(build_cluster.build, files, tags=["test/gone:1"])
    gone = succeeded(built).digest
    kept = succeeded(first).digest
    store = Store(build_cluster.services.etcd, build_cluster.services.prefix)
    await store.connect()
    try:
        assert await BUILDS.get(store, gone) is not None
        with RegistryClient(build_cluster.registry.address) as registry:
            await asyncio.to_thread(registry.delete_manifest, "test/gone", gone)
        with secure_channel(build_cluster.builder.address) as channel:
            stub = builder_pb2_grpc.BuilderServiceStub(channel)
            await asyncio.to_thread(
                stub.PruneCache, pb.PruneCacheRequest(unused_for=Duration(seconds=3600))
            )
        assert await BUILDS.get(store, gone) is None
        assert await BUILDS.get(store, kept) is not None
    finally:
        await store.close()


def test_the_client_sends_the_context_without_what_dockerignore_excludes(
    build_cluster: BuildCluster, tmp_path: Path
) -> None:
    """Through the typed client, from a real directory: what .dockerignore names never reaches
    the builder, an exception (!) brings a file back, the Dockerfile always goes."""
    context = tmp_path / "context"
    (context / "logs").mkdir(parents=True)
    (context / "Dockerfile").write_text(f"FROM {BASE}\nCOPY . /ctx/\nRUN ls -A /ctx /ctx/logs\n")
    ignore = "# comments are ignored\nsecret.txt\nlogs/*\n!logs/keep.log\n"
    (context / ".dockerignore").write_text(ignore)
    for name in ("app.txt", "secret.txt", "logs/keep.log", "logs/debug.log"):
        (context / name).write_text(name)
    lines: list[str] = []

    def collect(event: object) -> None:
        if isinstance(event, BuildOutput):
            lines.append(event.data.decode().removesuffix("\n"))

    with BuilderClient(build_cluster.builder.address) as client:
        client.build(context, BuildOptions(no_cache=True), on_event=collect)
    assert "secret.txt" not in lines and "debug.log" not in lines
    assert {"app.txt", "Dockerfile", ".dockerignore", "keep.log"} <= set(lines)


def test_the_client_raises_the_builders_reason_and_metadata(build_cluster: BuildCluster) -> None:
    with (
        BuilderClient(build_cluster.builder.address) as client,
        pytest.raises(BerthClientError) as caught,
    ):
        client.build(None, dockerfile_text=f"FROM {BASE}\n\nRUN true\nCOPY\n")
    error = caught.value
    assert (error.code, error.reason, error.metadata) == (
        "INVALID_ARGUMENT",
        "DOCKERFILE_INVALID",
        {"line": "4"},
    )
    assert error.details.field_violations[0][0] == "options.dockerfile_content"
