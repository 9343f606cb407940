"""The loop every etcd view runs: list, then watch from the listing's revision; list again at
once when the watch's revisions are compacted away, and after a pause when etcd is away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from berthd.common.errors import BerthError
from berthd.common.store import RevisionCompacted

__all__ = ["relisting"]


async def relisting(
    follow: Callable[[], Awaitable[None]],
    what: str,
    log: logging.Logger,
    retry_seconds: float = 1.0,
    errors: tuple[type[BaseException], ...] = (BerthError,),
) -> None:
    """Run `follow` (a listing, then a watch from its revision) until cancelled; `what` names
    the view in the log ("mesh view"). `errors` are the failures that mean "etcd is away"."""
    while True:
        try:
            await follow()
        except asyncio.CancelledError:
            raise
        except RevisionCompacted as exc:
            log.info("%s compacted away, listing again: %s", what, exc)
        except errors as exc:
            log.warning("%s lost, listing again: %s", what, exc)
            await asyncio.sleep(retry_seconds)
