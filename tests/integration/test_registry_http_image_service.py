"""berth's own distribution client (the image service's external pull and push, on httpx)
against berth's OCI HTTP API: Docker's token flow with a berth token as the password, mounts,
identity tokens refused, and the copy back byte for byte. One registry process serves both
sides: the catalog's gRPC registry and the "external" /v2/ host."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from berth.client import RegistryClient
from berthd.common.errors import Unauthenticated
from berthd.common.rpc.registry import RegistryApi
from berthd.common.store import Store
from berthd.image.catalog import Catalog
from berthd.image.model import Credentials, Event, State
from berthd.image.transfer import pull_external, push_external

from .conftest import ServiceProcess
from .images import busybox_layer, push_image
from .oci_http import make_token

FINAL = {State.DONE, State.ALREADY_EXISTS, State.MOUNTED}


@pytest.fixture
async def catalog(
    store: Store, oci_registry: ServiceProcess, tmp_path: Path
) -> AsyncIterator[Catalog]:
    catalog = Catalog(store, RegistryApi(oci_registry.address), tmp_path / "scratch")
    yield catalog
    await catalog.close()


async def test_the_image_service_copies_to_and_from_berths_v2(
    catalog: Catalog, oci_registry: ServiceProcess, store: Store, tmp_path: Path
) -> None:
    with RegistryClient(oci_registry.address) as client:
        local = push_image(client, "test/busybox", "1", [busybox_layer()], tmp_path)
    host = oci_registry.http_url.removeprefix("http://")
    developer = Credentials("ci", await make_token(store, "ci", "developer"))

    digest, _ = await push_external(
        catalog, "test/busybox:1", f"{host}/ext/busybox:1", developer, False, lambda e: None
    )
    assert digest == local
    # A second copy mounts every blob from the first repository (POST ?mount=&from=).
    events: list[Event] = []
    await push_external(
        catalog, "test/busybox:1", f"{host}/ext/again:1", developer, False, events.append
    )
    finished = {e.id: e.state for e in events if e.state in FINAL}
    assert finished and set(finished.values()) == {State.MOUNTED}
    image, stored = await pull_external(
        catalog, f"{host}/ext/again:1", developer, False, "back/busybox:1", lambda e: None
    )
    assert image.digest == local and stored == "back/busybox:1"

    reader = Credentials("ci", await make_token(store, "reader", "reader"))
    with pytest.raises(Unauthenticated):
        await push_external(
            catalog, "test/busybox:1", f"{host}/ext/denied:1", reader, False, lambda e: None
        )
    with pytest.raises(Unauthenticated, match="authentication required"):
        await pull_external(catalog, f"{host}/ext/busybox:1", None, False, "x/y:1", lambda e: None)
    wrong = Credentials("ci", "berth_0123456789abcdef_" + "x" * 43)
    with pytest.raises(Unauthenticated, match="refused the credentials"):
        await pull_external(catalog, f"{host}/ext/busybox:1", wrong, False, "x/y:1", lambda e: None)
