"""Who sees which repositories: the registry's half of repository visibility.

The interceptor checks the repositories a request names (berthd.common.security.authorize);
what it cannot see is decided here: which repositories a listing or search may show, and
whether a repository is public (the lookup the registry gives its Authorizer, so anonymous
callers can pull public repositories).

A caller sees a repository when it may pull it (its role and repository scopes) or when the
repository is public. Nothing about a hidden repository leaves a listing: not the entry, not a
page token naming it, not a "more" that only hidden entries would justify.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from berthd.common.security.permissions import Permission
from berthd.common.security.principal import Principal

# Whether the caller may pull a repository by its own rights (not counting public ones).
MayPull = Callable[[str], bool]

# How long an instance trusts what it read about a repository's visibility: a change made
# through another registry instance shows here within this many seconds.
PUBLIC_CACHE_SECONDS = 1.0
_CACHE_LIMIT = 10_000


def pull_filter(principal: Principal) -> MayPull | None:
    """None when the principal may pull every repository (nothing to filter); else whether it
    may pull a given one."""
    if principal.holds(Permission.REPOSITORY_PULL) and not principal.repositories:
        return None
    return lambda repository: principal.may(Permission.REPOSITORY_PULL, repository)


def sees(may_pull: MayPull | None, repository: str, public: bool) -> bool:
    """Whether a caller with `may_pull` (pull_filter's answer) sees the repository."""
    return may_pull is None or public or may_pull(repository)


class PublicCache:
    """`is_public(repository)` answered from the registry's records, each answer kept
    PUBLIC_CACHE_SECONDS: anonymous pulls cost no etcd read per call."""

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[bool]],
        seconds: float = PUBLIC_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._seconds = seconds
        self._clock = clock
        self._answers: dict[str, tuple[float, bool]] = {}

    async def __call__(self, repository: str) -> bool:
        now = self._clock()
        cached = self._answers.get(repository)
        if cached is not None and now - cached[0] < self._seconds:
            return cached[1]
        public = await self._lookup(repository)
        if len(self._answers) >= _CACHE_LIMIT:
            self._answers.clear()
        self._answers[repository] = (now, public)
        return public

    def forget(self, repository: str) -> None:
        """Drop the answer for a repository this instance just changed."""
        self._answers.pop(repository, None)
