"""The one mapping from domain errors (`esper.errors`) to gRPC status codes.

`rpc_status_for(exc)` builds a `grpc.Status` whose trailing metadata carries a `google.rpc.Status`
with a `google.rpc.ErrorInfo` detail (reason, domain ``esper.v1``, metadata such as the offending
``field``), as AIP-193 describes. `error_info_from(rpc_error)` reads it back on the client.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from esper import errors

# Ordered most specific first is not needed: lookup walks the exception's MRO.
STATUS_CODE_BY_ERROR: dict[type[errors.EsperError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DataLossError: grpc.StatusCode.DATA_LOSS,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.AbortedError: grpc.StatusCode.ABORTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.OperationCancelledError: grpc.StatusCode.CANCELLED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.EsperError: grpc.StatusCode.INTERNAL,
}

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# A status travels in HTTP/2 trailers, which clients cap at 8 KiB by default; the message goes
# there twice (grpc-message, percent-encoded, and inside grpc-status-details-bin, base64). These
# bounds keep the worst case (non-ASCII text) under that cap, whatever a handler put in the error.
MAX_STATUS_MESSAGE_CHARS = 1024
MAX_METADATA_VALUE_CHARS = 200
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_ENTRIES = 8


def fit_utf8(text: str, limit: int) -> str:
    """`text` cut so its UTF-8 encoding holds at most `limit` bytes, noting the original length."""
    data = text.encode()
    if len(data) <= limit:
        return text
    note = f"... ({len(text)} chars)"
    return data[:max(0, limit - len(note))].decode(errors="ignore") + note


def status_code_for(exc: errors.EsperError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (nearest mapped base class)."""
    for cls in type(exc).__mro__:
        code = STATUS_CODE_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def make_rpc_status(code: grpc.StatusCode, message: str, *, reason: str,
                    metadata: dict[str, str] | None = None) -> grpc.Status:
    """A `grpc.Status` with a `google.rpc.ErrorInfo` detail, ready for `context.abort`.

    Message and metadata are cut to the bounds above, so a value quoted whole never turns the
    error into RESOURCE_EXHAUSTED on the client.
    """
    message = fit_utf8(message, MAX_STATUS_MESSAGE_CHARS)
    bounded_metadata = {fit_utf8(k, MAX_METADATA_KEY_CHARS): fit_utf8(v, MAX_METADATA_VALUE_CHARS)
                        for k, v in list((metadata or {}).items())[:MAX_METADATA_ENTRIES]}
    info = error_details_pb2.ErrorInfo(reason=fit_utf8(reason, MAX_METADATA_KEY_CHARS), domain=errors.ERROR_DOMAIN,
                                       metadata=bounded_metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(proto)


def rpc_status_for(exc: errors.EsperError) -> grpc.Status:
    """The status (code, message, ErrorInfo) a server returns for a domain error."""
    return make_rpc_status(status_code_for(exc), exc.message, reason=exc.reason, metadata=exc.metadata)


def _trailing_items(rpc_error: grpc.RpcError) -> list[tuple[str, object]]:
    trailing = rpc_error.trailing_metadata() if hasattr(rpc_error, "trailing_metadata") else None
    if trailing is None:
        return []
    # Sync errors give a tuple of _Metadatum; aio errors give grpc.aio.Metadata (iterates pairs).
    return [(item[0], item[1]) for item in trailing]


def error_info_from(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The `ErrorInfo` a server attached to a failed call, or None when there is none."""
    for key, value in _trailing_items(rpc_error):
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info
    return None


# The one set of codes that mean "the server did not answer" (it is down, unreachable or too
# slow), as opposed to an answer such as NOT_FOUND; clients turn them into UnavailableError.
DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED})


def is_down(rpc_error: BaseException) -> bool:
    """Whether a failed call means the server did not answer (see `DOWN_CODES`)."""
    return isinstance(rpc_error, grpc.RpcError) and hasattr(rpc_error, "code") and rpc_error.code() in DOWN_CODES


def domain_error_from_rpc_error(rpc_error: grpc.RpcError, *, upstream: str) -> errors.EsperError:
    """Turn a failed call to another Esper server back into a domain error, keeping its message,
    reason and field, so a server relaying it answers with the same status. Transport failures
    (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) become UnavailableError naming `upstream`."""
    code = rpc_error.code() if hasattr(rpc_error, "code") else grpc.StatusCode.UNKNOWN
    details = (rpc_error.details() if hasattr(rpc_error, "details") else None) or str(rpc_error)
    info = error_info_from(rpc_error)
    metadata = dict(info.metadata) if info is not None else {}
    reason = info.reason if info is not None else None
    if code in DOWN_CODES:
        return errors.UnavailableError(f"{upstream} did not answer ({code.name}): {details}",
                                       reason="UPSTREAM_UNAVAILABLE", metadata={"upstream": upstream})
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgumentError(details, field=metadata.pop("field", None), reason=reason,
                                           metadata=metadata)
    for cls, mapped in STATUS_CODE_BY_ERROR.items():
        if mapped == code and cls is not errors.EsperError:
            return cls(details, reason=reason, metadata=metadata)
    return errors.EsperError(f"{upstream} failed ({code.name}): {details}", reason=reason or "UPSTREAM_ERROR",
                             metadata=metadata)
