"""berthd.common.rpc, the async client layer services call each other through, against a real
registry process: blob round trips, resumed downloads, errors as domain errors, retries while
the peer is not up yet, one channel per address."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest

from berthd.common.endpoints import service_address
from berthd.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from berthd.common.oci.digest import digest_bytes
from berthd.common.rpc.channels import Channels
from berthd.common.rpc.registry import RegistryApi
from berthd.common.state.endpoints import instances
from berthd.common.store import Store

from .conftest import ServiceProcess, Services, free_port

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


async def test_blob_round_trip_through_files_and_bytes(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    api = RegistryApi(registry.address)
    data = os.urandom(3 * (1 << 20) + 17)  # several chunks and a short last one
    source = tmp_path / "blob"
    source.write_bytes(data)
    digest = digest_bytes(data)
    seen: list[tuple[int, int]] = []

    progress = lambda done, total: seen.append((done, total))  # noqa: E731
    assert await api.push_blob("a/b", source, digest, len(data), progress) == "pushed"
    assert seen[-1] == (len(data), len(data))
    assert await api.push_blob("a/b", source, digest, len(data)) == "exists"
    assert await api.push_blob("c", source, digest, len(data)) == "mounted"
    assert await api.stat_blob("c", digest) == len(data)

    dest = tmp_path / "out"
    assert await api.pull_blob("c", digest, dest) == len(data)
    assert dest.read_bytes() == data
    assert not (tmp_path / "out.partial").exists()

    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    descriptor = await api.push_bytes("c", config, OCI_CONFIG)
    assert descriptor.digest == digest_bytes(config)
    assert await api.read_blob("c", descriptor.digest) == config


async def test_a_download_goes_on_from_its_partial_file(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    api = RegistryApi(registry.address)
    data = os.urandom(2 * (1 << 20))
    (tmp_path / "blob").write_bytes(data)
    digest = digest_bytes(data)
    await api.push_blob("r", tmp_path / "blob", digest, len(data))
    dest = tmp_path / "out"
    (tmp_path / "out.partial").write_bytes(data[:1000])  # an earlier pull cut short
    offsets: list[int] = []
    await api.pull_blob("r", digest, dest, lambda done, total: offsets.append(done))
    assert offsets[0] == 1000  # it asked only for what was missing
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest.removeprefix("sha256:")

    # A partial file that is not a prefix of the blob fails the digest, and is deleted.
    (tmp_path / "bad.partial").write_bytes(b"x" * 1000)
    with pytest.raises(DataLoss, match="does not match its digest"):
        await api.pull_blob("r", digest, tmp_path / "bad")
    assert not (tmp_path / "bad.partial").exists()
    assert not (tmp_path / "bad").exists()


async def test_status_codes_come_back_as_domain_errors(registry: ServiceProcess) -> None:
    api = RegistryApi(registry.address)
    missing = "sha256:" + "0" * 64
    assert await api.stat_blob("r", missing) is None
    with pytest.raises(NotFound, match=r"^registry: "):
        await api.get_manifest("r", "nope")
    with pytest.raises(InvalidArgument, match="invalid repository name"):
        await api.get_manifest("Bad Name", "latest")
    assert await api.tag_digest("r", "nope") is None


async def test_an_unreachable_peer_is_unavailable_naming_it() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    api = RegistryApi(address)
    with pytest.raises(Unavailable, match=f"cannot reach the registry at {address}"):
        await api.get_manifest("r", "latest")


async def test_idempotent_calls_wait_for_a_peer_that_is_starting(
    services: Services, tmp_path: Path
) -> None:
    port = free_port()
    # Every attempt looks the address up: the second look-up means the first was refused.
    looked_up = 0
    retrying = asyncio.Event()

    async def address() -> str:
        nonlocal looked_up
        looked_up += 1
        if looked_up == 2:
            retrying.set()
        return f"127.0.0.1:{port}"

    # Sixty attempts wait about a minute in all: a guard, far longer than a registry takes to
    # start.
    api = RegistryApi(address, attempts=60)
    missing = "sha256:" + "0" * 64
    call = asyncio.ensure_future(api.stat_blob("r", missing))
    await asyncio.wait_for(retrying.wait(), 30)
    assert not call.done()  # refused, and trying again
    await asyncio.to_thread(
        services.start, "registry", f"--data-dir={tmp_path / 'data'}", f"--listen=127.0.0.1:{port}"
    )
    assert await call is None  # answered by the registry once it was up

    # A call that is not idempotent is never sent twice: it fails at once.
    services.stop_all()
    with pytest.raises(Unavailable, match="cannot reach the registry"):
        await api.delete_tag("r", "t")


async def test_one_channel_per_address() -> None:
    channels = Channels()
    try:
        assert channels.get("127.0.0.1:1") is channels.get("127.0.0.1:1")
        assert channels.get("127.0.0.1:1") is not channels.get("127.0.0.1:2")
    finally:
        await channels.close()


async def test_a_failing_upload_source_raises_its_own_error(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    """grpc reports a failing request stream as a cancelled call; the caller sees the cause."""
    api = RegistryApi(registry.address)
    data = os.urandom(2 * (1 << 20) + 5)
    (tmp_path / "blob").write_bytes(data)

    def progress(done: int, total: int) -> None:
        if 0 < done < total:
            raise RuntimeError("the disk went away")

    with pytest.raises(RuntimeError, match="the disk went away"):
        await api.push_blob("r", tmp_path / "blob", digest_bytes(data), len(data), progress)
    assert await api.stat_blob("r", digest_bytes(data)) is None


async def test_a_streamed_blob_is_checked_at_its_end(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    api = RegistryApi(registry.address)
    data = os.urandom(2 * (1 << 20) + 3)
    (tmp_path / "blob").write_bytes(data)
    digest = digest_bytes(data)
    await api.push_blob("r", tmp_path / "blob", digest, len(data))

    received = b"".join([chunk async for chunk in api.stream_blob("r", digest, len(data))])
    assert received == data

    # A size that is not the blob's (a manifest that lies) fails: a larger one once every
    # byte is in, a smaller one as soon as the registry sends more.
    with pytest.raises(DataLoss, match=rf"does not match its digest .*{len(data)} bytes"):
        async for _ in api.stream_blob("r", digest, len(data) + 1):
            pass
    with pytest.raises(DataLoss, match=f"larger than the {len(data) - 1} bytes expected"):
        async for _ in api.stream_blob("r", digest, len(data) - 1):
            pass


async def test_a_retry_goes_to_another_instance_while_a_dead_one_is_still_registered(
    services: Services, store: Store, tmp_path: Path
) -> None:
    """Two registries share a blob directory; the one a caller was using dies (SIGKILL: its
    registration stays until its 5 s lease expires). The caller's next attempt goes to the live
    one instead of failing against the dead one for the rest of the lease."""
    data = tmp_path / "shared"
    first, second = services.registry(data), services.registry(data)
    getter = service_address(store, "registry")
    listed = [i.address for i in await instances(store, "registry")]
    assert sorted(listed) == sorted([first.address, second.address])
    dead = await getter()  # the instance callers use first
    next(s for s in (first, second) if s.address == dead).proc.kill()
    api = RegistryApi(getter)
    missing = "sha256:" + "0" * 64
    assert await api.stat_blob("r", missing) is None  # answered by the live instance
    # ... while the dead instance was still registered: the getter passed over it.
    assert dead in [i.address for i in await instances(store, "registry")]
    assert await getter() != dead
