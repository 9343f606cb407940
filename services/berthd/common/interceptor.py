"""One server interceptor for every RPC of every service: authorization, metrics, error
mapping, request logs.

Before a handler runs, the call's principal is resolved (token, certificate or anonymous) and
checked against the permission table (berthd.common.security.authorize); handlers read it with
`current_principal()`. Servicers raise `BerthError`s from core code; here they become gRPC
statuses with the same message and their `google.rpc` error details (ErrorInfo and friends) in
the standard trailer, so no handler carries its own try/except, metrics or permission code.
Every mutating call is written to the `berthd.audit` log with its principal.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aetcd import exceptions as etcd_errors
from prometheus_client import Counter, Gauge, Histogram

from berthd.common.errors import BerthError, Unavailable
from berthd.common.security.authorize import Authorizer
from berthd.common.security.permissions import Rule
from berthd.common.security.principal import (
    ANONYMOUS,
    Principal,
    reset_current_principal,
    set_current_principal,
)

log = logging.getLogger("berthd.rpc")
audit = logging.getLogger("berthd.audit")

RPC_REQUESTS = Counter(
    "berth_grpc_requests_total",
    "gRPC calls handled, by method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "berth_grpc_request_duration_seconds",
    "Time from the start of a gRPC call to its status, by method.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RPC_IN_FLIGHT = Gauge(
    "berth_grpc_requests_in_flight",
    "gRPC calls currently being handled, by method.",
    ["service", "method"],
)


class _Call:
    """Bookkeeping for one call: timing, status, and one log line at the end."""

    def __init__(
        self,
        service: str,
        full_method: str,
        context: grpc.aio.ServicerContext,
        authorizer: Authorizer,
    ) -> None:
        self.service = service
        self.method = full_method.rsplit("/", 1)[-1]
        self.full_method = full_method
        self.context = context
        self.authorizer = authorizer
        self.request_id = _request_id(context)
        # Read now: context.peer() on a call the client has cancelled crashes grpc's C core.
        self.peer = context.peer()
        self.principal: Principal = ANONYMOUS
        self.rule: Rule | None = None
        self.start = time.perf_counter()
        self.cancelled = False
        RPC_IN_FLIGHT.labels(service, self.method).inc()

    async def authorize(self, request: Any = None) -> None:
        """Who is calling and whether they may; `request` when the call has one message (a
        streamed request's repositories are checked by its handler)."""
        self.principal = await self.authorizer.principal(self.context)
        self.rule = self.authorizer.rule(self.full_method)
        self.authorizer.check_method(self.principal, self.full_method, self.rule)
        if request is not None:
            await self.authorizer.check_request(
                self.principal, self.full_method, self.rule, request
            )

    async def fail(self, exc: BaseException) -> None:
        """Map an exception to a status; `context.abort` raises, ending the call."""
        if isinstance(exc, BerthError):
            message = str(exc)
            await self.context.abort(
                exc.code,
                message,
                trailing_metadata=exc.details.trailing_metadata(exc.code, message),
            )
        log.error(
            "unhandled error in %s",
            self.full_method,
            exc_info=exc,
            extra={"request_id": self.request_id},
        )
        if isinstance(exc, DEPENDENCY_ERRORS):
            # A call to etcd or another service that no mapping caught: still the dependency's
            # failure, said in one clean line (the log above has the library's text).
            await self.fail(
                Unavailable(
                    f"the {self.service} could not complete {self.method}: a service it "
                    f"depends on failed ({_dependency_code(exc)}); retry later",
                    reason="DEPENDENCY_UNAVAILABLE",
                )
            )
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    def finish(self) -> None:
        code = self.context.code()
        if self.cancelled:
            name = "CANCELLED"
        else:
            name = code.name if isinstance(code, grpc.StatusCode) else _code_name(code)
        elapsed = time.perf_counter() - self.start
        RPC_IN_FLIGHT.labels(self.service, self.method).dec()
        RPC_REQUESTS.labels(self.service, self.method, name).inc()
        RPC_LATENCY.labels(self.service, self.method).observe(elapsed)
        log.info(
            "rpc",
            extra={
                "method": self.full_method,
                "code": name,
                "duration_ms": round(elapsed * 1000, 2),
                "request_id": self.request_id,
                "peer": self.peer,
                "identity": self.principal.name,
                **({"details": self.context.details()} if name not in ("OK", "CANCELLED") else {}),
            },
        )
        if self.rule is not None and self.rule.mutates:
            audit.info(
                "mutation",
                extra={
                    "method": self.full_method,
                    "principal": self.principal.name,
                    "via": self.principal.via,
                    "code": name,
                    "request_id": self.request_id,
                    "peer": self.peer,
                },
            )


# What a call to etcd or to another berth service raises when it fails: grpc's errors and
# aetcd's wrappers of them. berthd.common.store and berthd.common.rpc map them to domain errors.
DEPENDENCY_ERRORS = (grpc.RpcError, etcd_errors.ClientError)


def _dependency_code(exc: BaseException) -> str:
    for err in (exc, exc.__cause__):
        code = getattr(err, "code", None)
        if isinstance(err, grpc.RpcError) and callable(code):
            status = code()
            if isinstance(status, grpc.StatusCode):
                return status.name
    return type(exc).__name__


def _code_name(code: object) -> str:
    if code is None:
        return "OK"
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return str(code)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return uuid.uuid4().hex[:16]


def _wrap_unary_response(
    service: str,
    method: str,
    behavior: Callable[..., Awaitable[Any]],
    authorizer: Authorizer,
    unary_request: bool,
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(service, method, context, authorizer)
        principal = None
        try:
            await call.authorize(request if unary_request else None)
            principal = set_current_principal(call.principal)
            return await behavior(request, context)
        except asyncio.CancelledError:
            call.cancelled = True  # the client hung up or the deadline passed
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(exc)
        finally:
            if principal is not None:
                reset_current_principal(principal)
            call.finish()

    return handler


def _wrap_stream_response(
    service: str,
    method: str,
    behavior: Callable[..., AsyncIterator[Any]],
    authorizer: Authorizer,
    unary_request: bool,
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(service, method, context, authorizer)
        try:
            await call.authorize(request if unary_request else None)
            # Set in this generator's own context: what the handler's generator sees.
            set_current_principal(call.principal)
            async for response in behavior(request, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            call.cancelled = True
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(exc)
        finally:
            call.finish()

    return handler


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler; `service` labels the metrics of this process."""

    def __init__(self, service: str, authorizer: Authorizer) -> None:
        self._service = service
        self._authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        auth = self._authorizer
        if handler.unary_unary:
            wrapped = _wrap_unary_response(self._service, method, handler.unary_unary, auth, True)
            return grpc.unary_unary_rpc_method_handler(wrapped, **codec)
        if handler.stream_unary:
            wrapped = _wrap_unary_response(self._service, method, handler.stream_unary, auth, False)
            return grpc.stream_unary_rpc_method_handler(wrapped, **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(method, handler.unary_stream, True), **codec
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_streaming(method, handler.stream_stream, False), **codec
        )

    def _wrap_streaming(
        self, method: str, behavior: Callable[..., Any], unary_request: bool
    ) -> Callable[..., Any]:
        # Streaming handlers are either async generators or coroutines that call
        # context.write (grpc's own health service does the latter).
        if inspect.isasyncgenfunction(behavior):
            return _wrap_stream_response(
                self._service, method, behavior, self._authorizer, unary_request
            )
        return _wrap_unary_response(
            self._service, method, behavior, self._authorizer, unary_request
        )
