"""The gRPC plumbing every typed berth client shares: one channel, deadlines, error translation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Self

import grpc

from berth.errors import from_rpc_error
from berth.tls import secure_channel

MAX_MESSAGE = 16 * 1024 * 1024


class GrpcClient:
    """A channel to one service; unary calls get a deadline, streams none (they may follow)."""

    SERVICE = ""  # how errors name the service: "cannot reach the node at ..."
    OPTION = ""  # how a person points the CLI elsewhere; default --SERVICE or BERTH_SERVICE

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = secure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _error(self, err: grpc.RpcError) -> Exception:
        return from_rpc_error(err, address=self.address, service=self.SERVICE, option=self.OPTION)

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise self._error(err) from err

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        try:
            yield from method(request)
        except grpc.RpcError as err:
            raise self._error(err) from err
