"""Every RPC of every service is authorized by one table (issue "Security"): walked through the
servers' own reflection, each method is called with no credential, with a reader's token and
with a node's certificate, over real TLS against real processes and etcd."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from berth.client.access import AccessClient
from berthd.common.security.permissions import REPOSITORY_PERMISSIONS, Permission, rule_for
from tests.integration.conftest import ClusterCA, NodeProcess, ServiceProcess, Services

pytestmark = pytest.mark.integration

# Methods that stream until the client hangs up: called with a short deadline.
ENDLESS = {"/grpc.health.v1.Health/Watch"}


@dataclass(frozen=True)
class Method:
    path: str  # /package.Service/Method
    client_streaming: bool
    server_streaming: bool


def reflected_methods(address: str, credentials: grpc.ChannelCredentials) -> Iterator[Method]:
    """Every method the server at `address` says it serves, by its reflection service."""
    with grpc.secure_channel(address, credentials) as channel:
        ask = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (listing,) = ask(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = [s.name for s in listing.list_services_response.service]
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in names
        ]
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for reply in ask(iter(requests), timeout=10):
            for raw in reply.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[proto.name] = proto
    for proto in files.values():
        for service in proto.service:
            full = f"{proto.package}.{service.name}"
            if full not in names:
                continue
            for m in service.method:
                yield Method(f"/{full}/{m.name}", m.client_streaming, m.server_streaming)


def call_code(
    address: str, credentials: grpc.ChannelCredentials, method: Method
) -> grpc.StatusCode:
    """The status of `method` called with one empty request message, spoken as raw bytes."""
    timeout = 2 if method.path in ENDLESS else 15
    with grpc.secure_channel(address, credentials) as channel:
        try:
            if method.client_streaming and method.server_streaming:
                list(channel.stream_stream(method.path)(iter([b""]), timeout=timeout))
            elif method.client_streaming:
                channel.stream_unary(method.path)(iter([b""]), timeout=timeout)
            elif method.server_streaming:
                for _ in channel.unary_stream(method.path)(b"", timeout=timeout):
                    break
            else:
                channel.unary_unary(method.path)(b"", timeout=timeout)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.fixture
def berth(
    services: Services, registry: ServiceProcess, node_agent: NodeProcess, tmp_path: Path
) -> dict[str, ServiceProcess]:
    """Every berth service, each with its public port."""
    assert node_agent.process is not None
    return {
        "registry": registry,
        "cluster": services.start("cluster"),
        "image": services.start("image", f"--data-dir={tmp_path / 'image'}"),
        "builder": services.start("builder", f"--data-dir={tmp_path / 'builder'}"),
        "node": node_agent.process,
    }


def admin(cluster_ca: ClusterCA) -> grpc.ChannelCredentials:
    cert = cluster_ca.dir / "client.crt"
    return grpc.ssl_channel_credentials(
        cluster_ca.ca_cert.read_bytes(),
        cert.with_suffix(".key").read_bytes(),
        cert.read_bytes(),
    )


def with_token(cluster_ca: ClusterCA, token: str) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes()),
        grpc.access_token_call_credentials(token),
    )


def anonymous_may_call(path: str) -> bool:
    """Health, GetIdentity, JoinNode (its join token is checked by the handler), and the
    registry's listings, which show an anonymous caller only public repositories."""
    rule = rule_for(path)
    assert rule is not None, path
    if rule.permission == Permission.PUBLIC:
        return True
    return rule.permission in REPOSITORY_PERMISSIONS and not rule.repository


def test_every_rpc_refuses_a_caller_without_credential_and_a_reader_every_mutation(
    berth: dict[str, ServiceProcess], cluster_ca: ClusterCA
) -> None:
    with AccessClient(berth["cluster"].address) as access:
        _, reader = access.create_token("walk-reader", "reader")
    anonymous = grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    walked: set[str] = set()
    for name, process in berth.items():
        methods = list(reflected_methods(process.address, admin(cluster_ca)))
        assert methods, name
        for method in methods:
            walked.add(method.path)
            rule = rule_for(method.path)
            assert rule is not None, f"{name} serves {method.path}, which has no rule"
            code = call_code(process.public_address, anonymous, method)
            if anonymous_may_call(method.path):
                assert code != grpc.StatusCode.PERMISSION_DENIED, (name, method.path)
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (name, method.path, code)
            if rule.mutates and rule.permission != Permission.PUBLIC:
                code = call_code(process.public_address, with_token(cluster_ca, reader), method)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (name, method.path, code)
    # The walk reached every service's own methods.
    for service in ("RegistryService", "ClusterService", "AccessService", "ImageService"):
        assert any(f".{service}/" in path for path in walked), service
    assert any(".BuilderService/" in p for p in walked) and any(
        ".NodeService/" in p for p in walked
    )


