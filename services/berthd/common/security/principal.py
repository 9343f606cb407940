"""Who is calling: the principal of one RPC, resolved by the interceptor from the caller's
verified certificate or bearer token, and readable by any handler of that call.

- A certificate names berth's own identities (`service:<name>`, `node:<id>`) and the local
  admin (`user:admin`, written by `berthd up`); their permissions are fixed
  (permissions.IDENTITIES and the admin role).
- A token (`authorization: Bearer <token>`, see tokens.py) names a user with one role and,
  optionally, the repositories its repository permissions are limited to (`team/*`).
- No credential at all is the anonymous principal: health checks, and pulling and searching
  public repositories.

A token wins over a certificate on the same call: a berth service relaying a user's request
may forward the user's token, and is then held to the user's permissions.
"""

from __future__ import annotations

import contextvars
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from berthd.common.security.permissions import (
    IDENTITIES,
    REPOSITORY_PERMISSIONS,
    Permission,
    Role,
    permissions_of,
)

ANONYMOUS_NAME = "anonymous"


@dataclass(frozen=True)
class Principal:
    """`name` is what events and logs show (`user:alice`, `service:image`, `anonymous`);
    `via` how it was established: "certificate", "token" or "none"."""

    name: str
    permissions: frozenset[Permission]
    via: str = "certificate"
    # Repository permissions hold only for repositories matching one of these patterns
    # (`team/*`); empty: every repository.
    repositories: tuple[str, ...] = ()
    role: str = ""
    token_id: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def authenticated(self) -> bool:
        return self.via != "none"

    def holds(self, permission: Permission) -> bool:
        """The permission for at least something (for a repository permission: some
        repository)."""
        return permission == Permission.PUBLIC or permission in self.permissions

    def may(self, permission: Permission, repository: str | None = None) -> bool:
        """The permission, for `repository` when it is a repository permission."""
        if not self.holds(permission):
            return False
        if repository is None or permission not in REPOSITORY_PERMISSIONS:
            return True
        return repository_matches(repository, self.repositories)


def repository_matches(repository: str, patterns: Iterable[str]) -> bool:
    """`team/*` matches `team/app` and `team/a/b`; `team/app` only itself; no pattern: all."""
    patterns = tuple(patterns)
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(repository, pattern) for pattern in patterns)


ANONYMOUS = Principal(ANONYMOUS_NAME, frozenset({Permission.PUBLIC}), via="none")


def from_certificate(identity: str) -> Principal:
    """The principal of a verified certificate identity (`service:image`, `node:node-1`,
    `user:admin`). A user certificate other than the admin's carries no permission: people
    other than the cluster's administrator use tokens."""
    kind = identity.partition(":")[0]
    if identity in IDENTITIES:
        granted = IDENTITIES[identity]
    elif kind in IDENTITIES:
        granted = IDENTITIES[kind]
    elif identity == "user:admin":
        return Principal(identity, permissions_of([Role.ADMIN]), role=Role.ADMIN)
    else:
        granted = frozenset({Permission.PUBLIC})
    return Principal(identity, granted)


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "berth_principal", default=ANONYMOUS
)


def current_principal() -> Principal:
    """The principal of the RPC this code runs for (anonymous outside any RPC)."""
    return _current.get()


def set_current_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


def reset_current_principal(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)
