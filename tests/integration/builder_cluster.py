"""What the builder's integration tests run against: registry, cluster, one node agent and a
builder service, all real processes on loopback, shared by a module's tests (each build runs
containers, so starting everything once keeps the module fast). Plus helpers to drive builds
through the generated gRPC stub and to read what they produced."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from berth.builder.v1 import builder_pb2 as pb
from berth.builder.v1 import builder_pb2_grpc
from berth.client import RegistryClient
from berth.error_details import ErrorDetails, from_rpc_error
from berth.tls import secure_channel
from berth.types.v1 import progress_pb2

from .conftest import NodeProcess, ServiceProcess, Services
from .images import busybox_layer, push_image, tar_of

BASE = "test/busybox:1"
CHUNK = 64 * 1024  # small, so a context spans several messages


@dataclass
class Build:
    """What one Build call streamed back."""

    steps: list[pb.BuildStep] = field(default_factory=list)
    outputs: list[pb.BuildOutput] = field(default_factory=list)
    progress: list[progress_pb2.Progress] = field(default_factory=list)  # of no step
    result: pb.BuildResult | None = None
    error: grpc.RpcError | None = None

    def statuses(self) -> dict[str, str]:
        """Each step's final status by instruction (as written)."""
        return {
            s.instruction: progress_pb2.ProgressState.Name(s.progress.state).removeprefix(
                "PROGRESS_STATE_"
            )
            for s in self.steps
        }

    def output(self) -> list[str]:
        """The lines the steps wrote, without their newlines."""
        return [o.data.decode().removesuffix("\n") for o in self.outputs]

    def details(self) -> ErrorDetails:
        assert self.error is not None
        return from_rpc_error(self.error)


@dataclass
class BuildCluster:
    services: Services
    registry: ServiceProcess
    cluster: ServiceProcess
    node: NodeProcess
    builder: ServiceProcess
    tmp: Path

    def build(self, files: dict[str, str | bytes], **options: object) -> Build:
        """Build a context made of `files` (name -> content) with these BuildOptions."""
        build = Build()
        with secure_channel(self.builder.address) as channel:
            stub = builder_pb2_grpc.BuilderServiceStub(channel)
            try:
                for response in stub.Build(requests(files, **options), timeout=120):
                    kind = response.WhichOneof("event")
                    if kind == "result":
                        build.result = response.result
                    elif kind == "step":
                        build.steps.append(response.step)
                    elif kind == "output":
                        build.outputs.append(response.output)
                    else:
                        build.progress.append(response.progress)
            except grpc.RpcError as e:
                build.error = e
        return build

    def image_config(self, repository: str, reference: str) -> dict:
        """The config of an image in the registry."""
        with RegistryClient(self.registry.address) as registry:
            manifest = json.loads(registry.get_manifest(repository, reference).content)
            path = self.tmp / f"config-{uuid.uuid4().hex[:8]}"
            registry.pull_blob(repository, manifest["config"]["digest"], path)
        return json.loads(path.read_text())


def requests(files: dict[str, str | bytes], **options: object) -> Iterator[pb.BuildRequest]:
    """A Build request stream: the options, then a context tar made of `files`."""
    context = tar_of({k: v.encode() if isinstance(v, str) else v for k, v in files.items()})
    yield pb.BuildRequest(options=pb.BuildOptions(**options))  # type: ignore[arg-type]
    for offset in range(0, len(context), CHUNK):
        yield pb.BuildRequest(context=context[offset : offset + CHUNK])


@pytest.fixture(scope="module")
def build_cluster(
    tmp_path_factory: pytest.TempPathFactory, etcd_endpoint: str
) -> Iterator[BuildCluster]:
    tmp = tmp_path_factory.mktemp("builder")
    services = Services(tmp, etcd_endpoint, f"/berth-build-{uuid.uuid4().hex[:8]}/")
    node: NodeProcess | None = None
    try:
        registry = services.registry()
        cluster = services.start("cluster")
        node = NodeProcess(services, tmp / "node", f"build-{uuid.uuid4().hex[:6]}", registry)
        node.start()
        builder = services.start(
            "builder",
            f"--data-dir={tmp / 'builder'}",
            f"--registry={registry.address}",
            f"--cluster={cluster.address}",
        )
        with RegistryClient(registry.address) as client:
            repository, tag = BASE.split(":")
            push_image(client, repository, tag, [busybox_layer()], tmp)
        yield BuildCluster(services, registry, cluster, node, builder, tmp)
    finally:
        try:
            if node is not None:
                node.cleanup()
        finally:  # a failing cleanup must not leave the services running
            services.stop_all()
