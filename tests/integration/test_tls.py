"""TLS on every port: plaintext and strangers are refused, identities reach the server, etcd
requires a client certificate, and a certificate is renewed while the service keeps serving."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.client import NodeClient, RegistryClient
from berth.image.v1 import image_pb2, image_pb2_grpc
from berth.tls import secure_channel
from berthd.common.errors import Unavailable
from berthd.common.security.ca import CertificateAuthority, certificate_identity
from berthd.common.store import Store

from .conftest import ClusterCA, NodeProcess, ServiceProcess, Services, wait_until
from .images import busybox_layer, push_image


def check(channel: grpc.Channel, timeout: float = 5) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=timeout
    )
    return reply.status


def refused(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.StatusCode:
    """The code of a health check that must fail (plaintext without credentials)."""
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel, pytest.raises(grpc.RpcError) as err:
        check(channel, timeout=3)
    return err.value.code()


def served_certificate(address: str, ca: ClusterCA) -> x509.Certificate:
    """The certificate a service presents to a new connection (verified against the CA)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca.ca_cert))
    context.load_cert_chain(os.environ["BERTH_TLS_CERT"], os.environ["BERTH_TLS_KEY"])
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def log_lines(service: ServiceProcess) -> list[dict]:
    lines = []
    for line in service.log.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_plaintext_is_refused(registry: ServiceProcess) -> None:
    assert refused(registry.address) == grpc.StatusCode.UNAVAILABLE


def test_a_client_with_the_ca_and_a_certificate_connects(registry: ServiceProcess) -> None:
    with secure_channel(registry.address) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_service_presents_its_identity(registry: ServiceProcess, cluster_ca: ClusterCA) -> None:
    cert = served_certificate(registry.address, cluster_ca)
    assert certificate_identity(cert.public_bytes(serialization.Encoding.PEM)) == "service:registry"
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert names[0].value == "service:registry"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    # 24 h, plus the minute a certificate is backdated for clock skew.
    assert datetime.timedelta(hours=24) <= life <= datetime.timedelta(hours=24, minutes=2)


def test_the_callers_identity_reaches_the_server(
    registry: ServiceProcess, cluster_ca: ClusterCA
) -> None:
    cert = cluster_ca.issue("probe", "service:probe")
    credentials = grpc.ssl_channel_credentials(
        cluster_ca.ca_cert.read_bytes(),
        cert.with_suffix(".key").read_bytes(),
        cert.read_bytes(),
    )
    with grpc.secure_channel(registry.address, credentials) as channel:
        check(channel)
    with secure_channel(registry.address) as channel:  # the test's own user:admin certificate
        check(channel)

    def identities() -> set[str]:
        return {
            line.get("identity", "")
            for line in log_lines(registry)
            if line.get("method") == "/grpc.health.v1.Health/Check"
        }

    wait_until(lambda: {"service:probe", "user:admin"} <= identities(), 5, "rpc log lines")


def test_a_service_calling_another_presents_its_certificate(
    services: Services, registry: ServiceProcess, tmp_path: Path
) -> None:
    """The image service's calls to the registry carry `service:image` (internal mTLS)."""
    with RegistryClient(registry.address) as client:
        push_image(client, "tls/probe", "1", [b"probe"], tmp_path)
    image = services.start("image", f"--data-dir={services.tmp / 'image'}")
    with secure_channel(image.address) as channel:
        # The names come from etcd; the image's manifest and config from the registry.
        listed = image_pb2_grpc.ImageServiceStub(channel).ListImages(
            image_pb2.ListImagesRequest(), timeout=10
        )
    assert [(i.repository, i.tag) for i in listed.images] == [("tls/probe", "1")]

    def callers() -> set[str]:
        return {line.get("identity", "") for line in log_lines(registry) if "method" in line}

    wait_until(lambda: "service:image" in callers(), 10, "the image service's call")
    assert refused(image.address) == grpc.StatusCode.UNAVAILABLE


