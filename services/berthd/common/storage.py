"""A service's own disk failing under it, as an error a caller can act on.

A full disk (ENOSPC, EDQUOT) is RESOURCE_EXHAUSTED with reason STORAGE_FULL; a disk that fails
(EIO) or was remounted read-only (EROFS) is UNAVAILABLE with reason STORAGE_ERROR. The message
names the directory and what could not be done, never the raw `[Errno 28] ...` text. Any
other OSError (a missing file, a permission) is the caller's to handle and passes unchanged.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from berthd.common.errors import BerthError, ResourceExhausted, Unavailable

log = logging.getLogger("berthd.storage")

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
BROKEN = frozenset({errno.EIO, errno.EROFS})


class Storage:
    """One directory a service writes to, named for people: `Storage("the registry's data
    directory", root)` words errors as "cannot start an upload: the registry's data directory
    /var/lib/berth/registry is full"."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def error(self, exc: OSError, action: str, **metadata: object) -> BerthError | None:
        """The domain error for `exc` while doing `action` ("cannot start an upload"), or None
        when it is no storage failure."""
        where = f"{self.name} {self.path}"
        facts = {"directory": str(self.path), **metadata}
        if exc.errno in FULL:
            return ResourceExhausted(
                f"{action}: {where} is full; free space and retry",
                reason="STORAGE_FULL",
                metadata=facts,
            )
        if exc.errno in BROKEN:
            # The operator needs the real cause; the caller gets one clear line.
            log.error("%s: %s: %s", action, where, exc)
            state = "is read-only" if exc.errno == errno.EROFS else "failed with an I/O error"
            return Unavailable(
                f"{action}: {where} {state}; retry later",
                reason="STORAGE_ERROR",
                metadata=facts,
            )
        return None

    @contextmanager
    def guard(self, action: str, **metadata: object) -> Iterator[None]:
        """Re-raise a storage failure inside the block as its domain error."""
        try:
            yield
        except OSError as exc:
            error = self.error(exc, action, **metadata)
            if error is None:
                raise
            raise error from exc
