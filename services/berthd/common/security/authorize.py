"""Authorization of one call, in the interceptor, before any handler runs.

1. Who: the bearer token in the metadata (checked against etcd), else the verified client
   certificate, else anonymous (principal.py).
2. What: the method's rule from permissions.METHODS; an RPC missing from the table is refused.
3. Check: the rule's permission, then its repository permission on every repository the request
   names. Anonymous callers may pull a public repository; a repository lookup the service
   provides (`public_repository`) says which are.

The answer is UNAUTHENTICATED for a caller with no (or a bad) credential, PERMISSION_DENIED for
a known caller without the permission, each with reason and the permission in the details.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from berth.errors import InvalidArgumentError
from berth.reference import names_registry, parse_reference
from berth.tls import plaintext_mode
from berthd.common.errors import PermissionDenied, Unauthenticated
from berthd.common.security.permissions import UPLOAD, Permission, Rule, rule_for
from berthd.common.security.principal import ANONYMOUS, Principal, from_certificate
from berthd.common.security.tls import peer_identity
from berthd.common.security.tokens import TokenVerifier

# Whether a repository is public (pullable by anyone): the registry answers from its records.
PublicLookup = Callable[[str], Awaitable[bool]]

BEARER = "bearer "


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text[: len(BEARER)].lower() == BEARER:
                return text[len(BEARER) :].strip()
            raise Unauthenticated(
                "the authorization metadata must read `Bearer <token>`", reason="TOKEN_INVALID"
            )
    return None


class Authorizer:
    """Resolves the principal of a call and checks the method's rule."""

    def __init__(
        self, verifier: TokenVerifier | None, public_repository: PublicLookup | None = None
    ) -> None:
        self._verifier = verifier
        self.public_repository = public_repository

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        token = bearer_token(context)
        if token is not None:
            if self._verifier is None:
                raise Unauthenticated("this service takes no tokens", reason="TOKEN_INVALID")
            return await self._verifier.principal(token)
        identity = peer_identity(context)
        if identity is None and plaintext_mode():
            # Benchmarks only: no certificates exist, so every caller is the administrator
            # and the cost of the checks themselves stays in the measurement.
            identity = "user:admin"
        return from_certificate(identity) if identity else ANONYMOUS

    def rule(self, method: str) -> Rule:
        rule = rule_for(method)
        if rule is None:
            # Not in the table: refused, never served by default.
            raise PermissionDenied(
                f"{method} is not in berth's permission table", reason="METHOD_NOT_ALLOWED"
            )
        return rule

    def check_method(self, principal: Principal, method: str, rule: Rule) -> None:
        """The rule's own permission (repository scopes come with the request)."""
        permission = rule.permission
        if principal.holds(permission):
            return
        # Pulling a public repository needs no credential: decided on the repository.
        if permission == Permission.REPOSITORY_PULL and self.public_repository is not None:
            return
        raise denied(principal, permission, method)

    async def check_request(
        self, principal: Principal, method: str, rule: Rule, request: Any
    ) -> None:
        """The repository permission on each repository the request names."""
        scope = rule.repository_permission
        # No field: a listing, which shows only what the caller may pull; an upload session:
        # the registry checks the session's repository when it finds the session.
        if scope is None or not rule.repository or rule.repository == UPLOAD:
            return
        named = list(repositories_named(request, rule))
        if not named and not principal.holds(rule.permission):
            # Nothing to decide on (no repository given): the caller needs the permission.
            raise denied(principal, rule.permission, method)
        for repository in named:
            await self.check_repository(principal, scope, repository, method)

    async def check_repository(
        self, principal: Principal, permission: Permission, repository: str, method: str = ""
    ) -> None:
        """One repository permission, with public repositories pullable by anyone. Handlers
        call this for the repositories the interceptor cannot see (upload sessions, streamed
        requests)."""
        if principal.may(permission, repository):
            return
        if permission == Permission.REPOSITORY_PULL and await self._is_public(repository):
            return
        raise denied(principal, permission, method, repository)

    async def _is_public(self, repository: str) -> bool:
        if self.public_repository is None:
            return False
        return await self.public_repository(repository)


def denied(
    principal: Principal, permission: Permission, method: str, repository: str = ""
) -> Exception:
    """UNAUTHENTICATED for the anonymous caller, PERMISSION_DENIED for a known one."""
    what = f"{permission.value} on {repository}" if repository else permission.value
    call = method.rsplit("/", 1)[-1] or "this call"
    metadata = {"permission": permission.value, "principal": principal.name}
    if repository:
        metadata["repository"] = repository
    if method:
        metadata["method"] = method
    if not principal.authenticated:
        return Unauthenticated(
            f"authentication required: {call} needs {what}; log in with `berth login --token-stdin`"
            " or present a client certificate",
            reason="AUTHENTICATION_REQUIRED",
            metadata=metadata,
        )
    who = f"{principal.name} ({principal.role})" if principal.role else principal.name
    return PermissionDenied(
        f"permission denied: {who} may not call {call}: it needs {what}",
        reason="PERMISSION_DENIED",
        metadata=metadata,
    )


def repositories_named(request: Any, rule: Rule) -> Iterator[str]:
    """The repositories in the rule's request field (a dotted path; repeated fields give each
    value). References that name no repository in berth's registry (an image id, a digest)
    give none."""
    for value in _field_values(request, rule.repository.split(".")):
        if not value:
            continue
        repository = repository_of(value) if rule.reference else value
        if repository:
            yield repository


def repository_of(reference: str) -> str | None:
    """`registry.local/team/app:1` -> `team/app`; an id or digest -> None."""
    if reference.startswith("sha256:") or (
        len(reference) <= 64 and all(c in "0123456789abcdef" for c in reference)
    ):
        return None
    try:
        parsed = parse_reference(reference, default_tag=None)
    except InvalidArgumentError:
        return None
    first = reference.partition("/")[0]
    if parsed.registry is None and names_registry(first):
        return None
    return parsed.repository


def _field_values(message: Any, path: list[str]) -> Iterator[str]:
    if not path:
        if isinstance(message, str):
            yield message
        return
    name, rest = path[0], path[1:]
    value = getattr(message, name, None)
    if value is None:
        return
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        yield from _field_values(value, rest)
        return
    for item in value:
        yield from _field_values(item, rest)
