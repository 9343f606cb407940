"""One mapping for dependency failures: every Store call with etcd unreachable raises
Unavailable with reason ETCD_UNAVAILABLE and one clean line; a service's answer that carries a
reason is never mistaken for the caller failing to reach it; a grpc or aetcd error that slips
past every mapping still reaches the user as UNAVAILABLE without the library's text.

etcd here is a port nobody listens on: real grpc, no server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from aetcd import exceptions as etcd_errors
from grpc.aio import AioRpcError, Metadata
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from berth.error_details import from_rpc_error as details_of
from berth.errors import from_rpc_error
from berthd.common.errors import BerthError, Unavailable
from berthd.common.interceptor import ObservabilityInterceptor
from berthd.common.rpc.calls import domain_error, retryable
from berthd.common.security.authorize import Authorizer
from berthd.common.security.principal import Principal, from_certificate
from berthd.common.store import ETCD_UNAVAILABLE, Store, etcd_unavailable

REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: "
    "Failed to connect to remote host: Connection refused"
)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def assert_etcd_unavailable(exc: BaseException, endpoint: str, call: str = "") -> None:
    assert isinstance(exc, Unavailable), (call, repr(exc))
    assert exc.reason == ETCD_UNAVAILABLE
    message = str(exc)
    assert message.startswith(f"the cluster state store (etcd at {endpoint}) cannot be reached")
    for raw in ("AioRpcError", "<", "StatusCode", "debug_error_string", "\n", "ipv4:"):
        assert raw not in message, message


def test_etcd_errors_of_every_kind_read_as_one_clean_line() -> None:
    endpoint = "127.0.0.1:2379"
    refused = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), REFUSED)
    error = etcd_unavailable(endpoint, refused)
    assert_etcd_unavailable(error, endpoint)
    assert str(error) == (
        "the cluster state store (etcd at 127.0.0.1:2379) cannot be reached "
        "(connection refused); retry once it is back"
    )
    assert error.details.metadata == {"endpoint": endpoint}
    # aetcd's wrapper of the same error, and a call with no answer in time.
    try:
        raise etcd_errors.ConnectionFailedError(REFUSED) from refused
    except etcd_errors.ClientError as wrapped:
        assert str(etcd_unavailable(endpoint, wrapped)) == str(error)
    late = AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(), "Deadline")
    assert "(no answer in time)" in str(etcd_unavailable(endpoint, late))
    assert "(no answer in time)" in str(etcd_unavailable(endpoint, TimeoutError()))
    # etcd answering with an error of its own: it was reached, and it failed.
    full = AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, Metadata(), Metadata(), "mvcc: database space exceeded"
    )
    assert str(etcd_unavailable(endpoint, full)) == (
        "the cluster state store (etcd at 127.0.0.1:2379) failed "
        "(mvcc: database space exceeded); retry once it is back"
    )


async def _drain(watch: AsyncIterator[Any]) -> None:
    async for _ in watch:
        pass


async def test_every_store_call_with_etcd_unreachable_is_etcd_unavailable() -> None:
    endpoint = closed_port()
    store = Store(endpoint, "/unit/")
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("connect", store.connect),
        ("ping", store.ping),
        ("get", lambda: store.get("a")),
        ("list", lambda: store.list("a/")),
        ("range", lambda: store.range("a", "b")),
        ("snapshot", lambda: store.snapshot("a/")),
        ("count", lambda: store.count("a/")),
        ("put", lambda: store.put("a", b"1")),
        ("create", lambda: store.create("a", b"1")),
        ("delete", lambda: store.delete("a")),
        ("delete_prefix", lambda: store.delete_prefix("a/")),
        ("txn", lambda: store.txn([store.absent("a")], [store.op_put("a", b"1")])),
        ("grant_lease", lambda: store.grant_lease(5)),
        ("refresh_lease", lambda: store.refresh_lease(1)),
        ("revoke_lease", lambda: store.revoke_lease(1)),
        ("watch_prefix", lambda: _drain(store.watch_prefix("a/"))),
    ]
    try:
        for name, call in calls:
            with pytest.raises(BerthError) as caught:
                await call()
            assert_etcd_unavailable(caught.value, endpoint, name)
    finally:
        await store.close()


def test_an_answer_with_a_reason_is_the_servers_own_not_a_transport_failure() -> None:
    """The cluster relaying etcd's absence says so, whatever words grpc's text has: the CLI
    must not print "cannot reach the cluster" and an internal caller must not retry."""
    said = etcd_unavailable("127.0.0.1:2379", TimeoutError())
    message = f"{said} (socket closed)"  # words that read as a transport failure
    trailer = said.details.trailing_metadata(said.code, message)
    err = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(*trailer), message)
    client = from_rpc_error(err, address="127.0.0.1:9", service="cluster")
    assert (client.code, client.reason) == ("UNAVAILABLE", ETCD_UNAVAILABLE)
    assert client.message == message
    assert not retryable(err)
    relayed = domain_error(err, "cluster", "127.0.0.1:9")
    assert (str(relayed), relayed.reason) == (message, ETCD_UNAVAILABLE)
    # A true transport failure still reads as one.
    bare = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), REFUSED)
    assert retryable(bare)
    assert from_rpc_error(bare, address="127.0.0.1:9", service="cluster").message.startswith(
        "cannot reach the cluster at 127.0.0.1:9"
    )


class AsAdmin(Authorizer):
    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return from_certificate("user:admin")


class Leaking(HealthServicer):
    """A handler through which a dependency's raw error escapes every mapping."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def Check(self, request: Any, context: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), REFUSED),
        etcd_errors.ConnectionFailedError(REFUSED),
    ],
    ids=["grpc", "aetcd"],
)
async def test_a_dependency_error_that_slips_through_is_unavailable_and_clean(
    error: Exception,
) -> None:
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor("cluster", AsAdmin(None))])
    health_pb2_grpc.add_HealthServicer_to_server(Leaking(error), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop(None)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert details_of(err).reason == "DEPENDENCY_UNAVAILABLE"
    message = err.details() or ""
    assert message.startswith("the cluster could not complete Check: a service it depends on")
    for raw in ("AioRpcError", "<", "Connection refused", "internal error"):
        assert raw not in message, message
