"""`berth build` and `berth builder` without a builder: the context tar the client sends,
argument parsing, BuildKit-style progress, and the cache commands' wording.

A fake BuilderClient stands in for the service where a command needs answers; a fake stub
stands in for gRPC where the real client's streaming is under test.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from berth.builder.v1 import builder_pb2 as pb
from berth.cli import build_cmds
from berth.cli.build_cmds import PlainProgress, build_options, build_source, cache_rows
from berth.cli.main import build_parser, main
from berth.client import builder as builder_module
from berth.client.builder import (
    CHUNK_SIZE,
    BuildCache,
    BuilderClient,
    BuildEvent,
    BuildOptions,
    BuildOutput,
    BuildProgress,
    BuildResult,
    BuildStep,
    CacheEntry,
    ContextStream,
    PruneReport,
    context_tar,
)
from berth.dockerignore import context_matcher
from berth.errors import BerthClientError
from berth.types.v1 import container_pb2, progress_pb2

IMAGE_ID = "sha256:" + "c" * 64
LAYER = "sha256:" + "a" * 64
RESULT = BuildResult("sha256:" + "d" * 64, IMAGE_ID, ["test/app:1"], 1, 4)
MTIME = 1_700_000_000


@pytest.fixture(autouse=True)
def no_ambient_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own builder settings out of every test."""
    monkeypatch.delenv("BERTH_BUILDER", raising=False)
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path / "state"))


