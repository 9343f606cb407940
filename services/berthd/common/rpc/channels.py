"""The channels a service opens to other berth services: one grpc.aio channel per address.

This is the one place where a service's outgoing connections are made, so transport
credentials (mTLS, when the security issue brings it) are added here and nowhere else.
A channel belongs to the event loop it was made on; `shared()` gives the process's registry
of channels for the running loop.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


class Channels:
    """Open channels by address, made on first use and kept until `close`."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(address, self.credentials, CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()


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
