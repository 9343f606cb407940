"""The channels a service opens to other berth services: one grpc.aio channel per address.

This is the one place where a service's outgoing connections are made, so transport
credentials are added here and nowhere else: TLS verified against the cluster CA, with the
instance's own certificate as client certificate (mutual TLS; see docs/security.md). After the
certificate is renewed, the next `get` of an address opens a channel with the new one (calls
in flight on the old channel finish there). A process that configured no instance credentials
(a tool, a test) uses the client files of berth.tls.
A channel belongs to the event loop it was made on; `shared()` gives the process's registry
of channels for the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import grpc

from berth.tls import channel_credentials as client_file_credentials
from berth.tls import plaintext_mode

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


class CredentialSource(Protocol):
    """What berthd.common.security.tls.InstanceCredentials offers channels."""

    generation: int

    def channel_credentials(self) -> grpc.ChannelCredentials: ...


_source: CredentialSource | None = None


def configure(source: CredentialSource | None) -> None:
    """Set the process's instance credentials (run_server does, before serving)."""
    global _source
    _source = source


class Channels:
    """Open channels by address, made on first use and kept until `close`."""

    def __init__(self, source: CredentialSource | None = None) -> None:
        self.source = source
        self._channels: dict[str, tuple[int, grpc.aio.Channel]] = {}
        self._retired: list[grpc.aio.Channel] = []

    def get(self, address: str) -> grpc.aio.Channel:
        source = self.source or _source
        generation = source.generation if source is not None else 0
        entry = self._channels.get(address)
        if entry is not None and entry[0] == generation:
            return entry[1]
        if entry is not None:
            self._retired.append(entry[1])  # closed with the others: calls on it may run
        if plaintext_mode():  # benchmarks only (berth.tls.PLAINTEXT_ENV)
            channel = grpc.aio.insecure_channel(address, CHANNEL_OPTIONS)
            self._channels[address] = (generation, channel)
            return channel
        credentials = (
            source.channel_credentials() if source is not None else client_file_credentials()
        )
        channel = grpc.aio.secure_channel(address, credentials, CHANNEL_OPTIONS)
        self._channels[address] = (generation, channel)
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        retired, self._retired = self._retired, []
        for channel in [*(c for _, c in channels.values()), *retired]:
            with contextlib.suppress(Exception):
                await channel.close()


class _CaOnly:
    """Credentials that verify the server against the CA and present no certificate."""

    generation = 0

    def __init__(self, ca_pem: bytes) -> None:
        self._credentials = grpc.ssl_channel_credentials(ca_pem)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return self._credentials


def public_channels(ca_pem: bytes) -> Channels:
    """Channels to services' public ports (--public-listen) that present no client
    certificate: a node joining the cluster has none yet. The server is still verified
    against the CA in `ca_pem`."""
    return Channels(_CaOnly(ca_pem))


_shared: dict[asyncio.AbstractEventLoop, Channels] = {}


def shared() -> Channels:
    """The channels of the running event loop (a service runs one loop; tests may run more)."""
    loop = asyncio.get_running_loop()
    channels = _shared.get(loop)
    if channels is None:
        for closed in [other for other in _shared if other.is_closed()]:
            del _shared[closed]
        channels = _shared[loop] = Channels()
    return channels


async def close_shared() -> None:
    """Close the running loop's channels (a service's shutdown)."""
    channels = _shared.pop(asyncio.get_running_loop(), None)
    if channels is not None:
        await channels.close()


def etcd_channel(
    target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, object]]
) -> grpc.aio.Channel:
    """The store's channel to etcd: TLS with a client certificate (etcd's --client-cert-auth)."""
    return grpc.aio.secure_channel(target, credentials, options)
