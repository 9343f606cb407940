"""Who calls the HTTP API, and Docker's token authentication over berth's credentials.

A request carries one of:

- nothing: the anonymous principal (public repositories only), as on the gRPC public port;
- `Authorization: Basic <user:password>` with a berth token (`berth_<id>_<secret>`) as the
  password, any user name (`docker login -u any --password-stdin`);
- `Authorization: Bearer berth_<id>_<secret>`: the berth token itself;
- `Authorization: Bearer <registry token>`: what the token endpoint issued, short-lived and
  scoped to `repository:<name>:<actions>`;
- over TLS with no header, a client certificate from the cluster CA (berth's own identities).

The token endpoint (`GET /v2/token`, also `/token`) grants each requested action that the
caller's own rights allow, checked by the same Authorizer as every gRPC call; it never refuses
a scope, it leaves out what is not allowed (as Distribution's token servers do), so a pull-only
credential gets a token that cannot push. Registry tokens are JWTs (HS256) signed with a key
every registry instance reads from etcd (`registry/http-token-key`, created once), so a token
issued by one instance is good on every other.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import secrets
import ssl
import time
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from berth.tls import plaintext_mode
from berthd.common.errors import PermissionDenied, Unauthenticated
from berthd.common.oci.reference import validate_repository
from berthd.common.security.authorize import Authorizer
from berthd.common.security.ca import certificate_identity
from berthd.common.security.permissions import Permission, Role, permissions_of
from berthd.common.security.principal import ANONYMOUS, Principal, from_certificate
from berthd.common.security.tokens import PREFIX, TokenVerifier
from berthd.common.store import Store
from berthd.registry.http_errors import HttpError

KEY = "registry/http-token-key"
SERVICE = "berth"
TOKEN_SECONDS = 300
ACTIONS: dict[str, Permission] = {
    "pull": Permission.REPOSITORY_PULL,
    "push": Permission.REPOSITORY_PUSH,
    "delete": Permission.REPOSITORY_DELETE,
}
ADMIN = Principal("user:admin", permissions_of([Role.ADMIN]), role=Role.ADMIN)


@dataclass(frozen=True)
class Caller:
    principal: Principal
    # What a registry token grants: actions by repository. None: the principal's own rights
    # (a berth token, Basic auth, a certificate, anonymous).
    grants: dict[str, frozenset[str]] | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class HttpAuth:
    def __init__(
        self,
        key: bytes,
        authorizer: Authorizer,
        verifier: TokenVerifier,
        token_seconds: int = TOKEN_SECONDS,
    ) -> None:
        self._key = key
        self.authorizer = authorizer
        self.verifier = verifier
        self.token_seconds = token_seconds

    @classmethod
    async def load(cls, store: Store, authorizer: Authorizer, verifier: TokenVerifier) -> HttpAuth:
        """The signing key shared by every registry instance: made by the first to start."""
        await store.create(KEY, secrets.token_hex(32).encode())
        entry = await store.get(KEY)
        if entry is None:
            raise RuntimeError(f"the registry's token key {KEY} vanished from etcd")
        try:
            key = bytes.fromhex(entry.value.decode())
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) < 32:
            raise RuntimeError(
                f"the registry's token key {KEY} in etcd is not 64 hex digits: delete it and "
                "start the registries again (tokens already issued stop working)"
            )
        return cls(key, authorizer, verifier)

    # -- tokens ---------------------------------------------------------------------------

    def issue(self, principal: Principal, grants: dict[str, list[str]]) -> str:
        now = int(time.time())
        claims = {
            "iss": SERVICE,
            "aud": SERVICE,
            "sub": principal.name,
            "role": principal.role,
            "repos": list(principal.repositories),
            "iat": now,
            "exp": now + self.token_seconds,
            "access": [
                {"type": "repository", "name": name, "actions": actions}
                for name, actions in grants.items()
            ],
        }
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(signature)}"

    def verify(self, token: str) -> Caller:
        try:
            header, payload, signature = token.split(".")
            expected = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256)
            if not hmac.compare_digest(expected.digest(), _unb64(signature)):
                raise ValueError("bad signature")
            claims = json.loads(_unb64(payload))
            expires = float(claims["exp"])
            role = str(claims.get("role") or "")
            permissions = permissions_of([Role(role)]) if role else frozenset({Permission.PUBLIC})
            grants = {
                str(a["name"]): frozenset(str(x) for x in a["actions"])
                for a in claims.get("access", [])
            }
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthenticated(
                "the bearer token is not one this registry issued; get one from /v2/token",
                reason="TOKEN_INVALID",
            ) from None
        if expires <= time.time():
            raise Unauthenticated(
                "the bearer token expired; get a new one from /v2/token", reason="TOKEN_EXPIRED"
            )
        if claims["sub"] == ANONYMOUS.name:
            principal = ANONYMOUS
        else:
            principal = Principal(
                str(claims["sub"]),
                permissions,
                via="token",
                repositories=tuple(claims.get("repos", ())),
                role=role,
            )
        return Caller(principal, grants)

    # -- who is calling ---------------------------------------------------------------------

    async def credential(self, request: web.Request) -> Principal:
        """The principal of a berth credential (no registry token): Basic, Bearer berth_...,
        a client certificate, or anonymous."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise Unauthenticated(
                    "malformed Basic credentials", reason="TOKEN_INVALID"
                ) from None
            password = decoded.partition(":")[2]
            return await self.verifier.principal(password)
        if scheme.lower() == "bearer" and value.startswith(f"{PREFIX}_"):
            return await self.verifier.principal(value)
        if header:
            raise Unauthenticated(
                "the Authorization header must be `Basic <user:berth token>` or `Bearer <token>`",
                reason="TOKEN_INVALID",
            )
        identity = _peer_identity(request)
        if identity:
            return from_certificate(identity)
        # Benchmarks only (no certificates exist): every caller is the administrator, as on
        # the gRPC ports in that mode.
        return ADMIN if plaintext_mode() else ANONYMOUS

    async def caller(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and not value.startswith(f"{PREFIX}_"):
            return self.verify(value)
        return Caller(await self.credential(request))

    # -- checks ---------------------------------------------------------------------------

    async def allowed(self, principal: Principal, action: str, repository: str) -> bool:
        permission = ACTIONS.get(action)
        if permission is None:
            return False
        try:
            await self.authorizer.check_repository(principal, permission, repository)
        except (Unauthenticated, PermissionDenied):
            return False
        return True

    async def require(
        self, request: web.Request, caller: Caller, action: str, repository: str
    ) -> None:
        """The caller may `action` (pull, push, delete) on `repository`, else 401 with the
        challenge Docker clients follow, or 403."""
        if caller.grants is not None:
            if action in caller.grants.get(repository, ()) or (
                action == "pull" and await self._public(repository)
            ):
                return
            raise HttpError(
                401,
                "DENIED" if caller.principal.authenticated else "UNAUTHORIZED",
                f"the bearer token does not grant {action} on {repository}"
                + (
                    f": {caller.principal.name} may not {action} it"
                    if caller.principal.authenticated
                    else ""
                ),
                {"repository": repository, "action": action},
                {"WWW-Authenticate": challenge(request, repository, action, insufficient=True)},
            )
        permission = ACTIONS[action]
        try:
            await self.authorizer.check_repository(caller.principal, permission, repository)
        except Unauthenticated:
            raise HttpError(
                401,
                "UNAUTHORIZED",
                f"authentication required to {action} {repository}",
                {"repository": repository, "action": action},
                {"WWW-Authenticate": challenge(request, repository, action)},
            ) from None
        except PermissionDenied as exc:
            raise HttpError(
                403, "DENIED", str(exc), {"repository": repository, "action": action}
            ) from None

    async def _public(self, repository: str) -> bool:
        lookup = self.authorizer.public_repository
        return lookup is not None and await lookup(repository)

    # -- the token endpoint -------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        """Docker's token endpoint: GET with the credential in the Authorization header and
        `scope` parameters, or the OAuth2 form POST (`grant_type=password` with the berth
        token as `password`, or `refresh_token` = a berth token) that containerd tries
        first."""
        scopes = request.query.getall("scope", [])
        try:
            if request.method == "POST":
                form = await request.post()
                grant = str(form.get("grant_type", ""))
                secret = str(form.get("password" if grant == "password" else "refresh_token", ""))
                if grant not in ("password", "refresh_token") or not secret:
                    raise HttpError(
                        400,
                        "UNSUPPORTED",
                        "grant_type must be password (with password) or refresh_token (with "
                        "refresh_token)",
                    )
                principal = await self.verifier.principal(secret)
                scopes = [str(v) for v in form.getall("scope", [])]
            else:
                principal = await self.credential(request)
        except Unauthenticated as exc:
            raise HttpError(
                401,
                "UNAUTHORIZED",
                str(exc),
                headers={"WWW-Authenticate": f'Basic realm="{SERVICE}"'},
            ) from None
        grants: dict[str, list[str]] = {}
        for scope in scopes:
            for item in scope.split():
                kind, _, rest = item.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind != "repository" or not _valid_name(name):
                    continue  # registry:catalog:* and the like: listings filter on their own
                wanted = ACTIONS if actions == "*" else actions.split(",")
                granted = [a for a in wanted if await self.allowed(principal, a, name)]
                if granted:
                    grants.setdefault(name, [])
                    grants[name] += [a for a in granted if a not in grants[name]]
        token = self.issue(principal, grants)
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.token_seconds,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "scope": " ".join(
                    f"repository:{name}:{','.join(actions)}" for name, actions in grants.items()
                ),
            }
        )


def _valid_name(name: str) -> bool:
    try:
        validate_repository(name)
    except Exception:
        return False
    return True


def realm(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/v2/token"


def challenge(
    request: web.Request, repository: str = "", action: str = "", insufficient: bool = False
) -> str:
    """Docker's bearer challenge: where to get a token, and for what."""
    text = f'Bearer realm="{realm(request)}",service="{SERVICE}"'
    if repository:
        actions = "pull" if action == "pull" else f"pull,{action}"
        text += f',scope="repository:{repository}:{actions}"'
    if insufficient:
        text += ',error="insufficient_scope"'
    return text


def _peer_identity(request: web.Request) -> str | None:
    """The identity in a verified client certificate (TLS listeners ask for one, optionally)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return _identity_of(der)


@functools.lru_cache(maxsize=256)
def _identity_of(der: bytes) -> str | None:
    """Parsed once per certificate: clients reuse a few."""
    try:
        return certificate_identity(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM))
    except ValueError:
        return None
