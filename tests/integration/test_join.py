"""Nodes join with a join token and a CSR (issue "Security", Joining), with real processes: a
node agent given only the CA certificate and a token (no certificate, no CA key) gets its
certificate from the cluster, registers and runs containers; wrong, rotated, expired and
foreign tokens are refused; the node's certificate cannot manage tokens; renewals are for the
caller's own identity, and a joined node renews through the cluster while it serves."""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from berth.client import ClusterClient, ContainerConfig, JoinClient, NodeClient
from berth.cluster.v1 import join_pb2 as pb
from berth.cluster.v1 import join_pb2_grpc
from berth.error_details import from_rpc_error
from berthd.common.security import join_token
from berthd.common.security.ca import certificate_digest, certificate_identity, make_csr

from .conftest import ClusterCA, ServiceProcess, Services, wait_until
from .test_tls import log_lines, served_certificate

pytestmark = pytest.mark.integration

# A joining node must not find the CA key the test session puts in every process's
# environment: it would issue its own certificate instead of joining.
NO_CA_KEY = {"BERTH_TLS_CA_KEY": ""}


def node_flags(
    services: Services, registry: ServiceProcess, node_id: str, join: str, token: str
) -> list[str]:
    tls = services.tmp / f"{node_id}-tls"
    return [
        f"--data-dir={services.tmp / f'{node_id}-data'}",
        f"--node-id={node_id}",
        f"--registry={registry.address}",
        f"--join={join}",
        f"--join-token={token}",
        f"--tls-cert={tls / 'node.crt'}",
        f"--tls-key={tls / 'node.key'}",
    ]


def failed_start(services: Services, flags: list[str]) -> subprocess.CompletedProcess[str]:
    """A node start expected to fail: it exits by itself, before serving."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "berthd.main",
            "node",
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
            f"--etcd={services.etcd}",
            f"--etcd-prefix={services.prefix}",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **NO_CA_KEY},
    )


def credentials(ca: ClusterCA, cert: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        ca.ca_cert.read_bytes(), cert.with_suffix(".key").read_bytes(), cert.read_bytes()
    )


def refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), from_rpc_error(info.value).reason


def berth_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "berth", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cluster(services: Services, registry: ServiceProcess) -> ServiceProcess:
    return services.start("cluster")


@pytest.fixture
def public_join(
    cluster: ServiceProcess, cluster_ca: ClusterCA
) -> Iterator[join_pb2_grpc.JoinServiceStub]:
    """JoinService on the cluster's public port, as a new host calls it: no certificate."""
    channel = grpc.secure_channel(
        cluster.public_address, grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    )
    yield join_pb2_grpc.JoinServiceStub(channel)
    channel.close()


