"""What the cluster's named objects (secrets, networks) share: finding one by a reference as
Docker does, and the guards of a spec that names some."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from berthd.common.errors import InvalidArgument
from berthd.common.state.family import Family
from berthd.common.store import Compare, Store

__all__ = ["existence_guards", "resolve_ref"]


class Named(Protocol):
    id: str
    name: str


N = TypeVar("N", bound=Named)


def resolve_ref(
    ref: str,
    records: Iterable[N],
    kind: str,
    not_found: Callable[[str, str], Exception],
    invalid: Callable[[str, str], Exception],
) -> N:
    """The record `ref` names: its name, full id or unique id prefix, in that order (as
    Docker resolves them); `kind` for messages ("network"), `not_found(ref, field)` and
    `invalid(message, field)` make the object's own errors."""
    if not ref:
        raise invalid(f"a {kind} name or id is required", kind)
    records = list(records)
    for match in (lambda r: r.name == ref, lambda r: r.id == ref):
        found = [r for r in records if match(r)]
        if found:
            return found[0]
    prefixed = [r for r in records if r.id.startswith(ref)]
    if len(prefixed) > 1:
        raise InvalidArgument(
            f'{kind} id prefix "{ref}" is ambiguous: it matches {len(prefixed)} {kind}s',
            reason="AMBIGUOUS_ID",
            metadata={"prefix": ref, "matches": len(prefixed)},
        )
    if not prefixed:
        raise not_found(ref, kind)
    return prefixed[0]


async def existence_guards(
    store: Store,
    family: Family[Any],
    keys: Iterable[str],
    not_found: Callable[[str, str], Exception],
    field: str,
) -> list[Compare]:
    """For a spec being accepted that names these objects (keys of `family`): `not_found(key,
    field)` for one that does not exist, else the compares that fail the acceptance's
    transaction if one of them is removed before it commits."""
    compares = []
    for key in dict.fromkeys(keys):
        found = await family.read(store, key)
        if found is None:
            raise not_found(key, field)
        compares.append(family.unchanged(store, key, found.mod_revision))
    return compares
