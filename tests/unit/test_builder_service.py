"""The Build protocol and the builder's structured errors, through a real gRPC server in this
process (the servicer, the common interceptor, the builder core) with the registry, the image
store, the cache and the RUN runner faked: the first message, context progress before the
client half-closes, .dockerignore applied by the server, and each error's reason, metadata and
field as a client reads them from the status details."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from berth.builder.v1 import builder_pb2 as pb
from berth.builder.v1 import builder_pb2_grpc
from berth.error_details import ErrorDetails, from_rpc_error
from berth.types.v1 import container_pb2, progress_pb2
from berthd.builder.cache import CacheRecord, cache_page
from berthd.builder.executor import Builder
from berthd.builder.runner import RunFailed, RunResult, RunSpec
from berthd.builder.service import BuilderServicer
from berthd.common.errors import NotFound
from berthd.common.interceptor import ObservabilityInterceptor
from berthd.common.oci.manifest import Descriptor
from berthd.common.security.authorize import Authorizer
from berthd.common.security.principal import Principal, from_certificate

DIGEST = "sha256:" + "e" * 64


class AsAdmin(Authorizer):
    """This plaintext test server treats every caller as the administrator."""

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return from_certificate("user:admin")


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# --- fakes of what the builder calls -----------------------------------------------------------


class FakeRegistry:
    def __init__(self) -> None:
        self.blobs: list[str] = []

    async def push_blob(self, repository: str, path: Path, digest: str, size: int) -> None:
        self.blobs.append(digest)

    async def mount_blob(self, repository: str, digest: str) -> bool:
        return True

    async def stat_blob(self, repository: str, digest: str) -> Any:
        return None

    async def push_bytes(self, repository: str, data: bytes, media_type: str) -> Descriptor:
        return Descriptor(media_type, DIGEST, len(data))


class FakeImages:
    def __init__(self) -> None:
        self.registry = FakeRegistry()

    async def resolve(self, reference: str) -> Any:
        raise NotFound(f"image {reference} not found", reason="MANIFEST_UNKNOWN")

    async def write_manifest(self, *args: Any) -> str:
        return DIGEST


class FakeCache:
    def __init__(self, records: list[CacheRecord] | None = None) -> None:
        self.records = records or []

    async def get(self, key: str) -> None:
        return None

    async def put(self, record: CacheRecord) -> None:
        pass

    async def set_image(self, key: str, digest: str) -> None:
        pass

    async def list(self) -> list[CacheRecord]:
        return sorted(self.records, key=lambda r: (-r.last_used, r.key))


class FakeRunner:
    """A RUN prints a line on each stream, then exits with `exit_code`."""

    def __init__(self, exit_code: int = 3) -> None:
        self.exit_code = exit_code
        self.specs: list[RunSpec] = []

    async def run(self, spec: RunSpec, output: Callable[[str, bytes], None]) -> RunResult:
        self.specs.append(spec)
        output("stdout", b"about to fail\n")
        output("stderr", b"no newline")
        if self.exit_code:
            raise RunFailed(spec, self.exit_code)
        return RunResult(None)


# --- a server ----------------------------------------------------------------------------------


class Server:
    def __init__(self, address: str, stub: builder_pb2_grpc.BuilderServiceStub, runner: FakeRunner):
        self.address = address
        self.stub = stub  # asyncio
        self.runner = runner

    async def build(
        self, context: bytes, chunk: int = 1024, **options: Any
    ) -> tuple[list[pb.BuildResponse], grpc.RpcError | None]:
        """A build with the options, then `context` in chunks, through a synchronous stub as
        BuilderClient makes it (in a thread: the server runs on this loop). The server may end
        the call before it read every chunk (an error in the options); the status is the
        server's all the same (grpc.aio's client would report a failed write instead)."""

        def requests() -> Iterator[pb.BuildRequest]:
            yield pb.BuildRequest(options=pb.BuildOptions(**options))
            for offset in range(0, len(context), chunk):
                yield pb.BuildRequest(context=context[offset : offset + chunk])

        def call() -> tuple[list[pb.BuildResponse], grpc.RpcError | None]:
            responses: list[pb.BuildResponse] = []
            with grpc.insecure_channel(self.address) as channel:
                stub = builder_pb2_grpc.BuilderServiceStub(channel)
                try:
                    for response in stub.Build(requests(), timeout=30):
                        responses.append(response)
                except grpc.RpcError as err:
                    return responses, err
            return responses, None

        return await asyncio.to_thread(call)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    runner = FakeRunner()
    cache = FakeCache(
        [CacheRecord(f"{i:064x}", f"RUN {i}", None, "", {}, last_used=i // 2) for i in range(5)]
    )
    builder = Builder(
        None,  # type: ignore[arg-type]  # the store holds build records: no build gets there
        FakeImages(),  # type: ignore[arg-type]
        cache,  # type: ignore[arg-type]
        runner,  # type: ignore[arg-type]
        tmp_path,
        max_context_bytes=64 * 1024,
        max_context_files=100,
    )
    grpc_server = grpc.aio.server(interceptors=[ObservabilityInterceptor("builder", AsAdmin(None))])
    builder_pb2_grpc.add_BuilderServiceServicer_to_server(BuilderServicer(builder), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        yield Server(address, builder_pb2_grpc.BuilderServiceStub(channel), runner)
    await grpc_server.stop(None)


def details(err: grpc.RpcError | None) -> ErrorDetails:
    assert err is not None
    return from_rpc_error(err)


def steps(responses: list[pb.BuildResponse]) -> list[tuple[int, str, str]]:
    return [
        (r.step.number, r.step.instruction, progress_pb2.ProgressState.Name(r.step.progress.state))
        for r in responses
        if r.HasField("step")
    ]


# --- the protocol ------------------------------------------------------------------------------


async def test_the_first_message_must_be_the_options(server: Server) -> None:
    async def requests() -> AsyncIterator[pb.BuildRequest]:
        yield pb.BuildRequest(context=tar_of({"Dockerfile": b"FROM scratch\n"}))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in server.stub.Build(requests()):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value).reason == "CONTEXT_INVALID"
    assert "first BuildRequest must carry the options" in str(caught.value.details())


async def test_options_after_the_first_message_are_refused(server: Server) -> None:
    async def requests() -> AsyncIterator[pb.BuildRequest]:
        yield pb.BuildRequest(options=pb.BuildOptions(dockerfile_content="FROM scratch\n"))
        yield pb.BuildRequest(options=pb.BuildOptions(target="x"))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in server.stub.Build(requests()):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value).reason == "CONTEXT_INVALID"


async def test_context_progress_comes_while_the_context_arrives(server: Server) -> None:
    """The client has not half-closed, and it already hears how much arrived."""
    context = tar_of({"Dockerfile": b"FROM scratch\nRUN true\n", "a": b"x" * 5000})
    call = server.stub.Build()
    await call.write(pb.BuildRequest(options=pb.BuildOptions()))
    await call.write(pb.BuildRequest(context=context[:4096]))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.progress == progress_pb2.Progress(
        id="context",
        state=progress_pb2.PROGRESS_STATE_DOWNLOADING,
        current=4096,
        unit=progress_pb2.PROGRESS_UNIT_BYTES,
    )
    await call.write(pb.BuildRequest(context=context[4096:]))
    await call.done_writing()
    rest = []
    with pytest.raises(grpc.aio.AioRpcError):  # the fake RUN fails: the build ends there
        while (message := await call.read()) != grpc.aio.EOF:
            rest.append(message)
    received = [r.progress for r in rest if r.progress.id == "context"]
    done = received[-1]
    assert done.state == progress_pb2.PROGRESS_STATE_DONE
    assert done.current == done.total == len(context)
    assert done.HasField("duration")
    assert steps(rest)[0] == (1, "FROM scratch", "PROGRESS_STATE_CACHED")


async def test_the_server_applies_dockerignore_to_what_the_client_sent(server: Server) -> None:
    """A raw client sends an ignored file anyway: COPY cannot see it."""
    files = {
        "Dockerfile": b"FROM scratch\nCOPY kept.txt /\nCOPY secret.txt /\n",
        ".dockerignore": b"secret.txt\n",
        "kept.txt": b"kept",
        "secret.txt": b"password",
    }
    responses, err = await server.build(tar_of(files))
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "COPY failed: file not found in build context: secret.txt" in str(err.details())
    found = details(err)
    assert found.reason == "COPY_FAILED"
    assert found.metadata == {"line": "3", "step": "3"}
    assert steps(responses) == [
        (1, "FROM scratch", "PROGRESS_STATE_CACHED"),
        (2, "COPY kept.txt /", "PROGRESS_STATE_RUNNING"),
        (2, "COPY kept.txt /", "PROGRESS_STATE_DONE"),
        (3, "COPY secret.txt /", "PROGRESS_STATE_FAILED"),
    ]
    done = [r.step for r in responses if r.HasField("step")][2]
    assert done.layer_digest.startswith("sha256:") and done.progress.id == "step/2"
    assert done.progress.HasField("duration") and not done.HasField("exit_code")


async def test_a_context_past_the_limit_is_context_too_large(server: Server) -> None:
    big = tar_of({"Dockerfile": b"FROM scratch\n", "big": b"x" * 70_000})
    responses, err = await server.build(big, chunk=16 * 1024)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (details(err).reason, details(err).metadata) == (
        "CONTEXT_TOO_LARGE",
        {"limit_bytes": str(64 * 1024)},
    )
    assert responses and all(r.progress.id == "context" for r in responses)


# --- errors ------------------------------------------------------------------------------------


async def test_a_failing_run_is_run_failed_with_its_step_line_and_exit_code(
    server: Server,
) -> None:
    dockerfile = b"FROM scratch\nCOPY a /a\nRUN ./fail\n"
    responses, err = await server.build(tar_of({"Dockerfile": dockerfile, "a": b"a"}))
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(err.details()).startswith("Dockerfile:3: RUN ./fail: process")
    found = details(err)
    assert found.reason == "RUN_FAILED"
    assert found.metadata == {"step": "3", "line": "3", "exit_code": "3"}
    assert server.runner.specs[0].step == 3
    outputs = [r.output for r in responses if r.HasField("output")]
    assert outputs == [
        pb.BuildOutput(step=3, stream=container_pb2.LOG_STREAM_STDOUT, data=b"about to fail\n"),
        pb.BuildOutput(step=3, stream=container_pb2.LOG_STREAM_STDERR, data=b"no newline"),
    ]
    failed = [r.step for r in responses if r.HasField("step")][-1]
    assert failed.progress.state == progress_pb2.PROGRESS_STATE_FAILED
    assert failed.HasField("exit_code") and failed.exit_code == 3


async def test_a_dockerfile_error_is_dockerfile_invalid_with_its_line(server: Server) -> None:
    dockerfile = b"FROM scratch\n\nFROBNICATE x\n"
    _, err = await server.build(tar_of({"Dockerfile": dockerfile}))
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.details()) == "Dockerfile:3: unknown instruction: FROBNICATE"
    found = details(err)
    assert (found.reason, found.metadata) == ("DOCKERFILE_INVALID", {"line": "3"})
    assert [name for name, _ in found.field_violations] == ["options.dockerfile"]


async def test_a_dockerfile_sent_as_text_names_that_field(server: Server) -> None:
    _, err = await server.build(b"", dockerfile_content="FROM scratch\nCOPY --chown a b\n")
    found = details(err)
    assert found.reason == "DOCKERFILE_INVALID" and found.metadata["line"] == "2"
    assert [name for name, _ in found.field_violations] == ["options.dockerfile_content"]


async def test_an_instruction_error_in_a_step_names_the_step(server: Server) -> None:
    dockerfile = b"FROM scratch\nENV A=1\nCOPY --chmod=rwx a /a\n"
    _, err = await server.build(tar_of({"Dockerfile": dockerfile, "a": b""}))
    assert str(err.details()).startswith("Dockerfile:3: COPY: --chmod=rwx: expected an octal")
    found = details(err)
    assert found.reason == "DOCKERFILE_INVALID"
    assert found.metadata == {"line": "3", "step": "3"}


@pytest.mark.parametrize(
    ("options", "code", "reason", "metadata", "field"),
    [
        (
            {"dockerfile": "nope/Dockerfile"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "DOCKERFILE_NOT_FOUND",
            {"path": "nope/Dockerfile"},
            "options.dockerfile",
        ),
        (
            {"target": "missing"},
            grpc.StatusCode.NOT_FOUND,
            "STAGE_NOT_FOUND",
            {"stage": "missing"},
            "options.target",
        ),
        (
            {"tags": ["registry.example.com/app:1"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "TAG_INVALID",
            {"tag": "registry.example.com/app:1"},
            "options.tags",
        ),
        (
            {"build_args": {"A B": "1"}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "BUILD_ARG_INVALID",
            {"name": "A B"},
            "options.build_args",
        ),
    ],
)
async def test_bad_options_have_their_reason_and_field(
    server: Server,
    options: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
    field: str,
) -> None:
    _, err = await server.build(tar_of({"Dockerfile": b"FROM scratch\n"}), **options)
    assert err is not None and err.code() == code
    found = details(err)
    assert (found.reason, found.metadata) == (reason, metadata)
    assert [name for name, _ in found.field_violations] == [field]


async def test_a_missing_base_image_is_base_image_not_found(server: Server) -> None:
    responses, err = await server.build(tar_of({"Dockerfile": b"FROM test/nothing:1\n"}))
    assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND
    assert str(err.details()).startswith("Dockerfile:1: FROM test/nothing:1: image")
    found = details(err)
    assert found.reason == "BASE_IMAGE_NOT_FOUND"
    assert found.metadata == {
        "image": "test/nothing:1",
        "step": "1",
        "line": "1",
        "cause": "MANIFEST_UNKNOWN",
    }
    assert steps(responses) == [(1, "FROM test/nothing:1", "PROGRESS_STATE_FAILED")]


async def test_an_unused_build_arg_is_a_warning(server: Server) -> None:
    dockerfile = b"FROM scratch\nRUN x\n"
    responses, _ = await server.build(tar_of({"Dockerfile": dockerfile}), build_args={"X": "1"})
    warnings = [r.progress for r in responses if r.progress.id.startswith("warning/")]
    assert [(w.id, w.message) for w in warnings] == [
        ("warning/1", "[Warning] One or more build-args [X] were not consumed")
    ]


# --- the cache ---------------------------------------------------------------------------------


async def test_list_cache_pages_with_opaque_tokens(server: Server) -> None:
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await server.stub.ListCache(pb.ListCacheRequest(page_size=2, page_token=token))
        seen += [e.key for e in reply.entries]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    # most recently used first (last_used 2, 1, 1, 0, 0), then by key
    assert [int(k, 16) for k in seen] == [4, 2, 3, 0, 1]
    assert pages == 3
    everything = await server.stub.ListCache(pb.ListCacheRequest())
    assert len(everything.entries) == 5 and everything.next_page_token == ""
    entry = everything.entries[0]
    assert entry.HasField("created_at") and entry.HasField("last_used_at")


@pytest.mark.parametrize("token", ["garbage", "W10", "!!!", "eyJhIjoxfQ"])
async def test_a_bad_page_token_is_invalid_page_token(server: Server, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.ListCache(pb.ListCacheRequest(page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(caught.value)
    assert found.reason == "INVALID_PAGE_TOKEN"
    assert [name for name, _ in found.field_violations] == ["page_token"]


def test_cache_pages_are_capped_and_a_used_entry_is_not_listed_twice() -> None:
    def page(size: int, token: str = "") -> pb.ListCacheRequest:
        return pb.ListCacheRequest(page_size=size, page_token=token)

    records = [CacheRecord(f"{i:064x}", "RUN", None, "", {}, last_used=100 - i) for i in range(5)]
    first, token = cache_page(records, page(2))
    assert [r.last_used for r in first] == [100, 99] and token
    # The first entry is used again before the next page: it moves to the front.
    again = [CacheRecord(first[0].key, "RUN", None, "", {}, last_used=200), *records[1:]]
    second, token = cache_page(again, page(2, token))
    assert [r.last_used for r in second] == [98, 97]
    third, token = cache_page(again, page(2, token))
    assert [r.last_used for r in third] == [96] and token == ""
    many = [CacheRecord(f"{i:064x}", "RUN", None, "", {}) for i in range(1500)]
    assert len(cache_page(many, page(5000))[0]) == 1000
    assert len(cache_page(many, page(0))[0]) == 100


async def test_a_negative_page_size_is_invalid(server: Server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.ListCache(pb.ListCacheRequest(page_size=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in details(caught.value).field_violations] == ["page_size"]
