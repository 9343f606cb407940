"""The one exception the berth client raises, and its translation from gRPC errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

# Not imported here at run time: every CLI command imports this module, and one that calls no
# server (--help, a usage mistake) must not pay for grpc, protobuf or even dataclasses. Status
# codes are compared by name; berth.error_details is imported when details are asked for.
if TYPE_CHECKING:
    import grpc

    from berth.error_details import ErrorDetails


class BerthClientError(Exception):
    """A failure a person can act on.

    `code` is a grpc.StatusCode name such as "NOT_FOUND" (also for errors found on the client
    side, e.g. "INVALID_ARGUMENT" for a bad reference); `message` is always a single line.
    `details` is what the server said beyond that (`reason`, `metadata`, the resource, the
    fields and preconditions at fault); empty for an error found on the client side.
    """

    def __init__(
        self, message: str, code: str = "UNKNOWN", details: ErrorDetails | None = None
    ) -> None:
        self.message = one_line(message) or code.replace("_", " ").lower()
        self.code = code
        self._details = details
        super().__init__(self.message)

    @property
    def details(self) -> ErrorDetails:
        if self._details is None:
            from berth.error_details import ErrorDetails

            self._details = ErrorDetails()
        return self._details

    @property
    def reason(self) -> str:
        """The server's stable reason ("BLOB_UNKNOWN"), or "" when it gave none."""
        return self.details.reason

    @property
    def metadata(self) -> dict[str, str]:
        """The facts the reason comes with (an upload's `offset`, a blob's `digest`)."""
        return self.details.metadata


class InvalidArgumentError(BerthClientError):
    """A value the client package's own checks refuse before any call (a malformed image
    reference, a bad container config): code INVALID_ARGUMENT.

    The client package writes these rules once for client and server; berthd re-raises the
    message, unchanged, as its own InvalidArgument. Values are shown JSON-quoted, so the message
    is one line already: it is kept exact (one_line would collapse a run of spaces inside a
    quoted value).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "INVALID_ARGUMENT")
        self.message = message
        self.args = (message,)


def one_line(text: str) -> str:
    """Collapse whitespace so a message never spans several lines of a terminal."""
    return " ".join(text.split())


# What gRPC itself says when it never reached the server; any other UNAVAILABLE is the server's
# own answer (e.g. the cluster relaying that a node did not report), to be shown as it is.
_TRANSPORT_MARKERS = (
    "failed to connect",
    "errors resolving",
    "dns resolution failed",
    "socket closed",
    "connection reset",
    "connections to all backends failing",
)


def is_transport_failure(details: str) -> bool:
    lowered = details.lower()
    return not details or any(marker in lowered for marker in _TRANSPORT_MARKERS)


def from_rpc_error(
    err: grpc.RpcError, *, address: str, service: str = "registry", option: str = ""
) -> BerthClientError:
    """Convert a failed gRPC call into a BerthClientError with a message a person can act on.

    `option` is how a person points the CLI elsewhere; by default --SERVICE or BERTH_SERVICE."""
    # Sync calls' errors are grpc.Call, asyncio ones AioRpcError: both have code() and details().
    is_call = callable(getattr(err, "code", None)) and callable(getattr(err, "details", None))
    status = err.code() if is_call else None
    details = one_line((err.details() if is_call else str(err)) or "")
    code = status.name if status is not None else "UNKNOWN"
    from berth.error_details import from_rpc_error as details_of

    server_details = details_of(err)
    # An answer with a reason is the server's own (it reached etcd's failure, or a node's):
    # shown as it is, never read as this client failing to reach the server.
    answered = bool(server_details.reason)
    if answered:
        message = details or f"the {service} at {address} failed with {code}"
    elif code == "UNAVAILABLE" and "handshake failed" in details.lower():
        # "...: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:...:
        # OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
        cause = details.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK").strip()
        message = (
            f"TLS handshake with the {service} at {address} failed ({cause}); check that "
            "--tls-ca or BERTH_TLS_CA names that cluster's CA (docs/security.md)"
        )
    elif code == "UNAVAILABLE" and is_transport_failure(details):
        # gRPC's text ends with the root cause ("...: Connection refused"); the rest is noise.
        reason = details.rsplit(": ", 1)[-1].strip(" []") or "unavailable"
        default_option = f"--{service} or BERTH_{service.upper()}"
        message = (
            f"cannot reach the {service} at {address} ({reason}); start a local cluster with "
            f"`berthd up`, or point {option or default_option} at a running one"
        )
        if reason.lower() == "socket closed":
            # TLS 1.3: a server that refuses the client's certificate just closes the socket.
            message += (
                "; if it is running, it may have refused this client's certificate "
                "(BERTH_TLS_CERT, BERTH_TLS_KEY; docs/security.md)"
            )
    elif code == "DEADLINE_EXCEEDED":
        message = f"the {service} at {address} did not answer in time"
    else:
        message = details or f"the {service} at {address} failed with {code}"
    return BerthClientError(message, code, server_details)