def test_plaintext_and_certificateless_connections_to_the_main_port_fail(
    berth: dict[str, ServiceProcess], cluster_ca: ClusterCA
) -> None:
    health = Method("/grpc.health.v1.Health/Check", False, False)
    anonymous = grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    for name, process in berth.items():
        for address in (process.address, process.public_address):
            with grpc.insecure_channel(address) as channel:
                with pytest.raises(grpc.RpcError) as failed:
                    channel.unary_unary(health.path)(b"", timeout=5)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (name, address)
        # The main port wants a client certificate: without one, no connection at all.
        assert call_code(process.address, anonymous, health) == grpc.StatusCode.UNAVAILABLE
        # Health stays open on the public port.
        assert call_code(process.public_address, anonymous, health) == grpc.StatusCode.OK


def test_a_node_certificate_cannot_call_admin_rpcs(
    services: Services, cluster_ca: ClusterCA
) -> None:
    cluster = services.start("cluster")
    cert = cluster_ca.issue("node-x", "node:node-x", ["127.0.0.1"])
    node = grpc.ssl_channel_credentials(
        cluster_ca.ca_cert.read_bytes(), cert.with_suffix(".key").read_bytes(), cert.read_bytes()
    )
    for path in (
        "/berth.cluster.v1.AccessService/CreateToken",
        "/berth.cluster.v1.AccessService/ListTokens",
        "/berth.cluster.v1.ClusterService/DrainNode",
        "/berth.cluster.v1.ClusterService/RunContainer",
    ):
        code = call_code(cluster.address, node, Method(path, False, False))
        assert code == grpc.StatusCode.PERMISSION_DENIED, path


def test_an_expired_certificate_is_refused(services: Services, cluster_ca: ClusterCA) -> None:
    cluster = services.start("cluster")
    issued = cluster_ca.ca.issue("user:admin", ["127.0.0.1"], datetime.timedelta(seconds=2))
    expired = grpc.ssl_channel_credentials(
        cluster_ca.ca_cert.read_bytes(), issued.key_pem, issued.cert_pem
    )
    health = Method("/grpc.health.v1.Health/Check", False, False)
    assert call_code(cluster.address, expired, health) == grpc.StatusCode.OK
    time.sleep(max(0.0, (issued.not_after - datetime.datetime.now(datetime.UTC)).total_seconds()))
    time.sleep(1)
    assert call_code(cluster.address, expired, health) == grpc.StatusCode.UNAVAILABLE


def test_a_revoked_token_is_refused_within_seconds_on_every_instance(
    services: Services, cluster_ca: ClusterCA
) -> None:
    first, second = services.start("cluster"), services.start("cluster")
    with AccessClient(first.address) as access:
        info, secret = access.create_token("revoke-me", "operator", expires_in=3600)
    nodes = Method("/berth.cluster.v1.ClusterService/ListNodes", False, False)
    for instance in (first, second):
        assert call_code(instance.public_address, with_token(cluster_ca, secret), nodes) == (
            grpc.StatusCode.OK
        )
    with AccessClient(first.address) as access:
        assert access.delete_token(info.name).id == info.id
    deadline = time.monotonic() + 10
    refused: set[str] = set()
    while time.monotonic() < deadline and len(refused) < 2:
        for instance in (first, second):
            code = call_code(instance.public_address, with_token(cluster_ca, secret), nodes)
            if code == grpc.StatusCode.UNAUTHENTICATED:
                refused.add(instance.address)
        time.sleep(0.2)
    assert refused == {first.address, second.address}


def test_tokens_show_their_principal_and_scope(services: Services, cluster_ca: ClusterCA) -> None:
    cluster = services.start("cluster")
    with AccessClient(cluster.address) as access:
        assert access.identity().principal == "user:admin"
        info, secret = access.create_token("team-dev", "developer", ["team/*"])
        assert info.created_by == "user:admin" and info.repositories == ["team/*"]
        assert "secret" not in repr(access.tokens())
        with pytest.raises(Exception, match="exists"):
            access.create_token("team-dev", "reader")
    channel = grpc.secure_channel(cluster.public_address, with_token(cluster_ca, secret))
    with channel:
        from berth.cluster.v1 import access_pb2, access_pb2_grpc

        me = access_pb2_grpc.AccessServiceStub(channel).GetIdentity(
            access_pb2.GetIdentityRequest(), timeout=10
        )
    assert (me.principal, me.credential, me.role) == ("user:team-dev", "token", "developer")
    assert list(me.repositories) == ["team/*"] and "token:manage" not in me.permissions