def make_context(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /\n")
    (root / ".dockerignore").write_text("*.log\nDockerfile\nsecret/\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "debug.log").write_text("noise")
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / "secret").mkdir()
    (root / "secret" / "key").write_text("k")
    (root / "app").symlink_to("src/app.py")
    os.mkfifo(root / "pipe")
    for path in (root / "run.sh", root / "src" / "app.py", root / "src"):
        os.utime(path, (MTIME, MTIME))
    return root


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


# --- the context tar --------------------------------------------------------------------------


def test_context_tar_holds_what_dockerignore_leaves_with_modes_and_times(tmp_path: Path) -> None:
    data = context_tar(make_context(tmp_path))
    found = members(data)
    # sorted; the ignored log, the secret dir and the fifo are absent; the Dockerfile is sent
    # although .dockerignore names it
    assert list(found) == [".dockerignore", "Dockerfile", "app", "run.sh", "src", "src/app.py"]
    assert found["run.sh"].mode == 0o750 and found["run.sh"].mtime == MTIME
    assert found["src"].isdir() and found["src"].mtime == MTIME
    assert found["app"].issym() and found["app"].linkname == "src/app.py"
    assert all(m.uid == 0 and m.gid == 0 and not m.uname for m in found.values())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("src/app.py").read() == b"print('hi')\n"  # type: ignore[union-attr]


def test_context_tar_without_a_context_is_an_empty_tar() -> None:
    assert members(context_tar(None)) == {}


def test_context_stream_sends_the_same_tar_in_chunks(tmp_path: Path) -> None:
    make_context(tmp_path)
    (tmp_path / "big").write_bytes(os.urandom(2 * CHUNK_SIZE + 123))
    stream = ContextStream(tmp_path, context_matcher(tmp_path))
    stream.start()
    chunks = list(stream.chunks())
    stream.close()
    assert len(chunks) >= 3
    assert all(len(c) == CHUNK_SIZE for c in chunks[:-1]) and len(chunks[-1]) <= CHUNK_SIZE
    assert b"".join(chunks) == context_tar(tmp_path)
    assert stream.error is None and stream.size == sum(map(len, chunks))
    assert stream.seconds is not None


def test_context_stream_keeps_a_read_error_and_cancels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_context(tmp_path)
    real_walk = builder_module.walk_context

    def failing_walk(context_dir: Path, matcher: Any) -> Iterator[Any]:
        for entry in real_walk(context_dir, matcher):
            if entry.path == "src/app.py":
                raise PermissionError(13, "Permission denied", str(context_dir / entry.path))
            yield entry

    monkeypatch.setattr(builder_module, "walk_context", failing_walk)
    cancelled: list[bool] = []
    stream = ContextStream(tmp_path, context_matcher(tmp_path))
    stream.on_error = lambda: cancelled.append(True)
    stream.start()
    list(stream.chunks())
    stream.close()
    assert isinstance(stream.error, PermissionError)
    assert cancelled == [True]
    assert stream.seconds is None  # never finished


def test_closing_a_context_stream_stops_its_thread_and_releases_the_reader(
    tmp_path: Path,
) -> None:
    (tmp_path / "big").write_bytes(b"x" * (12 * CHUNK_SIZE))  # more than the queue holds
    stream = ContextStream(tmp_path, context_matcher(tmp_path, None))
    stream.start()
    reader = stream.chunks()
    assert len(next(reader)) == CHUNK_SIZE
    stream.close()
    assert not stream._thread.is_alive()
    assert list(reader) == []  # a reader still waiting (gRPC's thread) gets the end


# --- the client over a fake stub --------------------------------------------------------------


class FakeCall:
    """A Build call that reads the whole request stream first, as the builder does."""

    def __init__(self, requests: Iterator[pb.BuildRequest], responses: list[pb.BuildResponse]):
        self._requests = requests
        self._responses = responses
        self.cancelled = False
        self.received: list[pb.BuildRequest] = []

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def __iter__(self) -> Iterator[pb.BuildResponse]:
        self.received = list(self._requests)
        if self.cancelled:
            raise grpc.RpcError("cancelled")
        yield from self._responses


class FakeStub:
    def __init__(self, responses: list[pb.BuildResponse]) -> None:
        self.responses = responses
        self.calls: list[FakeCall] = []
        self.timeouts: list[float | None] = []

    def Build(self, requests: Iterator[pb.BuildRequest], timeout: float | None = None) -> FakeCall:
        self.calls.append(FakeCall(requests, self.responses))
        self.timeouts.append(timeout)
        return self.calls[-1]


def fake_client(responses: list[pb.BuildResponse]) -> tuple[BuilderClient, FakeStub]:
    client = BuilderClient("127.0.0.1:1")
    stub = FakeStub(responses)
    client._stub = stub  # type: ignore[assignment]
    return client, stub


def test_build_sends_options_then_the_context_and_converts_events(tmp_path: Path) -> None:
    make_context(tmp_path)
    done_step = pb.BuildStep(
        number=2,
        total=4,
        stage="build",
        instruction="RUN make",
        line=3,
        progress=progress_pb2.Progress(
            id="step/2",
            state=progress_pb2.PROGRESS_STATE_DONE,
            message="RUN make",
            duration=timedelta(milliseconds=800),
        ),
        layer_digest=LAYER,
    )
    failed_step = pb.BuildStep(
        number=3,
        total=4,
        instruction="RUN false",
        progress=progress_pb2.Progress(id="step/3", state=progress_pb2.PROGRESS_STATE_FAILED),
        exit_code=0,  # set: a real exit code, even 0
    )
    received = progress_pb2.Progress(
        id="context",
        state=progress_pb2.PROGRESS_STATE_DONE,
        current=2048,
        total=2048,
        unit=progress_pb2.PROGRESS_UNIT_BYTES,
        duration=timedelta(milliseconds=10),
    )
    client, stub = fake_client(
        [
            pb.BuildResponse(progress=received),
            pb.BuildResponse(progress=progress_pb2.Progress(id="warning/1", message="[Warning] x")),
            pb.BuildResponse(step=done_step),
            pb.BuildResponse(
                output=pb.BuildOutput(step=2, stream=container_pb2.LOG_STREAM_STDERR, data=b"hi\n")
            ),
            pb.BuildResponse(step=failed_step),
            pb.BuildResponse(
                result=pb.BuildResult(
                    digest=RESULT.digest,
                    id=IMAGE_ID,
                    tags=RESULT.tags,
                    cached_steps=1,
                    total_steps=4,
                )
            ),
        ]
    )
    events: list[BuildEvent] = []
    options = BuildOptions(
        build_args={"V": "1"}, target="build", tags=["test/app:1"], no_cache=True
    )
    with client:
        result = client.build(tmp_path, options, on_event=events.append)
    assert result == RESULT
    first, *rest = stub.calls[0].received
    assert first.options == pb.BuildOptions(
        dockerfile="Dockerfile",
        build_args={"V": "1"},
        target="build",
        tags=["test/app:1"],
        no_cache=True,
    )
    assert all(r.WhichOneof("request") == "context" for r in rest)
    sent = b"".join(r.context for r in rest)
    assert sent == context_tar(tmp_path)
    assert events == [
        BuildProgress("context", "DONE", 2048, 2048, "bytes", duration=0.01),
        BuildProgress("warning/1", "", message="[Warning] x"),
        BuildStep(2, 4, "build", "RUN make", 3, "DONE", layer_digest=LAYER, duration=0.8),
        BuildOutput(2, "stderr", b"hi\n"),
        BuildStep(3, 4, "", "RUN false", 0, "FAILED", exit_code=0),
    ]


def test_build_with_dockerfile_text_sends_it_and_an_empty_context() -> None:
    client, stub = fake_client([pb.BuildResponse(result=pb.BuildResult(id=IMAGE_ID))])
    with client:
        client.build(None, dockerfile_text="FROM scratch\n")
        client.build(None, dockerfile_text="FROM scratch\n", deadline=240)
    first, *rest = stub.calls[0].received
    assert first.options.dockerfile == "" and first.options.dockerfile_content == "FROM scratch\n"
    assert members(b"".join(r.context for r in rest)) == {}
    # No deadline unless the caller gives one: a build takes as long as it takes.
    assert stub.timeouts == [None, 240]


def test_a_context_read_error_is_reported_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_context(tmp_path)

    def failing_walk(context_dir: Path, matcher: Any) -> Iterator[Any]:
        raise PermissionError(13, "Permission denied", str(context_dir / "src"))
        yield

    monkeypatch.setattr(builder_module, "walk_context", failing_walk)
    client, stub = fake_client([pb.BuildResponse(result=pb.BuildResult(id=IMAGE_ID))])
    with client, pytest.raises(BerthClientError) as caught:
        client.build(tmp_path)
    assert caught.value.message == (
        f"cannot send the build context: Permission denied: {tmp_path / 'src'}"
    )
    assert stub.calls[0].cancelled


def test_a_missing_dockerfile_fails_before_calling(tmp_path: Path) -> None:
    client, stub = fake_client([])
    with client, pytest.raises(BerthClientError, match="cannot find the Dockerfile Dockerfile"):
        client.build(tmp_path)
    assert stub.calls == []


# --- arguments --------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_build_arg_without_a_value_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FROM_ENV", "env value")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    args = parse(
        "build",
        "--build-arg",
        "FROM_ENV",
        "--build-arg",
        "PLAIN=a=b",
        "--build-arg",
        "UNSET_HERE",
        "--label",
        "team=x",
        "-t",
        "test/app:1",
        "-t",
        "test/app",
        "--target",
        "build",
        "--no-cache",
        ".",
    )
    assert build_options(args, "Dockerfile") == BuildOptions(
        dockerfile="Dockerfile",
        build_args={"FROM_ENV": "env value", "PLAIN": "a=b"},  # an unset NAME is dropped
        target="build",
        tags=["test/app:1", "test/app"],
        no_cache=True,
        labels={"team": "x"},
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["build", "-t", "Bad Name", "."], 'invalid repository name "Bad Name"'),
        (["build", "-t", "app@sha256:" + "0" * 64, "."], "a digest cannot be a tag"),
        (["build", "--build-arg", "=x", "."], 'invalid build arg "=x"'),
        (["builder", "prune", "--filter", "label=x"], 'invalid filter "label=x"'),
    ],
)
def test_bad_arguments_are_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0]