def test_a_node_joins_with_a_token_registers_and_runs_a_container(
    services: Services,
    registry: ServiceProcess,
    cluster: ServiceProcess,
    cluster_ca: ClusterCA,
    busybox: str,
    public_join: join_pb2_grpc.JoinServiceStub,
) -> None:
    with JoinClient(cluster.address) as admin:
        before = admin.join_token()
        assert before.token is None
        assert before.ca_digest == certificate_digest(cluster_ca.ca_cert.read_bytes())
        assert before.join_addresses == [cluster.public_address]
        assert (before.etcd_endpoint, before.etcd_prefix) == (services.etcd, services.prefix)
    # The CLI makes it, as `docker swarm join-token -q --rotate` does, and prints only it.
    made = berth_cli("node", "join-token", "--host", cluster.address, "--rotate", "-q")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert join_token.parse(token).ca_digest == before.ca_digest
    shown = berth_cli("node", "join-token", "--host", cluster.address)
    assert "has a join token" in shown.stdout and "by user:admin" in shown.stdout
    assert token not in shown.stdout  # the cluster keeps its hash only

    node_id = f"joined-{uuid.uuid4().hex[:6]}"
    flags = node_flags(services, registry, node_id, cluster.public_address, token)
    agent = services.start("node", *flags, env=NO_CA_KEY)
    cert = services.tmp / f"{node_id}-tls" / "node.crt"
    try:
        # The files it wrote: its certificate for node:<id> from the cluster CA, its own key.
        assert certificate_identity(cert.read_bytes()) == f"node:{node_id}"
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(
            cluster_ca.ca.cert
        )
        for path in (cert, cert.with_suffix(".key")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert served_certificate(agent.address, cluster_ca).subject.rfc4514_string() == (
            f"CN=node:{node_id}"
        )
        assert any(line.get("msg") == "joined the cluster" for line in log_lines(agent))

        with ClusterClient(cluster.address) as client:
            wait_until(
                lambda: node_id in {n.id for n in client.nodes() if n.state == "ready"},
                30,
                "the joined node in ListNodes",
            )
            assert client.node(node_id).address == agent.address
            container = client.run(
                ContainerConfig(image=busybox, command=["sh", "-c", "echo hello from a joiner"])
            )
            assert container.node_id == node_id
            assert client.wait(container.id) == 0
            assert (
                b"".join(line.data for line in client.logs(container.id))
                == b"hello from a joiner\n"
            )
            client.remove(container.id, force=True)

        # A live node's id cannot be joined again, even with the current token.
        csr_pem, _ = make_csr(f"node:{node_id}", [])
        request = pb.JoinNodeRequest(join_token=token, node_id=node_id, csr_pem=csr_pem.decode())
        assert refusal(lambda: public_join.JoinNode(request, timeout=10)) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "NODE_ID_IN_USE",
        )

        # The node's certificate cannot manage join tokens (TOKEN_MANAGE)...
        with grpc.secure_channel(cluster.address, credentials(cluster_ca, cert)) as channel:
            as_node = join_pb2_grpc.JoinServiceStub(channel)
            for call in (
                lambda: as_node.GetJoinToken(pb.GetJoinTokenRequest(), timeout=10),
                lambda: as_node.RotateJoinToken(pb.RotateJoinTokenRequest(), timeout=10),
            ):
                assert refusal(call) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
            # ... but renews its own: a certificate for itself, whatever the CSR names.
            time.sleep(1.1)  # certificate times have one-second resolution
            other_csr, _ = make_csr("user:admin", ["127.0.0.1"])
            reply = as_node.RenewNodeCertificate(
                pb.RenewNodeCertificateRequest(csr_pem=other_csr.decode()), timeout=10
            )
        renewed = reply.certificate_pem.encode()
        assert certificate_identity(renewed) == f"node:{node_id}"
        old = x509.load_pem_x509_certificate(cert.read_bytes())
        new = x509.load_pem_x509_certificate(renewed)
        assert new.not_valid_after_utc > old.not_valid_after_utc
        assert reply.expires_at.ToDatetime(datetime.UTC) == new.not_valid_after_utc
        assert reply.ca_certificate_pem.encode() == cluster_ca.ca_cert.read_bytes()
        # The administrator's certificate may call it (admin holds every permission), and is
        # still refused: only a node renews, and only itself.
        with grpc.secure_channel(
            cluster.address, credentials(cluster_ca, cluster_ca.dir / "client.crt")
        ) as channel:
            as_admin = join_pb2_grpc.JoinServiceStub(channel)
            request = pb.RenewNodeCertificateRequest(csr_pem=csr_pem.decode())
            assert refusal(lambda: as_admin.RenewNodeCertificate(request, timeout=10)) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "NODE_CERTIFICATE_REQUIRED",
            )
    finally:
        with NodeClient(agent.address) as node:
            for leftover in node.list(all=True):
                node.remove(leftover.id, force=True)
        agent.stop()


