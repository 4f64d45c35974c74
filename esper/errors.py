"""Domain errors shared by every Esper subsystem.

Domain code (`esper.urza`, `esper.tezzeret`, `esper.oona`, ...) raises these and never imports
grpc. The server bootstrap (`esper.serving.errors`) holds the one mapping from these classes to
gRPC status codes and attaches a `google.rpc.ErrorInfo` (reason, domain, metadata) to the status.

Each error carries:
- a human message saying what was wrong and what was expected;
- `reason`: an UPPER_SNAKE_CASE constant identifying the error (AIP-193 `ErrorInfo.reason`);
- `metadata`: string key/values for machines, e.g. ``{"field": "blueprint.layers[2].op"}``.
"""

from __future__ import annotations

from collections.abc import Mapping

ERROR_DOMAIN = "esper.v1"
# How much of an offending value an error message quotes. Messages travel in gRPC trailers
# (at most 8 KiB by default): a whole 7,000-character value would turn the error into
# RESOURCE_EXHAUSTED on the client.
QUOTE_LIMIT = 80


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} chars)"
    return text[:max(0, limit - len(note))] + note


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to `limit` characters (see `bounded`)."""
    return bounded(repr(value), limit)


class EsperError(Exception):
    """Base class of all domain errors; the default status is INTERNAL."""

    default_reason = "ESPER_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, object] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(EsperError):
    """The request is malformed; `field` names the offending field (e.g. ``input_shape.dims``)."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None,
                 metadata: Mapping[str, object] | None = None):
        meta = dict(metadata or {})
        if field is not None:
            meta["field"] = field
        super().__init__(message, reason=reason, metadata=meta)
        self.field = field


class NotFoundError(EsperError):
    """The named resource does not exist."""

    default_reason = "NOT_FOUND"


class AlreadyExistsError(EsperError):
    """A resource with that identity already exists with different content."""

    default_reason = "ALREADY_EXISTS"


class FailedPreconditionError(EsperError):
    """The system is not in a state where the operation can run (e.g. job already finished)."""

    default_reason = "FAILED_PRECONDITION"


class DataLossError(EsperError):
    """Stored data is corrupted or lost (e.g. a blob whose bytes no longer match its SHA-256)."""

    default_reason = "DATA_LOSS"


class ResourceExhaustedError(EsperError):
    """A quota or bounded resource is exhausted (queue full, too many jobs)."""

    default_reason = "RESOURCE_EXHAUSTED"


class UnavailableError(EsperError):
    """A dependency is unavailable right now; the caller may retry an idempotent call."""

    default_reason = "UNAVAILABLE"


class AbortedError(EsperError):
    """The operation was aborted by a concurrency conflict; retrying may succeed."""

    default_reason = "ABORTED"


class DeadlineExceededError(EsperError):
    """The operation did not finish within its time limit."""

    default_reason = "DEADLINE_EXCEEDED"


class OperationCancelledError(EsperError):
    """The operation was cancelled (named so it does not shadow asyncio.CancelledError)."""

    default_reason = "CANCELLED"


class UnauthenticatedError(EsperError):
    """Missing or wrong credentials."""

    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(EsperError):
    """Authenticated but not allowed."""

    default_reason = "PERMISSION_DENIED"
