"""The image service's own Prometheus figures (per-RPC figures come from the common interceptor).

    berth_image_commits_total{outcome}            commits, outcome "ok" or "error"
    berth_image_imports_total{outcome}            imported tarballs, outcome "ok" or "error"
    berth_image_loads_total{outcome}              loaded archives, outcome "ok" or "error"
    berth_image_saves_total{outcome}              saved archives, outcome "ok" or "error"
    berth_image_external_bytes_total{direction}   bytes copied from ("pull") or to ("push")
                                                  external registries
    berth_image_catalog_images                    distinct images (manifests) in the catalog
    berth_image_catalog_bytes                     bytes of the distinct layers and configs
                                                  those images use

The catalog gauges are set whenever the catalog is listed or pruned, and by
`refresh_catalog` if the service runs it in the background.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from prometheus_client import Counter, Gauge

from berthd.common.errors import BerthError

log = logging.getLogger("berthd.image.metrics")

OK = "ok"
ERROR = "error"

COMMITS = Counter("berth_image_commits_total", "Container commits, by outcome.", ["outcome"])
IMPORTS = Counter("berth_image_imports_total", "Tarball imports, by outcome.", ["outcome"])
LOADS = Counter("berth_image_loads_total", "Archives loaded, by outcome.", ["outcome"])
SAVES = Counter("berth_image_saves_total", "Archives saved, by outcome.", ["outcome"])
EXTERNAL_BYTES = Counter(
    "berth_image_external_bytes_total",
    "Blob bytes copied from (pull) or to (push) external registries.",
    ["direction"],
)
CATALOG_IMAGES = Gauge("berth_image_catalog_images", "Distinct images in the catalog.")
CATALOG_BYTES = Gauge(
    "berth_image_catalog_bytes", "Bytes of the distinct layers and configs of the catalog."
)


P = ParamSpec("P")
R = TypeVar("R")


def counted(counter: Counter) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Count each call of an async operation in `counter` by outcome: ok, or error when it
    raises (a cancelled call counts as an error too: it did not happen)."""

    def wrap(operation: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(operation)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = await operation(*args, **kwargs)
            except BaseException:
                counter.labels(ERROR).inc()
                raise
            counter.labels(OK).inc()
            return result

        return run

    return wrap


def observe_catalog(images: int, size: int) -> None:
    CATALOG_IMAGES.set(images)
    CATALOG_BYTES.set(size)


async def refresh_catalog(
    figures: Callable[[], Awaitable[tuple[int, int]]], interval: float = 60.0
) -> None:
    """Set the catalog gauges from `figures()` (Catalog.figures) every `interval` seconds,
    until cancelled; a failed reading is logged and tried again next time."""
    while True:
        try:
            observe_catalog(*await figures())
        except BerthError as e:
            log.warning("cannot read the catalog's size: %s", e)
        await asyncio.sleep(interval)
