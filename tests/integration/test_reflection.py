"""Server reflection answers under `grpc.reflection.v1` (what current clients ask for: grpcurl,
grpc-js, Postman) as well as v1alpha, and describes berth's services and itself."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from berth.tls import secure_channel
from tests.integration.conftest import ServiceProcess


def _ask(address: str, package: str, *requests: reflection_pb2.ServerReflectionRequest) -> list:
    """One reflection stream under `package`, spoken as raw bytes: nothing of the server's
    reflection code is reused by the client side."""
    with secure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=10))


def _files(
    reply: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


def test_reflection_v1_and_v1alpha_list_and_describe(registry: ServiceProcess) -> None:
    for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
        (listing,) = _ask(
            registry.address, package, reflection_pb2.ServerReflectionRequest(list_services="")
        )
        names = {s.name for s in listing.list_services_response.service}
        assert {
            "berth.registry.v1.RegistryService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names, (package, names)

    (described,) = _ask(
        registry.address,
        "grpc.reflection.v1",
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="berth.registry.v1.RegistryService"
        ),
    )
    files = {f.name: f for f in _files(described)}
    registry_file = files["berth/registry/v1/registry.proto"]
    assert "StartUpload" in {m.name for m in registry_file.service[0].method}
    # Its imports come along, so a client can build every message type.
    assert "berth/types/v1/types.proto" in files

    (itself,) = _ask(
        registry.address,
        "grpc.reflection.v1",
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
    )
    (v1_file,) = _files(itself)
    assert v1_file.package == "grpc.reflection.v1"
    method = v1_file.service[0].method[0]
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


def test_unknown_symbol_is_an_error_response_not_a_failed_call(registry: ServiceProcess) -> None:
    (reply,) = _ask(
        registry.address,
        "grpc.reflection.v1",
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
    )
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
