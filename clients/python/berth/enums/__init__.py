"""One table per protobuf enum: the names the CLI, the clients and the servers use for its values.

Each service's tables live in a submodule (`berth.enums.containers`, `.node`, `.cluster`,
`.image`, `.builder`), so a program that uses one service loads only that service's stubs. The
clients read values as names; the servicers turn their own strings into values with the same
tables, so a name is written once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

UNSPECIFIED = 0


class EnumTable:
    """A protobuf enum's values <-> names, both ways.

    `names` gives every value but the zero one its name, written out rather than derived from
    the proto's value names: they are what users type and scripts match, so renaming a proto
    value must not change them (and a new value must be given one: tests/unit/test_enums.py).
    `unspecified` is the name the zero value reads as when it means a default
    (RESTART_POLICY_NAME_UNSPECIFIED is "no"); without it, the zero value has no name.
    """

    def __init__(
        self,
        enum: Any,
        names: Mapping[int, str],
        *,
        unspecified: str | None = None,
    ) -> None:
        descriptor = enum.DESCRIPTOR
        self.full_name: str = descriptor.full_name
        self._proto_names: dict[int, str] = {v.number: v.name for v in descriptor.values}
        unknown = [v for v in names if v not in self._proto_names or v == UNSPECIFIED]
        if unknown:
            raise ValueError(f"{self.full_name} has no value {unknown[0]}")
        self._names: dict[int, str] = dict(names)
        self._values: dict[str, int] = {name: value for value, name in names.items()}
        if len(self._values) != len(self._names):
            raise ValueError(f"{self.full_name}: two values have the same name")
        self.unspecified = unspecified
        if unspecified is not None:
            self._values.setdefault(unspecified, UNSPECIFIED)

    @property
    def names(self) -> tuple[str, ...]:
        """The names given back, in value order (for choices and help texts)."""
        return tuple(self._names[v] for v in sorted(self._names))

    def name(self, value: int, default: str | None = None) -> str:
        """The name of `value`; `default` (or ValueError when None) for a value without one."""
        if value in self._names:
            return self._names[value]
        if value == UNSPECIFIED and self.unspecified is not None:
            return self.unspecified
        if default is not None:
            return default
        raise ValueError(f"unknown {self.full_name} value {value}")

    def value(self, name: str, default: int | None = None) -> int:
        """The value called `name`; `default` (or ValueError when None) for an unknown name."""
        if name in self._values:
            return self._values[name]
        if default is not None:
            return default
        raise ValueError(
            f"unknown {self.full_name} {name!r}: expected one of {', '.join(self.names)}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def missing(self) -> list[str]:
        """Proto value names, other than the zero value, that have no name here."""
        return [
            proto
            for number, proto in sorted(self._proto_names.items())
            if number != UNSPECIFIED and number not in self._names
        ]

    def wording(self, words: Mapping[str, str]) -> Wording:
        """Display text for this enum's values, keyed by name."""
        return Wording(self, words)

    def __repr__(self) -> str:
        return f"EnumTable({self.full_name}, {self._names})"


class Wording:
    """Display text for an enum's values, keyed by the table's names: Docker's words for pull
    progress, say, which are not names one types."""

    def __init__(self, table: EnumTable, words: Mapping[str, str]) -> None:
        unknown = [name for name in words if name not in table]
        if unknown:
            raise ValueError(f"{table.full_name} has no name {unknown[0]!r}")
        self.table = table
        self._words = dict(words)

    def __call__(self, value: int, default: str) -> str:
        """The text for `value`; `default` for a value without one."""
        name = self.table.name(value, "")
        return self._words.get(name, default) if name else default

    def missing(self) -> list[str]:
        """Names of the table without a text."""
        return [name for name in self.table.names if name not in self._words]
