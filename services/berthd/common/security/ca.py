"""The cluster CA: an EC P-256 key and a self-signed certificate that signs every berth
certificate (service instances, node agents).

Identities live in the certificate: the CN and a URI SAN `berth://service/<name>` or
`berth://node/<id>` name the principal (`service:<name>`, `node:<id>`); DNS and IP SANs name the
addresses it serves. Certificates are short-lived (24 h by default) and renewed at two thirds of
their life (berthd.common.security.tls).

A certificate is either issued with a key made here (`issue`: the CA's holder makes its own
instances' certificates) or signed for a certificate signing request (`sign_csr`: a node that
joins or renews keeps its key and sends a CSR; see berthd.common.security.join_token).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_LIFETIME = datetime.timedelta(days=3650)
DEFAULT_LIFETIME = datetime.timedelta(hours=24)
# Clocks of different hosts disagree a little: a certificate is valid from a minute ago (from a
# twentieth of its life ago for short ones, so that renewal at two thirds stays meaningful).
BACKDATE = datetime.timedelta(minutes=1)
URI_SCHEME = "berth"
KINDS = ("service", "node", "user")
# What a CSR's key may be: EC on the NIST curves TLS libraries accept, or RSA of 2048 bits or
# more.
CSR_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048
# A node serves a few addresses; more names than this is not a node's CSR.
MAX_HOSTS = 32
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class InvalidCsr(ValueError):
    """A certificate signing request berth will not sign; the message says why."""


def identity_uri(identity: str) -> str:
    """`service:registry` -> `berth://service/registry`."""
    kind, _, name = identity.partition(":")
    if kind not in KINDS or not name or "/" in name:
        raise ValueError(f"invalid identity {identity!r}: expected service:<name> or node:<id>")
    return f"{URI_SCHEME}://{kind}/{name}"


def identity_from_uri(uri: str) -> str | None:
    prefix = f"{URI_SCHEME}://"
    if not uri.startswith(prefix):
        return None
    kind, _, name = uri[len(prefix) :].partition("/")
    if kind not in KINDS or not name or "/" in name:
        return None
    return f"{kind}:{name}"


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (mode 0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signatures (the TLS handshake's, EC keys); a CA's key also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _host_names(hosts: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def certificate_digest(cert_pem: bytes) -> str:
    """SHA-256 of a certificate's DER encoding, hex (what `openssl x509 -outform der |
    sha256sum` prints): how a join token names the CA it trusts."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_csr(identity: str, hosts: list[str] | tuple[str, ...]) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR for it naming `identity` and `hosts` (DNS and IP SANs):
    (csr_pem, key_pem). The key never leaves the requester."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .add_extension(x509.SubjectAlternativeName(_host_names(hosts)), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def csr_hosts(csr: x509.CertificateSigningRequest) -> list[str]:
    """The DNS names and IP addresses a CSR asks for. Every other name (URI, e-mail, the
    subject) is ignored: the signer decides the identity. Wildcards and malformed names are
    refused."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # a malformed extension
        raise InvalidCsr(f"the CSR's subject alternative names do not parse: {exc}") from None
    hosts = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    for name in sans.get_values_for_type(x509.DNSName):
        labels = name.rstrip(".").split(".")
        if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise InvalidCsr(f"the CSR names an invalid host {name!r} (wildcards are refused)")
        hosts.append(name)
    hosts = list(dict.fromkeys(hosts))
    if len(hosts) > MAX_HOSTS:
        raise InvalidCsr(f"the CSR names {len(hosts)} hosts; at most {MAX_HOSTS}")
    return hosts


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR that parses, is signed by its own key, and has a key berth accepts."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise InvalidCsr("not a PEM certificate signing request (PKCS#10)") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError) as exc:  # an unsupported algorithm
        raise InvalidCsr(f"the CSR's key or signature is not supported: {exc}") from None
    if not valid:
        raise InvalidCsr("the CSR's signature does not match its key")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, CSR_CURVES):
            raise InvalidCsr(f"the CSR's EC key is on {key.curve.name}; use P-256, P-384 or P-521")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidCsr(f"the CSR's RSA key has {key.key_size} bits; at least {MIN_RSA_BITS}")
    else:
        raise InvalidCsr(f"the CSR's key is {type(key).__name__}; use an EC or RSA key")
    return csr


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM encoded, with its validity. A certificate
    signed for a CSR has no key here (`key_pem` empty): its requester holds it."""

    cert_pem: bytes
    key_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before

    def renew_at(self) -> datetime.datetime:
        """Two thirds into the certificate's life."""
        return self.not_before + self.lifetime * 2 / 3

    def write(self, cert_path: Path, key_path: Path) -> None:
        write_private(key_path, self.key_pem)
        write_private(cert_path, self.cert_pem)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str = "berth cluster CA") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(ca=True),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key")
        return cls(cert, key)

    @classmethod
    def load_dir(cls, directory: Path) -> CertificateAuthority:
        return cls.load(Path(directory) / CA_CERT, Path(directory) / CA_KEY)

    def save(self, directory: Path) -> None:
        write_private(Path(directory) / CA_KEY, _key_pem(self.key))
        write_private(Path(directory) / CA_CERT, self.cert_pem)

    def issue(
        self,
        identity: str,
        hosts: list[str] | tuple[str, ...] = (),
        lifetime: datetime.timedelta = DEFAULT_LIFETIME,
    ) -> Issued:
        """A certificate for `identity` (`service:<name>`, `node:<id>`) valid for server and
        client authentication, with `hosts` (names or IP addresses) as SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem, not_before, not_after = self._sign(identity, key.public_key(), hosts, lifetime)
        return Issued(cert_pem, _key_pem(key), not_before, not_after)

    def sign_csr(
        self, csr_pem: bytes, identity: str, lifetime: datetime.timedelta = DEFAULT_LIFETIME
    ) -> Issued:
        """A certificate for `identity` with the CSR's key and its DNS and IP names; the
        identity the CSR itself names, if any, is ignored (InvalidCsr for a CSR that does not
        verify). The result has no key: the requester holds it."""
        csr = load_csr(csr_pem)
        hosts = csr_hosts(csr)
        cert_pem, not_before, not_after = self._sign(identity, csr.public_key(), hosts, lifetime)
        return Issued(cert_pem, b"", not_before, not_after)

    def _sign(
        self,
        identity: str,
        public_key: CertificatePublicKeyTypes,
        hosts: list[str] | tuple[str, ...],
        lifetime: datetime.timedelta,
    ) -> tuple[bytes, datetime.datetime, datetime.datetime]:
        sans = [x509.UniformResourceIdentifier(identity_uri(identity)), *_host_names(hosts)]
        now = _now()
        not_before = now - min(BACKDATE, lifetime / 20)
        not_after = now + lifetime
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(ca=False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        # The certificate's own times: X.509 keeps whole seconds.
        pem = cert.public_bytes(serialization.Encoding.PEM)
        return pem, cert.not_valid_before_utc, cert.not_valid_after_utc

    @property
    def digest(self) -> str:
        """SHA-256 of the CA certificate (DER), hex."""
        return certificate_digest(self.cert_pem)


def ensure_ca(directory: Path) -> CertificateAuthority:
    """The CA in `directory` (ca.crt, ca.key), created when it does not exist."""
    directory = Path(directory)
    if (directory / CA_CERT).exists() and (directory / CA_KEY).exists():
        return CertificateAuthority.load_dir(directory)
    ca = CertificateAuthority.create()
    ca.save(directory)
    return ca


def certificate_identity(cert_pem: bytes) -> str | None:
    """The berth identity a certificate names (its URI SAN), or None."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if identity := identity_from_uri(uri):
            return identity
    return None


def validity(cert_pem: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_before_utc, cert.not_valid_after_utc
