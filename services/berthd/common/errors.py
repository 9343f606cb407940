"""Domain errors raised by core modules; the server maps each to one gRPC status code.

Core code never imports grpc: it raises these, and `berthd.common.server` turns them into
statuses in one interceptor, so servicers stay free of try/except blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from berth.error_details import ErrorDetails, Violation
from berth.errors import InvalidArgumentError


class BerthError(Exception):
    """Base of every error a user can act on. `code` is the gRPC status it maps to; `details`
    travel with it as `google.rpc` error details (docs/api.md lists the reasons).

    A raise site names a stable `reason` (default: the code's name) and the facts a program
    needs as `metadata`; `resource` is (type, name) of the thing concerned, `field` the request
    field at fault, `violations` each precondition that failed.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str = "",
        *,
        reason: str = "",
        metadata: dict[str, object] | None = None,
        resource: tuple[str, str] | None = None,
        field: str = "",
        violations: tuple[Violation, ...] | list[Violation] = (),
        details: ErrorDetails | None = None,
    ) -> None:
        super().__init__(message)
        if details is None:
            details = ErrorDetails(
                reason=reason or self.code.name,
                metadata={k: str(v) for k, v in (metadata or {}).items()},
                resource_type=resource[0] if resource else "",
                resource_name=resource[1] if resource else "",
                field_violations=((field, message),) if field else (),
                violations=tuple(violations),
            )
        self.details = details

    @property
    def reason(self) -> str:
        return self.details.reason


class InvalidArgument(BerthError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BerthError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BerthError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(BerthError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DataLoss(BerthError):
    """Content does not match its digest."""

    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(BerthError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(BerthError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(BerthError):
    """A concurrent write won a race; the caller may retry."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(BerthError):
    """An external registry wants credentials, or refused the ones given."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BerthError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(BerthError):
    """Another service did not answer within the call's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[str, type[BerthError]] = {
    cls.code.name: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        DataLoss,
        ResourceExhausted,
        Unavailable,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
    )
}


@contextmanager
def invalid_argument() -> Iterator[None]:
    """Re-raise the client package's own checks (`berth.reference`, `berth.containers`: the
    rules written once for client and server) as InvalidArgument, message unchanged."""
    try:
        yield
    except InvalidArgumentError as exc:
        raise InvalidArgument(exc.message) from None


def error_for_code(code: str, message: str, details: ErrorDetails | None = None) -> BerthError:
    """The domain error for a status code name ("NOT_FOUND"), as another berth service answered,
    with that service's error details when it sent some (relayed unchanged). A code with no
    domain class (CANCELLED, INTERNAL, ...) is kept on a plain BerthError, so relaying the answer
    keeps its code; an unknown name is UNKNOWN."""
    if details is not None and not details.reason:
        details = None
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message, details=details)
    error = BerthError(message, details=details)
    status = getattr(grpc.StatusCode, code, None)
    if isinstance(status, grpc.StatusCode) and status != grpc.StatusCode.OK:
        error.code = status
    return error
