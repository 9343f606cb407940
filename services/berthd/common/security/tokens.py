"""Users' bearer tokens: made by `berth token create`, checked by every service instance.

A token reads `berth_<id>_<secret>`: the id finds its record in etcd (`tokens/<id>`), which
keeps only the SHA-256 of the secret, never the secret itself (a 32-byte random secret needs
no slow hash). Callers send it as `authorization: Bearer <token>` in the call's metadata.

Every instance keeps a verified token for CACHE_SECONDS, so `berth token rm` takes effect on
every instance within that many seconds without a lookup in etcd per call.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from berthd.common.errors import InvalidArgument, Unauthenticated
from berthd.common.security.join_token import secret_digest
from berthd.common.security.permissions import Role, permissions_of
from berthd.common.security.principal import Principal
from berthd.common.state.family import Family, known_fields
from berthd.common.store import Store, encode

PREFIX = "berth"
CACHE_SECONDS = 2.0
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TOKEN_PATTERN = re.compile(r"^berth_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    role: str
    secret_sha256: str
    repositories: list[str] = field(default_factory=list)
    created_at: float = 0.0
    expires_at: float = 0.0  # 0: never
    created_by: str = ""

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def decode(cls, id: str, raw: bytes | str) -> TokenRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a token is a JSON object")
        return cls(**{**known_fields(cls, data), "id": id})

    def expired(self, now: float | None = None) -> bool:
        return bool(self.expires_at) and (now or time.time()) >= self.expires_at

    def principal(self) -> Principal:
        role = Role(self.role)
        return Principal(
            f"user:{self.name}",
            permissions_of([role]),
            via="token",
            repositories=tuple(self.repositories),
            role=role,
            token_id=self.id,
        )


TOKENS: Family[TokenRecord] = Family("token", "tokens/", TokenRecord.decode)


def new_token(
    name: str,
    role: str,
    repositories: list[str],
    expires_at: float,
    created_by: str,
) -> tuple[TokenRecord, str]:
    """A new record and the token string to show once (never stored)."""
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"invalid token name {name!r}: lower-case letters, digits, '.', '_' and '-', "
            "at most 63 characters",
            field="name",
        )
    try:
        Role(role)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise InvalidArgument(f"unknown role {role!r}: one of {roles}", field="role") from None
    for pattern in repositories:
        if not pattern or pattern.startswith("/") or " " in pattern:
            raise InvalidArgument(
                f"invalid repository pattern {pattern!r}: a repository name, `*` matching any "
                "characters (`team/*`)",
                field="repositories",
            )
    id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(
        id=id,
        name=name,
        role=role,
        secret_sha256=secret_digest(secret),
        repositories=list(repositories),
        created_at=time.time(),
        expires_at=expires_at,
        created_by=created_by,
    )
    return record, f"{PREFIX}_{id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """(id, secret) of a well-formed token."""
    match = _TOKEN_PATTERN.match(token)
    if match is None:
        raise Unauthenticated(
            "malformed token: a berth token reads berth_<id>_<secret> (see `berth token create`)",
            reason="TOKEN_INVALID",
        )
    return match.group(1), match.group(2)


class TokenVerifier:
    """Checks bearer tokens against etcd, keeping a verified token CACHE_SECONDS."""

    def __init__(self, store: Store, cache_seconds: float = CACHE_SECONDS) -> None:
        self._store = store
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, TokenRecord | None]] = {}
        self._lock = asyncio.Lock()

    async def principal(self, token: str) -> Principal:
        id, secret = parse_token(token)
        record = await self._record(id)
        if record is None or not hmac.compare_digest(record.secret_sha256, secret_digest(secret)):
            raise Unauthenticated(
                "the token is not valid: it was revoked or never existed", reason="TOKEN_INVALID"
            )
        if record.expired():
            raise Unauthenticated(
                f"the token {record.name!r} expired; create a new one with `berth token create`",
                reason="TOKEN_EXPIRED",
                metadata={"token": record.name},
            )
        return record.principal()

    async def _record(self, id: str) -> TokenRecord | None:
        now = time.monotonic()
        cached = self._cache.get(id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        record = await TOKENS.get(self._store, id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[id] = (now, record)
        return record
