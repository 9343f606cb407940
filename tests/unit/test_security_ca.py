"""The cluster CA and the certificates it issues (berthd.common.security.ca and .tls)."""

from __future__ import annotations

import datetime
import ipaddress
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from berthd.common.security.ca import (
    CertificateAuthority,
    certificate_identity,
    ensure_ca,
    identity_from_uri,
    identity_uri,
)
from berthd.common.security.tls import InstanceCredentials, hosts_for


def test_the_ca_is_p256_self_signed_and_saved_private(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "tls")
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.cert.verify_directly_issued_by(ca.cert)
    for name in ("ca.crt", "ca.key"):
        assert stat.S_IMODE((tmp_path / "tls" / name).stat().st_mode) == 0o600
    again = ensure_ca(tmp_path / "tls")  # kept, not replaced
    assert again.cert.serial_number == ca.cert.serial_number


def test_a_certificate_carries_identity_and_addresses() -> None:
    ca = CertificateAuthority.create()
    issued = ca.issue("node:n1", ["10.0.0.5", "host.example", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "node:n1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["berth://node/n1"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert sans.get_values_for_type(x509.DNSName) == ["host.example"]
    assert certificate_identity(issued.cert_pem) == "node:n1"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u._name for u in usage} == {"serverAuth", "clientAuth"}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_lifetime_and_renewal_point() -> None:
    ca = CertificateAuthority.create()
    day = ca.issue("service:registry")
    assert datetime.timedelta(hours=24) <= day.lifetime <= datetime.timedelta(hours=24, minutes=1)
    short = ca.issue("service:registry", lifetime=datetime.timedelta(seconds=30))
    now = datetime.datetime.now(datetime.UTC)
    # Two thirds into a 30 s life (backdated by a twentieth): about 18.5 s from now.
    assert datetime.timedelta(seconds=15) < short.renew_at() - now < datetime.timedelta(seconds=21)


def test_identities() -> None:
    assert identity_uri("service:registry") == "berth://service/registry"
    assert identity_from_uri("berth://node/n1") == "node:n1"
    assert identity_from_uri("https://node/n1") is None
    assert identity_from_uri("berth://robot/x") is None
    for bad in ("registry", "service:", "robot:x", "node:a/b"):
        with pytest.raises(ValueError):
            identity_uri(bad)


def test_instance_credentials_issue_renew_and_write(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    ca.save(tmp_path)
    cert, key = tmp_path / "svc.crt", tmp_path / "svc.key"
    creds = InstanceCredentials(
        "service:image",
        hosts_for("127.0.0.1:0"),
        ca_path=str(tmp_path / "ca.crt"),
        cert_path=str(cert),
        key_path=str(key),
        ca_key_path=str(tmp_path / "ca.key"),
        lifetime=60,
    )
    first = creds.current
    assert cert.read_bytes() == first.cert_pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The server hands grpc its configuration once per generation.
    fetch, other_port = creds.config_fetcher(), creds.config_fetcher()
    assert fetch() is None
    creds.renew()
    assert creds.generation == 1
    assert creds.current.cert_pem != first.cert_pem
    assert cert.read_bytes() == creds.current.cert_pem
    assert fetch() is not None
    assert fetch() is None
    # Each port gets the renewed certificate, not only the first to ask.
    assert other_port() is not None
    # Without the CA key an instance serves (and re-reads) the files it was given.
    reader = InstanceCredentials(
        "service:image", [], ca_path=str(tmp_path / "ca.crt"), cert_path=str(cert),
        key_path=str(key),
    )  # fmt: skip
    assert reader.current.cert_pem == creds.current.cert_pem
    assert reader.renew() is None  # the files were not rotated: nothing changes
    assert reader.generation == 0
    creds.renew()  # rotates the files
    assert reader.renew() is not None
    assert (reader.generation, reader.current.cert_pem) == (1, creds.current.cert_pem)


def test_an_expired_certificate_file_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    ca.save(tmp_path)
    cert, key = tmp_path / "old.crt", tmp_path / "old.key"
    ca.issue("service:image", lifetime=datetime.timedelta(seconds=1)).write(cert, key)
    time.sleep(1.1)
    files = {"cert_path": str(cert), "key_path": str(key)}
    with pytest.raises(ValueError, match="expired"):
        InstanceCredentials("service:image", [], ca_path=str(tmp_path / "ca.crt"), **files)
    # With the CA key the instance issues itself a fresh one instead.
    fresh = InstanceCredentials(
        "service:image", [], ca_path=str(tmp_path / "ca.crt"), ca_key_path=str(tmp_path / "ca.key"),
        **files,
    )  # fmt: skip
    assert fresh.current.not_after > datetime.datetime.now(datetime.UTC)


def test_tls_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TLS is required"):
        InstanceCredentials("service:image", [], ca_path="")
    ca = CertificateAuthority.create()
    ca.save(tmp_path)
    with pytest.raises(ValueError, match="no certificate"):
        InstanceCredentials("service:image", [], ca_path=str(tmp_path / "ca.crt"))


def test_hosts_for_listen_and_advertise() -> None:
    hosts = hosts_for("10.1.2.3:7000", "[::1]:7001", None)
    assert hosts[:2] == ["10.1.2.3", "::1"]
    assert "127.0.0.1" in hosts and "localhost" in hosts
