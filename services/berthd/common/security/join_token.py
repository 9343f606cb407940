"""Join tokens: what a new host presents to get its node certificate (`berth node join-token`,
`berthd node --join-token`), like Docker Swarm's `SWMTKN-1-<ca digest>-<secret>`.

A token reads `BJT-1-<ca digest>-<secret>`: the digest is the SHA-256 of the cluster CA
certificate (DER, 64 hex digits), so the joining host checks that the CA file it was given is
the cluster's before it sends the token anywhere; the secret is 48 random hex digits (192 bits).
The cluster keeps one token at a time, hashed (`cluster/join-token`, a JoinTokenRecord): the
SHA-256 of the secret, never the secret (a random 192-bit secret needs no slow hash). Making a
new one replaces the record, so the previous token is refused at once.

The node agent parses tokens (the digest check); the cluster service writes and checks the
record (berthd.cluster.join).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass

from berthd.common.state.family import known_fields
from berthd.common.store import encode

PREFIX = "BJT"
VERSION = "1"
SECRET_BYTES = 24
# The cluster's one join token (docs/etcd.md).
KEY = "cluster/join-token"
_TOKEN = re.compile(r"^BJT-1-([0-9a-f]{64})-([0-9a-f]{48})$")


class MalformedJoinToken(ValueError):
    """Not a join token at all (the message says what one looks like)."""


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token."""

    ca_digest: str
    secret: str

    def __str__(self) -> str:
        return f"{PREFIX}-{VERSION}-{self.ca_digest}-{self.secret}"

    @property
    def secret_sha256(self) -> str:
        return secret_digest(self.secret)


def parse(text: str) -> JoinToken:
    """The parts of a token string; MalformedJoinToken when it is not one."""
    match = _TOKEN.match(text.strip())
    if match is None:
        raise MalformedJoinToken(
            "malformed join token: a join token reads BJT-1-<64 hex digits>-<48 hex digits> "
            "(`berth node join-token --rotate` makes one)"
        )
    return JoinToken(match.group(1), match.group(2))


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class JoinTokenRecord:
    """The cluster's join token as etcd keeps it: its hash, never its secret."""

    secret_sha256: str
    ca_digest: str
    created_at: float = 0.0
    expires_at: float = 0.0  # 0: never
    created_by: str = ""

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> JoinTokenRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a join token record is a JSON object")
        return cls(**known_fields(cls, data))

    def expired(self, now: float | None = None) -> bool:
        return bool(self.expires_at) and (time.time() if now is None else now) >= self.expires_at

    def matches(self, token: JoinToken) -> bool:
        """Whether `token` is this one: its secret's hash (compared in constant time) and the
        CA it was made for."""
        same_secret = hmac.compare_digest(self.secret_sha256, token.secret_sha256)
        same_ca = hmac.compare_digest(self.ca_digest, token.ca_digest)
        return same_secret and same_ca


def new_token(
    ca_digest: str, created_by: str, expires_at: float = 0.0
) -> tuple[JoinTokenRecord, JoinToken]:
    """A new token for the CA with `ca_digest`: the record to store and the token to show once."""
    token = JoinToken(ca_digest, secrets.token_hex(SECRET_BYTES))
    record = JoinTokenRecord(
        secret_sha256=token.secret_sha256,
        ca_digest=ca_digest,
        created_at=time.time(),
        expires_at=expires_at,
        created_by=created_by,
    )
    return record, token