def test_a_node_agent_pulls_as_itself(
    node_agent: NodeProcess, node: NodeClient, busybox: str, registry: ServiceProcess
) -> None:
    """The node agent's calls to the registry carry `node:<id>`; its own port refuses
    plaintext like every other."""
    node.pull(busybox)
    callers = {line.get("identity", "") for line in log_lines(registry) if "method" in line}
    assert f"node:{node_agent.node_id}" in callers
    assert refused(node_agent.address) == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(
    registry: ServiceProcess, cluster_ca: ClusterCA, tmp_path: Path
) -> None:
    stranger = CertificateAuthority.create("another CA")
    issued = stranger.issue("service:registry", ["127.0.0.1"])
    # A client certificate the cluster CA did not sign: the handshake fails.
    foreign_client = grpc.ssl_channel_credentials(
        cluster_ca.ca_cert.read_bytes(), issued.key_pem, issued.cert_pem
    )
    with (
        grpc.secure_channel(registry.address, foreign_client) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        check(channel, timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts only the other CA does not accept the service's certificate.
    own = Path(os.environ["BERTH_TLS_CERT"])
    wrong_root = grpc.ssl_channel_credentials(
        stranger.cert_pem, own.with_suffix(".key").read_bytes(), own.read_bytes()
    )
    with (
        grpc.secure_channel(registry.address, wrong_root) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        check(channel, timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_is_refused(
    registry: ServiceProcess, cluster_ca: ClusterCA
) -> None:
    """Mutual TLS: grpc's Python server can only require client certificates or not ask for
    them (docs/security.md), and berth requires them."""
    ca_only = grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    with (
        grpc.secure_channel(registry.address, ca_only) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        check(channel, timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_etcd_refuses_a_client_without_a_certificate(
    etcd_endpoint: str, etcd_prefix: str, cluster_ca: ClusterCA
) -> None:
    ca_only = grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    store = Store(etcd_endpoint, etcd_prefix, lambda: ca_only)
    with pytest.raises(Unavailable):
        await store.connect()
    await store.close()
    # With the client certificate the same etcd answers.
    store = Store(etcd_endpoint, etcd_prefix)
    await store.connect()
    await store.put("probe", b"1")
    assert (await store.get("probe")).value == b"1"
    await store.delete_prefix("")
    await store.close()


def test_etcd_refuses_plaintext(etcd_endpoint: str) -> None:
    host, _, port = etcd_endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: etcd\r\n\r\n")
        reply = sock.recv(200)
    assert b'"health":"true"' not in reply


def test_a_certificate_is_renewed_while_serving(services: Services, cluster_ca: ClusterCA) -> None:
    """A 30 s certificate is replaced at two thirds of its life; an open stream survives and
    new connections get the new certificate."""
    registry = services.start(
        "registry", f"--data-dir={services.tmp / 'registry-data'}", "--tls-lifetime=30"
    )
    first = served_certificate(registry.address, cluster_ca)
    with secure_channel(registry.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        statuses: list[int] = []

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled at the end
                statuses.extend(reply.status for reply in watch)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: statuses, 5, "the first health status")
        deadline = time.monotonic() + 40
        while served_certificate(registry.address, cluster_ca).serial_number == first.serial_number:
            assert time.monotonic() < deadline, "the certificate was not renewed"
            time.sleep(1)
        renewed = served_certificate(registry.address, cluster_ca)
        life = renewed.not_valid_after_utc - renewed.not_valid_before_utc
        assert life <= datetime.timedelta(seconds=32)
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        # The stream opened before the renewal is still there, on the old connection.
        assert watch.is_active()
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reader.join(5)
    with secure_channel(registry.address) as fresh:
        assert check(fresh) == health_pb2.HealthCheckResponse.SERVING
    assert any(line.get("msg") == "certificate renewed" for line in log_lines(registry))
    # The registry reached etcd again with its new certificate (a new connection).
    with RegistryClient(registry.address) as client:
        push_image(client, "test/renewed", "1", [busybox_layer()], services.tmp)
        assert [r.name for r in client.iter_repositories()] == ["test/renewed"]
    assert [line for line in log_lines(registry) if line.get("level") == "error"] == []
