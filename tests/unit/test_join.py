"""Joining without servers: join tokens (format, hashing, matching), CSR checks and signing
(the identity is the signer's choice, never the CSR's), renewal takes the caller's identity,
and what `berth node join-token` prints."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from berth.cli.cluster_cmds import join_token_text
from berth.client.join import JoinInfo, JoinTokenInfo
from berthd.cluster.join import JoinCore
from berthd.common.errors import PermissionDenied
from berthd.common.security import join_token
from berthd.common.security.ca import (
    CertificateAuthority,
    InvalidCsr,
    certificate_digest,
    certificate_identity,
    make_csr,
)
from berthd.common.security.principal import (
    Principal,
    from_certificate,
    reset_current_principal,
    set_current_principal,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("join test CA")


def csr_for(
    key: Any, common_name: str = "node:x", names: list[x509.GeneralName] | None = None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def sans_of(cert_pem: bytes) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# --- tokens -----------------------------------------------------------------------------------


def test_a_token_names_the_ca_and_round_trips(ca: CertificateAuthority) -> None:
    record, token = join_token.new_token(ca.digest, "user:admin")
    text = str(token)
    assert text.startswith(f"BJT-1-{ca.digest}-") and len(text) == 6 + 64 + 1 + 48
    assert join_token.parse(text) == token
    assert join_token.parse(f"  {text}\n") == token  # pasted with a newline
    # The digest is the CA certificate's, as openssl prints it (DER, SHA-256).
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert ca.digest == certificate_digest(ca.cert_pem) == hashes_hex(der)
    # Stored: the hash of the secret, never the secret.
    assert token.secret not in record.encode().decode()
    assert record.secret_sha256 == join_token.secret_digest(token.secret)
    assert record.matches(token)
    assert join_token.JoinTokenRecord.decode(record.encode()) == record


def hashes_hex(data: bytes) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize().hex()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "BJT-1-abc-def",
        "SWMTKN-1-" + "a" * 64 + "-" + "b" * 48,
        "BJT-2-" + "a" * 64 + "-" + "b" * 48,
        "BJT-1-" + "A" * 64 + "-" + "b" * 48,  # upper-case hex is not what berth writes
        "BJT-1-" + "a" * 64 + "-" + "b" * 47,
        "berth_0123456789abcdef_" + "x" * 43,  # a user token is not a join token
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(join_token.MalformedJoinToken, match="BJT-1-"):
        join_token.parse(text)


def test_a_record_matches_only_its_own_token_and_ca(ca: CertificateAuthority) -> None:
    record, token = join_token.new_token(ca.digest, "user:admin")
    _, other = join_token.new_token(ca.digest, "user:admin")
    assert not record.matches(other)  # rotated: another secret
    foreign = join_token.JoinToken("0" * 64, token.secret)
    assert not record.matches(foreign)  # the same secret for another CA


def test_expiry() -> None:
    record = join_token.JoinTokenRecord("x", "y", created_at=100.0, expires_at=200.0)
    assert not record.expired(now=199.0)
    assert record.expired(now=200.0)
    assert not join_token.JoinTokenRecord("x", "y").expired()  # 0: never


# --- CSRs -------------------------------------------------------------------------------------


def test_signing_takes_the_key_and_hosts_and_ignores_the_identity_asked_for(
    ca: CertificateAuthority,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("berth://user/admin"),  # asks to be the admin
        x509.DNSName("node-1.example"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
        x509.RFC822Name("root@example"),
    ]
    issued = ca.sign_csr(csr_for(key, "user:admin", names), "node:n1")
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert certificate_identity(issued.cert_pem) == "node:n1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node:n1"
    sans = sans_of(issued.cert_pem)
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["berth://node/n1"]
    assert sans.get_values_for_type(x509.DNSName) == ["node-1.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert sans.get_values_for_type(x509.RFC822Name) == []
    # The certificate carries the requester's key; the CA never saw the private half.
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    assert issued.key_pem == b""
    cert.verify_directly_issued_by(ca.cert)
    assert issued.lifetime <= datetime.timedelta(hours=24, minutes=2)


def test_make_csr_gives_a_p256_key_and_the_hosts(ca: CertificateAuthority) -> None:
    csr_pem, key_pem = make_csr("node:n2", ["127.0.0.1", "localhost"])
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    issued = ca.sign_csr(csr_pem, "node:n2", datetime.timedelta(minutes=5))
    sans = sans_of(issued.cert_pem)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert issued.lifetime <= datetime.timedelta(minutes=5, seconds=16)


def test_rsa_keys_of_2048_bits_are_accepted(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issued = ca.sign_csr(csr_for(key), "node:rsa")
    assert certificate_identity(issued.cert_pem) == "node:rsa"


def test_csrs_berth_will_not_sign(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCsr, match="not a PEM certificate signing request"):
        ca.sign_csr(b"hello", "node:x")
    with pytest.raises(InvalidCsr, match="1024 bits"):
        ca.sign_csr(csr_for(rsa.generate_private_key(65537, 1024)), "node:x")
    with pytest.raises(InvalidCsr, match="EC or RSA"):
        ca.sign_csr(csr_for(ed25519.Ed25519PrivateKey.generate()), "node:x")
    with pytest.raises(InvalidCsr, match="secp256k1"):
        ca.sign_csr(csr_for(ec.generate_private_key(ec.SECP256K1())), "node:x")
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidCsr, match="wildcards"):
        ca.sign_csr(csr_for(key, names=[x509.DNSName("*.example")]), "node:x")
    too_many: list[x509.GeneralName] = [x509.DNSName(f"h{n}.example") for n in range(40)]
    with pytest.raises(InvalidCsr, match="at most"):
        ca.sign_csr(csr_for(key, names=too_many), "node:x")
    # A CSR changed after it was signed (its subject): the signature no longer matches.
    der = x509.load_pem_x509_csr(csr_for(key, "node:x")).public_bytes(serialization.Encoding.DER)
    forged = der.replace(b"node:x", b"node:y")
    assert forged != der
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(forged)
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(InvalidCsr, match="signature does not match"):
        ca.sign_csr(pem, "node:x")


# --- renewal: the caller's identity -------------------------------------------------------------


async def renew_as(core: JoinCore, principal: Principal, csr_pem: bytes) -> bytes:
    token = set_current_principal(principal)
    try:
        return (await core.renew(csr_pem.decode())).cert_pem
    finally:
        reset_current_principal(token)


async def test_a_renewal_is_for_the_calling_node_whatever_the_csr_says(
    ca: CertificateAuthority,
) -> None:
    core = JoinCore(None, ca.cert_pem, ca)  # type: ignore[arg-type]  # renewals read no state
    csr_pem, _ = make_csr("node:someone-else", ["127.0.0.1"])
    cert_pem = await renew_as(core, from_certificate("node:n1"), csr_pem)
    assert certificate_identity(cert_pem) == "node:n1"
    admin_csr = csr_for(
        ec.generate_private_key(ec.SECP256R1()),
        "user:admin",
        [x509.UniformResourceIdentifier("berth://user/admin")],
    )
    assert certificate_identity(await renew_as(core, from_certificate("node:n1"), admin_csr)) == (
        "node:n1"
    )


@pytest.mark.parametrize(
    "principal",
    [
        from_certificate("user:admin"),
        from_certificate("service:image"),
        # A token whose user happens to be called like a node is still not a node certificate.
        Principal("node:n1", frozenset(), via="token"),
    ],
    ids=["admin", "service", "token"],
)
async def test_only_a_node_certificate_renews(
    ca: CertificateAuthority, principal: Principal
) -> None:
    core = JoinCore(None, ca.cert_pem, ca)  # type: ignore[arg-type]
    csr_pem, _ = make_csr("node:n1", [])
    with pytest.raises(PermissionDenied) as err:
        await renew_as(core, principal, csr_pem)
    assert err.value.reason == "NODE_CERTIFICATE_REQUIRED"


# --- the CLI's text -----------------------------------------------------------------------------


def test_the_cli_prints_the_command_to_run_on_a_new_host() -> None:
    at = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    token = JoinTokenInfo("d" * 64, at, None, "user:admin", token="BJT-1-x-y")
    info = JoinInfo(token, "d" * 64, ["10.0.0.1:5071"], "10.0.0.1:2379", "/team/")
    text = join_token_text(info, rotated=True)
    assert "berthd node \\\n        --join 10.0.0.1:5071 \\\n        --join-token BJT-1-x-y" in text
    assert "--etcd 10.0.0.1:2379 \\\n        --etcd-prefix /team/" in text
    assert f"sha256 {'d' * 64}" in text and "expires never" in text
    # Without a rotation the secret is not known: no command, how to get one.
    shown = join_token_text(JoinInfo(token, "d" * 64), rotated=False)
    assert "BJT-1" not in shown and "berth node join-token --rotate" in shown
    assert "another CA" in join_token_text(JoinInfo(token, "e" * 64), rotated=False)
    assert "no join token yet" in join_token_text(JoinInfo(None, "d" * 64), rotated=False)
