"""Structured error details: packed by the server, relayed by another service, read by a
client; the wire form is a standard google.rpc.Status any gRPC library decodes."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import AioRpcError, Metadata

from berth.error_details import DETAILS_KEY, DOMAIN, ErrorDetails, Violation, from_trailers
from berth.errors import from_rpc_error
from berthd.common.errors import FailedPrecondition, NotFound, error_for_code
from berthd.common.rpc.calls import domain_error
from berthd.common.rpc.node import NodeApi


def _trailer(error: NotFound | FailedPrecondition) -> tuple[tuple[str, bytes], ...]:
    return error.details.trailing_metadata(error.code, str(error))


def test_a_domain_error_becomes_a_standard_status() -> None:
    error = FailedPrecondition(
        "no node can take the container",
        reason="NO_SUITABLE_NODE",
        metadata={"nodes": 2},
        violations=[Violation("NODE_UNSUITABLE", "node/n1", "cordoned")],
    )
    ((key, raw),) = _trailer(error)
    assert key == DETAILS_KEY
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert status.message == "no node can take the container"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "NO_SUITABLE_NODE",
        DOMAIN,
        {"nodes": "2"},
    )
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[1].Unpack(failure)
    assert [(v.type, v.subject, v.description) for v in failure.violations] == [
        ("NODE_UNSUITABLE", "node/n1", "cordoned")
    ]


def test_reason_defaults_to_the_code_and_resource_and_field_are_kept() -> None:
    assert NotFound("gone").reason == "NOT_FOUND"
    error = NotFound("no such blob", reason="BLOB_UNKNOWN", resource=("blob", "sha256:ab"))
    details = from_trailers(_trailer(error))
    assert details.reason == "BLOB_UNKNOWN"
    assert (details.resource_type, details.resource_name) == ("blob", "sha256:ab")
    bad = error_for_code("INVALID_ARGUMENT", "bad token")
    assert bad.reason == "INVALID_ARGUMENT"
    field = FailedPrecondition("x", field="page_token").details
    assert field.field_violations == (("page_token", "x"),)


def test_a_relayed_error_keeps_the_peers_details() -> None:
    original = NotFound("blob unknown", reason="BLOB_UNKNOWN", metadata={"digest": "sha256:ab"})
    err = AioRpcError(
        grpc.StatusCode.NOT_FOUND, Metadata(), Metadata(*_trailer(original)), "blob unknown"
    )
    relayed = domain_error(err, "registry", "127.0.0.1:9", prefix=True)
    assert isinstance(relayed, NotFound)
    assert str(relayed) == "registry: blob unknown"
    assert relayed.reason == "BLOB_UNKNOWN"
    assert relayed.details.metadata == {"digest": "sha256:ab"}
    # The node client's prefix keeps them too.
    node = NodeApi("127.0.0.1:9", node_id="n1").error(err, "127.0.0.1:9")
    assert node.reason == "BLOB_UNKNOWN" and str(node).startswith("node n1: ")


def test_a_client_error_exposes_reason_and_metadata() -> None:
    original = FailedPrecondition(
        "upload is at 10", reason="UPLOAD_OFFSET_MISMATCH", metadata={"offset": 10}
    )
    err = AioRpcError(
        grpc.StatusCode.FAILED_PRECONDITION,
        Metadata(),
        Metadata(*_trailer(original)),
        "upload is at 10",
    )
    client = from_rpc_error(err, address="127.0.0.1:9")
    assert client.code == "FAILED_PRECONDITION"
    assert client.reason == "UPLOAD_OFFSET_MISMATCH"
    assert client.metadata == {"offset": "10"}


def test_errors_without_details_read_as_empty() -> None:
    assert from_trailers(None) == ErrorDetails()
    assert from_trailers([(DETAILS_KEY, b"\xff\xff not a status")]) == ErrorDetails()
    err = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), "socket closed")
    assert from_rpc_error(err, address="x").reason == ""
