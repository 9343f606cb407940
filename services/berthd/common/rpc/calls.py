"""Calls from one berth service to another: deadlines, retries, and status codes turned back
into the domain errors the caller's own core raises.

Every unary call has a deadline. A call marked idempotent is retried with backoff when the
peer could not be reached at all (the transport failed, not the peer's own UNAVAILABLE answer),
so a restarting service costs a short wait instead of a failed build or commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from berth import error_details
from berth.errors import is_transport_failure, one_line
from berthd.common.errors import BerthError, error_for_code
from berthd.common.rpc.channels import Channels, shared

# Long enough for a registry call that fsyncs a blob; short enough that a wedged peer fails
# the caller instead of hanging it.
DEFAULT_TIMEOUT = 60.0
ATTEMPTS = 4
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 1.0

Address = str | Callable[[], Awaitable[str]]
Stub = TypeVar("Stub")


def domain_error(
    err: grpc.aio.AioRpcError, service: str, address: str, prefix: bool = False
) -> BerthError:
    """The domain error for another service's failed call, with a message a person can act on;
    `prefix` puts the service's name before the peer's own message ("registry: ...")."""
    code = err.code()
    details = one_line(err.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE and retryable(err):
        reason = details.rsplit(": ", 1)[-1].strip(" []") or "unavailable"
        message = f"cannot reach the {service} at {address} ({reason})"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the {service} at {address} did not answer in time"
    else:
        message = details or f"the {service} at {address} failed with {code.name}"
        if prefix:
            message = f"{service}: {message}"
    return error_for_code(code.name, message, error_details.from_rpc_error(err))


def retryable(err: grpc.aio.AioRpcError) -> bool:
    """The peer was never reached (refused, reset, not resolvable): the call did nothing. An
    answer with a reason is the peer's own (its etcd is away, say), whatever its words."""
    if err.code() != grpc.StatusCode.UNAVAILABLE or error_details.from_rpc_error(err).reason:
        return False
    return is_transport_failure(err.details() or "")


class ServiceApi(Generic[Stub]):
    """The typed async client of one berth service, as other services use it.

    `address` is a fixed address or an async getter (the service's registration in etcd,
    looked up on every call, so a restarted peer on a new port is found). Subclasses set
    SERVICE (how errors name the peer), PREFIX (whether its messages are prefixed with it)
    and implement `stub`.
    """

    SERVICE = ""
    PREFIX = False

    def __init__(
        self, address: Address, channels: Channels | None = None, *, attempts: int = ATTEMPTS
    ) -> None:
        self._address = address
        self._channels = channels
        self.attempts = attempts

    def stub(self, channel: grpc.aio.Channel) -> Stub:
        raise NotImplementedError

    async def address(self) -> str:
        return self._address if isinstance(self._address, str) else await self._address()

    async def connect(self) -> tuple[Stub, str]:
        """The stub over the shared channel to the peer's current address, and that address."""
        address = await self.address()
        channels = self._channels or shared()
        return self.stub(channels.get(address)), address

    def error(self, err: grpc.aio.AioRpcError, address: str) -> BerthError:
        return domain_error(err, self.SERVICE, address, self.PREFIX)

    def _unreachable(self, err: grpc.aio.AioRpcError, address: str) -> None:
        """Tell an address getter that can choose (berthd.common.endpoints.ServiceAddress)
        that the peer at `address` was not reached, so the next attempt goes elsewhere."""
        report = getattr(self._address, "unreachable", None)
        if report is not None and retryable(err):
            report(address)

    async def unary(
        self,
        method: str,
        request: Any,
        *,
        idempotent: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """One unary call by method name, with a deadline (None: none, for work that grows with
        the data) and, when idempotent, retries while the peer cannot be reached."""
        delay = FIRST_BACKOFF
        for attempt in range(self.attempts):
            stub, address = await self.connect()
            try:
                return await getattr(stub, method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                self._unreachable(err, address)
                if idempotent and attempt < self.attempts - 1 and retryable(err):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                    continue
                raise self.error(err, address) from None
        raise AssertionError("unreachable")

    async def stream(
        self, method: str, request: Any, *, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        """The replies of a server-streaming call, or of a bidirectional one when `request` is
        an async iterator of messages; no deadline unless given (a stream may follow a
        container for as long as it runs). Closing the generator (`contextlib.aclosing`)
        cancels the call, so the peer's side ends too."""
        stub, address = await self.connect()
        call = getattr(stub, method)(request, timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            self._unreachable(err, address)
            raise self.error(err, address) from None
        finally:
            call.cancel()