def test_wrong_rotated_expired_and_foreign_tokens_are_refused(
    services: Services,
    registry: ServiceProcess,
    cluster: ServiceProcess,
    public_join: join_pb2_grpc.JoinServiceStub,
) -> None:
    csr_pem, _ = make_csr("node:x", [])

    def join(token: str, node_id: str = "newcomer") -> tuple[grpc.StatusCode, str]:
        request = pb.JoinNodeRequest(join_token=token, node_id=node_id, csr_pem=csr_pem.decode())
        return refusal(lambda: public_join.JoinNode(request, timeout=10))

    with JoinClient(cluster.address) as admin:
        digest = admin.join_token().ca_digest
        guessed = f"BJT-1-{digest}-{'0' * 48}"
        # No token made yet: nothing joins.
        assert join(guessed) == (grpc.StatusCode.UNAUTHENTICATED, "JOIN_TOKEN_INVALID")
        first = admin.rotate_join_token().token
        current = admin.rotate_join_token().token
        assert first and current and first != current
        short = admin.rotate_join_token(expires_in=1)
        assert short.token and short.token.expires_at is not None
        while time.time() <= short.token.expires_at.timestamp():  # until its recorded expiry
            time.sleep(0.05)
        assert join(short.token.token) == (grpc.StatusCode.UNAUTHENTICATED, "JOIN_TOKEN_EXPIRED")
        current = admin.rotate_join_token().token
    assert current is not None
    assert join(guessed) == (grpc.StatusCode.UNAUTHENTICATED, "JOIN_TOKEN_INVALID")
    assert join(first.token) == (grpc.StatusCode.UNAUTHENTICATED, "JOIN_TOKEN_INVALID")
    assert join("not a token") == (grpc.StatusCode.UNAUTHENTICATED, "JOIN_TOKEN_INVALID")
    # The right secret for another CA is another cluster's token.
    parsed = join_token.parse(current.token)
    assert join(str(join_token.JoinToken("f" * 64, parsed.secret))) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "JOIN_TOKEN_INVALID",
    )
    assert join(current.token, node_id="bad/id") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_NODE_ID",
    )
    request = pb.JoinNodeRequest(join_token=current.token, node_id="n", csr_pem="garbage")
    assert refusal(lambda: public_join.JoinNode(request, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CSR",
    )

    # A node started with a rotated-away token exits at once with one clear line, and writes
    # no certificate.
    flags = node_flags(services, registry, "refused", cluster.public_address, first.token)
    result = failed_start(services, flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot join the cluster" in lines[0] and "JOIN_TOKEN_INVALID" in lines[0]
    assert not (services.tmp / "refused-tls" / "node.crt").exists()

    # A token made for another CA is refused by the node before it is sent anywhere.
    def join_calls() -> int:  # one "rpc" line per call (a refused join has an audit line too)
        return sum(
            1
            for line in log_lines(cluster)
            if str(line.get("method")).endswith("/JoinNode") and line.get("msg") == "rpc"
        )

    def marker_join(request_id: str) -> None:
        """A join sent now, and its line in the log: every join before it is logged too."""
        marker = pb.JoinNodeRequest(join_token="marker", node_id="marker", csr_pem="garbage")
        metadata = (("x-request-id", request_id),)
        refusal(lambda: public_join.JoinNode(marker, timeout=10, metadata=metadata))
        wait_until(
            lambda: any(line.get("request_id") == request_id for line in log_lines(cluster)),
            30,
            f"the join {request_id} in the cluster's log",
        )

    marker_join("before-the-foreign-token")
    sent = join_calls()
    foreign = str(join_token.JoinToken("a" * 64, parsed.secret))
    flags = node_flags(services, registry, "foreign", cluster.public_address, foreign)
    result = failed_start(services, flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "made for another CA" in lines[0], result.stderr
    marker_join("after-the-foreign-token")
    assert join_calls() == sent + 1  # the marker's only


def test_a_cluster_without_the_ca_key_cannot_sign(
    services: Services, registry: ServiceProcess, cluster_ca: ClusterCA
) -> None:
    cert = cluster_ca.issue("cluster-no-key", "service:cluster", ["127.0.0.1", "localhost"])
    cluster = services.start(
        "cluster",
        f"--tls-cert={cert}",
        f"--tls-key={cert.with_suffix('.key')}",
        env=NO_CA_KEY,
    )
    with JoinClient(cluster.address) as admin:
        token = admin.rotate_join_token().token  # tokens need no CA key; signing does
    assert token is not None
    csr_pem, _ = make_csr("node:x", [])
    channel = grpc.secure_channel(
        cluster.public_address, grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    )
    with channel:
        request = pb.JoinNodeRequest(
            join_token=token.token, node_id="keyless", csr_pem=csr_pem.decode()
        )
        stub = join_pb2_grpc.JoinServiceStub(channel)
        assert refusal(lambda: stub.JoinNode(request, timeout=10)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "CA_KEY_MISSING",
        )


def test_a_joined_node_renews_through_the_cluster_while_serving(
    services: Services, registry: ServiceProcess, cluster_ca: ClusterCA, busybox: str
) -> None:
    """The cluster signs 30 s certificates; the node renews at two thirds of that over mutual
    TLS with its current certificate, writes the new files and keeps serving: a container
    started before the renewal runs on, and the cluster reaches it after."""
    cluster = services.start("cluster", "--tls-lifetime=30")
    with JoinClient(cluster.address) as admin:
        token = admin.rotate_join_token().token
    assert token is not None
    node_id = f"renewing-{uuid.uuid4().hex[:6]}"
    flags = node_flags(services, registry, node_id, cluster.public_address, token.token)
    agent = services.start("node", *flags, env=NO_CA_KEY)
    cert_file = services.tmp / f"{node_id}-tls" / "node.crt"
    client = ClusterClient(cluster.address)
    try:
        wait_until(
            lambda: node_id in {n.id for n in client.nodes() if n.state == "ready"},
            30,
            "the joined node in ListNodes",
        )
        # Prints a line a second: its logs show it ran through the renewal.
        ticker = ContainerConfig(
            image=busybox, command=["sh", "-c", "while true; do echo tick; sleep 1; done"]
        )
        container = client.run(ticker)
        assert container.node_id == node_id
        wait_until(lambda: client.inspect(container.id).state == "running", 30, "running")
        first = served_certificate(agent.address, cluster_ca)
        life = first.not_valid_after_utc - first.not_valid_before_utc
        assert life <= datetime.timedelta(seconds=32)
        deadline = time.monotonic() + 40
        while served_certificate(agent.address, cluster_ca).serial_number == first.serial_number:
            assert time.monotonic() < deadline, "the joined node did not renew"
            time.sleep(1)
        renewed = served_certificate(agent.address, cluster_ca)
        assert renewed.subject.rfc4514_string() == f"CN=node:{node_id}"
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        on_disk = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert on_disk.serial_number == renewed.serial_number
        renewals = [
            line
            for line in log_lines(cluster)
            if str(line.get("method")).endswith("/RenewNodeCertificate")
        ]
        assert renewals and renewals[0].get("identity") == f"node:{node_id}"
        # Still a node of the cluster: registered (etcd reached with the new certificate).
        assert client.node(node_id).state == "ready"
        # The container ran through the renewal, and the cluster reaches it over the node's
        # new certificate (logs are relayed from the node).
        assert client.inspect(container.id).state == "running"
        ticks = b"".join(line.data for line in client.logs(container.id))
        assert ticks.count(b"tick\n") >= 15
        client.remove(container.id, force=True)
    finally:
        client.close()
        agent.stop()