def test_prune_filter_and_builder_address_flags() -> None:
    assert parse("builder", "prune", "--filter", "until=24h").filter == timedelta(hours=24)
    assert parse("builder", "prune", "--filter", "unused-for=90m").filter == timedelta(minutes=90)
    assert parse("--builder", "a:1", "build", ".").builder == "a:1"
    assert parse("--builder", "a:1", "builder", "ls", "--builder", "b:2").builder == "b:2"


def test_dockerfile_from_stdin_with_f_dash(tmp_path: Path) -> None:
    source = build_source(str(tmp_path), "-", io.StringIO("FROM scratch\n"))
    assert source == build_cmds.BuildSource(tmp_path, "", "FROM scratch\n")


def test_context_dash_is_a_dockerfile_on_stdin_with_an_empty_context() -> None:
    source = build_source("-", None, io.StringIO("FROM scratch\n"))
    assert source == build_cmds.BuildSource(None, "", "FROM scratch\n")
    with pytest.raises(BerthClientError, match="-f cannot be used"):
        build_source("-", "Dockerfile", io.StringIO("FROM scratch\n"))
    with pytest.raises(BerthClientError, match="the Dockerfile from stdin is empty"):
        build_source("-", None, io.StringIO(" \n"))


def test_f_is_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ctx" / "docker").mkdir(parents=True)
    (tmp_path / "ctx" / "docker" / "app.Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "outside.Dockerfile").write_text("FROM busybox\n")
    monkeypatch.chdir(tmp_path)
    inside = build_source("ctx", "ctx/docker/app.Dockerfile")
    assert inside == build_cmds.BuildSource(Path("ctx"), "docker/app.Dockerfile", None)
    # outside the context: sent as text
    assert build_source("ctx", "outside.Dockerfile").text == "FROM busybox\n"
    with pytest.raises(BerthClientError, match="cannot find the Dockerfile docker/app"):
        build_source("ctx", "docker/app.Dockerfile")  # not relative to the context


def test_default_dockerfile_and_bad_contexts(tmp_path: Path) -> None:
    (tmp_path / "dockerfile").write_text("FROM scratch\n")
    assert build_source(str(tmp_path), None).dockerfile == "dockerfile"  # lower case accepted
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    assert build_source(str(tmp_path), None).dockerfile == "Dockerfile"
    with pytest.raises(BerthClientError, match="not found"):
        build_source(str(tmp_path / "nope"), None)
    with pytest.raises(BerthClientError, match="is not a directory"):
        build_source(str(tmp_path / "Dockerfile"), None)


# --- progress ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(number: int, status: str, **fields: Any) -> BuildStep:
    stage = fields.pop("stage", "build")
    instruction = fields.pop("instruction", f"RUN step {number}")
    return BuildStep(number, 4, stage, instruction, number + 1, status, **fields)  # type: ignore[arg-type]


def context_received(size: int, seconds: float = 0.01) -> list[BuildProgress]:
    """What the builder says while it receives a context of `size` bytes."""
    return [
        BuildProgress("context", "DOWNLOADING", size // 2, 0, "bytes"),
        BuildProgress("context", "DOWNLOADING", size, 0, "bytes"),
        BuildProgress("context", "DONE", size, size, "bytes", duration=seconds),
    ]


def message(text: str, id: str = "warning/1") -> BuildProgress:
    return BuildProgress(id, "DONE", message=text)


def scripted_build(progress: PlainProgress, clock: Clock, fail: bool) -> None:
    """What a builder says for a 4-step, two-stage build whose last step fails or not."""
    for event in context_received(2048):
        progress(event)
    progress(message("load metadata for test/busybox:1"))
    progress(step(1, "CACHED", instruction="FROM test/busybox:1"))
    progress(step(2, "RUNNING", instruction="RUN echo hi > /x"))
    clock.now += 0.512
    progress(BuildOutput(2, "stdout", b"hi\n"))
    progress(step(2, "DONE", instruction="RUN echo hi > /x", layer_digest=LAYER, duration=0.8))
    progress(step(3, "CACHED", stage="", instruction="COPY --from=build /x /x"))
    progress(step(4, "RUNNING", stage="stage-1", instruction="RUN ./test"))
    clock.now += 0.25
    progress(BuildOutput(4, "stderr", b"3 tests failed"))
    if fail:
        progress(step(4, "FAILED", stage="stage-1", instruction="RUN ./test", exit_code=3))
    else:
        progress(step(4, "DONE", stage="stage-1", instruction="RUN ./test", duration=0.3))


PROGRESS_START = """\
#1 [internal] load build context
#1 transferring context: 2.05kB done
#1 DONE 0.0s
#2 load metadata for test/busybox:1
#3 [build 1/4] FROM test/busybox:1
#3 CACHED
#4 [build 2/4] RUN echo hi > /x
#4 0.512 hi
#4 writing layer sha256:{layer} done
#4 DONE 0.8s
#5 [3/4] COPY --from=build /x /x
#5 CACHED
#6 [stage-1 4/4] RUN ./test
#6 0.250 3 tests failed
""".format(layer="a" * 64)


def test_plain_progress_of_a_failed_build() -> None:
    out, clock = io.StringIO(), Clock()
    scripted_build(PlainProgress(out, clock), clock, fail=True)
    assert out.getvalue() == PROGRESS_START + "#6 ERROR: exit code: 3\n"


def test_plain_progress_of_a_build_ends_with_the_export() -> None:
    out, clock = io.StringIO(), Clock()
    progress = PlainProgress(out, clock)
    scripted_build(progress, clock, fail=False)
    clock.now += 0.1
    progress.finish(RESULT)
    assert out.getvalue() == PROGRESS_START + (
        "#6 DONE 0.3s\n"
        "#7 exporting to image\n"
        f"#7 writing image {IMAGE_ID} done\n"
        "#7 naming to test/app:1 done\n"
        "#7 DONE 0.1s\n"
    )


def test_the_export_joins_the_builders_own_export_messages() -> None:
    out, clock = io.StringIO(), Clock()
    progress = PlainProgress(out, clock)
    progress(step(1, "CACHED"))
    progress(BuildProgress("export", "RUNNING", message="exporting to image"))
    progress(BuildProgress("export/layers", "DONE", message="exporting layers done"))
    progress(BuildProgress("export", "DONE", message="exporting to image", duration=0.25))
    progress.finish(RESULT)
    assert out.getvalue().splitlines()[2:] == [
        "#2 exporting to image",
        "#2 exporting layers done",
        f"#2 writing image {IMAGE_ID} done",
        "#2 naming to test/app:1 done",
        "#2 DONE 0.2s",
    ]


def test_output_keeps_what_the_process_wrote_but_the_newline() -> None:
    out, clock = io.StringIO(), Clock()
    progress = PlainProgress(out, clock)
    progress(step(1, "RUNNING"))
    progress(BuildOutput(1, "stdout", b"  indented \xff\n"))
    progress(BuildOutput(1, "stderr", b"no newline"))
    progress(BuildOutput(1, "stdout", b"\n"))
    assert out.getvalue().splitlines()[1:] == [
        "#1 0.000   indented \ufffd",
        "#1 0.000 no newline",
        "#1 0.000 ",
    ]


# --- the commands over a fake builder ---------------------------------------------------------


class FakeBuilder:
    """Replays a scripted build; fails at the end when given an error."""

    def __init__(self, error: BerthClientError | None = None) -> None:
        self.error = error
        self.builds: list[dict[str, Any]] = []
        self.pruned: list[timedelta | None] = []

    def __enter__(self) -> FakeBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def build(
        self,
        context_dir: Path | None,
        options: BuildOptions,
        *,
        dockerfile_text: str | None = None,
        on_event: Callable[[BuildEvent], None],
    ) -> BuildResult:
        self.builds.append({"context": context_dir, "options": options, "text": dockerfile_text})
        for event in context_received(10, 0.0):
            on_event(event)
        on_event(step(1, "RUNNING", instruction="RUN exit 3"))
        on_event(BuildOutput(1, "stdout", b"about to fail\n"))
        if self.error:
            on_event(step(1, "FAILED", instruction="RUN exit 3", exit_code=3))
            raise self.error
        on_event(step(1, "DONE", instruction="RUN exit 3", duration=0.1))
        return RESULT

    def list_cache(self) -> BuildCache:
        entry = CacheEntry("f" * 64, "RUN " + "x" * 60, LAYER, 1234, None, None, 3)
        return BuildCache([entry], 1234)

    def prune_cache(self, unused_for: timedelta | None = None) -> PruneReport:
        self.pruned.append(unused_for)
        return PruneReport(2, 1_200_000)


FAILURE = BerthClientError("step 1/4 (Dockerfile:2) RUN exit 3: exit code 3", "FAILED_PRECONDITION")


@pytest.fixture
def context(tmp_path: Path) -> Path:
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\n")
    return tmp_path / "ctx"


def use(monkeypatch: pytest.MonkeyPatch, fake: FakeBuilder) -> FakeBuilder:
    monkeypatch.setattr(build_cmds, "BuilderClient", lambda address: fake)
    monkeypatch.setenv("BERTH_BUILDER", "fake:1")
    return fake


def test_build_prints_progress_on_stderr(
    context: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = use(monkeypatch, FakeBuilder())
    assert main(["build", "-t", "test/app:1", str(context)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "#2 [build 1/4] RUN exit 3\n" in captured.err
    assert captured.err.endswith("#3 naming to test/app:1 done\n#3 DONE 0.0s\n")
    assert fake.builds[0]["context"] == context
    assert fake.builds[0]["options"].dockerfile == "Dockerfile"


def test_a_failed_build_shows_the_output_then_one_error_line(
    context: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeBuilder(FAILURE))
    assert main(["build", str(context)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert lines[-4:] == [
        "#2 [build 1/4] RUN exit 3",
        "#2 0.000 about to fail",
        "#2 ERROR: exit code: 3",
        "Error: step 1/4 (Dockerfile:2) RUN exit 3: exit code 3",
    ]


def test_quiet_prints_only_the_image_id(
    context: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeBuilder())
    assert main(["build", "-q", str(context)]) == 0
    assert capsys.readouterr() == (IMAGE_ID + "\n", "")


def test_quiet_shows_the_progress_when_the_build_fails(
    context: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeBuilder(FAILURE))
    assert main(["build", "-q", str(context)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-3:] == [
        "#2 0.000 about to fail",
        "#2 ERROR: exit code: 3",
        "Error: step 1/4 (Dockerfile:2) RUN exit 3: exit code 3",
    ]


def test_build_format_json_prints_the_result(
    context: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeBuilder())
    assert main(["build", "--format", "json", str(context)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "digest": RESULT.digest,
        "id": IMAGE_ID,
        "tags": ["test/app:1"],
        "cached_steps": 1,
        "total_steps": 4,
    }


def test_build_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = use(monkeypatch, FakeBuilder())
    monkeypatch.setattr("sys.stdin", io.StringIO("FROM scratch\n"))
    assert main(["build", "-q", "-"]) == 0
    assert fake.builds[0]["context"] is None
    assert fake.builds[0]["text"] == "FROM scratch\n"
    assert fake.builds[0]["options"].dockerfile == ""


def test_builder_ls_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use(monkeypatch, FakeBuilder())
    assert main(["builder", "ls"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["KEY", "INSTRUCTION", "SIZE", "CREATED", "LAST", "USED", "USES"]
    instruction = "RUN " + "x" * 33 + "..."
    assert row.split() == ["f" * 12, *instruction.split(), "1.23kB", "-", "-", "3"]
    full = cache_rows(FakeBuilder().list_cache(), no_trunc=True)[0][1]
    assert full == "RUN " + "x" * 60


@pytest.mark.parametrize("answer", ["n\n", "\n", "", "yes please\n"])
def test_builder_prune_asks_first_and_stops_without_a_yes(
    answer: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = use(monkeypatch, FakeBuilder())
    monkeypatch.setattr("sys.stdin", io.StringIO(answer))
    assert main(["builder", "prune"]) == 0
    assert fake.pruned == []
    assert capsys.readouterr().out.startswith(
        "WARNING! This will remove all dangling build cache. "
        "Are you sure you want to continue? [y/N] "
    )


@pytest.mark.parametrize("answer", ["y\n", "Y\n", "yes\n"])
def test_builder_prune_after_a_yes(
    answer: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = use(monkeypatch, FakeBuilder())
    monkeypatch.setattr("sys.stdin", io.StringIO(answer))
    assert main(["builder", "prune", "--filter", "until=24h"]) == 0
    assert fake.pruned == [timedelta(hours=24)]
    # the answer came from a pipe, not echoed: the report follows the prompt
    assert capsys.readouterr().out == (
        f"{build_cmds.PRUNE_WARNING} [y/N] "
        "Deleted build cache entries: 2\nTotal reclaimed space: 1.2MB\n"
    )


def test_builder_prune_force_does_not_ask(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = use(monkeypatch, FakeBuilder())
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["builder", "prune", "-f"]) == 0
    assert fake.pruned == [None]
    assert "WARNING" not in capsys.readouterr().out
