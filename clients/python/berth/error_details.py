"""Structured error details: what a berth error says beyond its code and message.

Every error a berth service raises carries a `google.rpc.Status` in the standard
`grpc-status-details-bin` trailer, with an `ErrorInfo` (a stable `reason` such as
`BLOB_UNKNOWN` and string metadata such as the digest) and, where they fit, a `ResourceInfo`
(which thing), a `BadRequest` (which field) and a `PreconditionFailure` (each violation, for
example each node the scheduler refused). Both sides use this module: the server packs an
`ErrorDetails` into the trailer, a client (or a service relaying another's error) unpacks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# grpc and the google.rpc messages are imported where used: the CLI imports this module at
# start-up (berth.errors) and needs them only when a call fails.
if TYPE_CHECKING:
    import grpc
    from google.protobuf import any_pb2
    from google.rpc import status_pb2

# ErrorInfo.domain of every berth error: reasons are unique within it.
DOMAIN = "berth.dev"
DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class Violation:
    """One precondition that failed: `type` is a stable kind ("NODE_UNSUITABLE"), `subject`
    what it is about ("node/n2"), `description` why, for a person."""

    type: str
    subject: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """The structured part of an error. `reason` is stable and UPPER_SNAKE_CASE; `metadata`
    holds its machine-readable facts (an upload's `offset`, a blob's `digest`)."""

    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    resource_type: str = ""
    resource_name: str = ""
    field_violations: tuple[tuple[str, str], ...] = ()
    violations: tuple[Violation, ...] = ()

    def to_status(self, code: grpc.StatusCode, message: str) -> status_pb2.Status:
        from google.rpc import error_details_pb2, status_pb2

        details: list[any_pb2.Any] = []
        if self.reason:
            details.append(
                _packed(
                    error_details_pb2.ErrorInfo(
                        reason=self.reason, domain=DOMAIN, metadata=self.metadata
                    )
                )
            )
        if self.resource_type or self.resource_name:
            details.append(
                _packed(
                    error_details_pb2.ResourceInfo(
                        resource_type=self.resource_type,
                        resource_name=self.resource_name,
                        description=message,
                    )
                )
            )
        if self.field_violations:
            details.append(
                _packed(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=name, description=text
                            )
                            for name, text in self.field_violations
                        ]
                    )
                )
            )
        if self.violations:
            details.append(
                _packed(
                    error_details_pb2.PreconditionFailure(
                        violations=[
                            error_details_pb2.PreconditionFailure.Violation(
                                type=v.type, subject=v.subject, description=v.description
                            )
                            for v in self.violations
                        ]
                    )
                )
            )
        return status_pb2.Status(code=code.value[0], message=message, details=details)

    def trailing_metadata(self, code: grpc.StatusCode, message: str) -> tuple[tuple[str, bytes]]:
        """The trailer that carries these details with a status (`context.abort(...,
        trailing_metadata=...)`)."""
        return ((DETAILS_KEY, self.to_status(code, message).SerializeToString()),)


def _packed(message: object) -> any_pb2.Any:
    from google.protobuf import any_pb2

    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def from_status(status: status_pb2.Status) -> ErrorDetails:
    """Read the details berth understands out of a `google.rpc.Status`; others are skipped."""
    from google.rpc import error_details_pb2

    reason = ""
    metadata: dict[str, str] = {}
    resource = ("", "")
    fields: list[tuple[str, str]] = []
    violations: list[Violation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            res = error_details_pb2.ResourceInfo()
            detail.Unpack(res)
            resource = (res.resource_type, res.resource_name)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            violations.extend(
                Violation(v.type, v.subject, v.description) for v in failure.violations
            )
    return ErrorDetails(reason, metadata, *resource, tuple(fields), tuple(violations))


def from_trailers(trailers: Sequence[tuple[str, str | bytes]] | None) -> ErrorDetails:
    """The details in a failed call's trailing metadata; empty when it carries none (an error
    from gRPC itself, or from a server that is not berth's)."""
    for key, value in trailers or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            from google.rpc import status_pb2

            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a peer's malformed trailer must not hide its error
                return ErrorDetails()
            return from_status(status)
    return ErrorDetails()


def from_rpc_error(err: grpc.RpcError) -> ErrorDetails:
    """The details of a failed call, sync or async."""
    trailing = getattr(err, "trailing_metadata", None)
    return from_trailers(trailing() if callable(trailing) else None)
