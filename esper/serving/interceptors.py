"""Server interceptors: domain errors -> status codes, and bearer-token authentication.

`ErrorMappingInterceptor` wraps every handler: an `esper.errors.EsperError` becomes its mapped
status with an `ErrorInfo` detail; any other exception is logged with a traceback and becomes
INTERNAL (with an error id to find it in the log); the server keeps serving either way.
A handler that aborts the call itself (`context.abort`) passes through untouched. Request bytes
that do not parse as the method's request message (on unary and streaming requests alike) become
INVALID_ARGUMENT with reason ``MALFORMED_REQUEST`` instead of the core's UNKNOWN.

`BearerTokenInterceptor` rejects calls whose ``authorization`` metadata is not
``Bearer <token>`` with UNAUTHENTICATED, except for exempt method prefixes (the health service,
so process supervisors can probe without a secret).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from esper import errors
from esper.serving.auth import DEPLOYMENT, Principal, set_current_principal
from esper.serving.errors import make_rpc_status, rpc_status_for

log = logging.getLogger("esper.serving")

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.EsperError):
        status = rpc_status_for(exc)
        log.info("%s -> %s: %s", method, status.code.name, exc.message)
    else:
        error_id = uuid.uuid4().hex[:12]
        log.error("uncaught error in %s (error id %s)", method, error_id, exc_info=exc)
        status = make_rpc_status(
            grpc.StatusCode.INTERNAL,
            f"internal error in {method}: {type(exc).__name__}: {exc} (error id {error_id}, see server log)",
            reason="INTERNAL", metadata={"error_id": error_id, "method": method})
    await context.abort(status.code, status.details, status.trailing_metadata)


class _Undecodable:
    """Stands in for a request whose bytes did not parse; the wrapped handler rejects it.

    The deserializer runs inside grpc's core, which turns any exception into UNKNOWN; returning
    this marker instead lets the interceptor answer with INVALID_ARGUMENT.
    """

    __slots__ = ("error", "size")

    def __init__(self, error: Exception, size: int):
        self.error = error
        self.size = size


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or a custom deserializer's own failure
            return _Undecodable(exc, len(data))

    return deserialize


def _malformed(request: _Undecodable, method: str, index: int | None = None) -> errors.InvalidArgumentError:
    which = "the request message" if index is None else f"request message #{index} of the stream"
    return errors.InvalidArgumentError(
        f"{method}: {which} ({request.size} bytes) could not be parsed as the method's request type: "
        f"{errors.bounded(str(request.error), 200)}", field="request", reason="MALFORMED_REQUEST",
        metadata={"method": method})


async def _checked_stream(requests: Any, method: str) -> Any:
    index = 0
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _malformed(request, method, index)
        index += 1
        yield request


def _checked_request(request_or_iterator: Any, method: str) -> Any:
    if isinstance(request_or_iterator, _Undecodable):
        raise _malformed(request_or_iterator, method)
    if hasattr(request_or_iterator, "__aiter__"):
        return _checked_stream(request_or_iterator, method)
    return request_or_iterator


def _passes_through(exc: BaseException) -> bool:
    # AbortError: the handler (or an inner interceptor) already set the status.
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError))


def _wrap_unary_response(behavior: Callable[..., Any], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(_checked_request(request_or_iterator, method), context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as exc:  # noqa: BLE001 - mapped to a status below
            if _passes_through(exc) or not isinstance(exc, Exception):
                raise
            await _abort_for(exc, context, method)

    return wrapped


def _wrap_stream_response(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(_checked_request(request_or_iterator, method), context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                # Handler writes with context.write() and returns None.
                await result
            else:
                for item in result:
                    yield item
        except BaseException as exc:  # noqa: BLE001 - mapped to a status below
            if _passes_through(exc) or not isinstance(exc, Exception):
                raise
            await _abort_for(exc, context, method)

    return wrapped


def _rebuild(handler: grpc.RpcMethodHandler, method: str,
             unary_wrap: Callable[..., Any], stream_wrap: Callable[..., Any]) -> grpc.RpcMethodHandler:
    kwargs = {"request_deserializer": _tolerant(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_wrap(handler.unary_unary, method), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_wrap(handler.unary_stream, method), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_wrap(handler.stream_unary, method), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_wrap(handler.stream_stream, method), **kwargs)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by handlers to status codes; never lets one reach the server core."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _rebuild(handler, handler_call_details.method, _wrap_unary_response, _wrap_stream_response)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` with a known token on every call except exempt
    method prefixes, and binds the token's `Principal` for the handler (`current_principal()`).

    `principals` maps token -> Principal; a plain string is the single deployment token (full access).
    """

    def __init__(self, principals: Mapping[str, Principal] | str,
                 exempt_prefixes: Iterable[str] = (HEALTH_METHOD_PREFIX,)):
        if isinstance(principals, str):
            principals = {principals: DEPLOYMENT}
        if not principals or not all(principals):
            raise ValueError("bearer tokens must be non-empty strings")
        self._principals = [(f"Bearer {token}".encode(), p) for token, p in principals.items()]
        self._exempt = tuple(exempt_prefixes)

    def _principal(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal | None:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                given = value if isinstance(value, bytes) else str(value).encode()
                found = None
                # Compare with every token (constant time each) so timing does not tell which matched.
                for expected, principal in self._principals:
                    if hmac.compare_digest(given, expected):
                        found = principal
                return found
        return None

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        principal = self._principal(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if principal is not None:
            return _rebuild(handler, method, _as_principal(principal, unary=True), _as_principal(principal, unary=False))

        def deny_unary(_behavior: Any, _method: str) -> Callable[..., Awaitable[Any]]:
            async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
                await _abort_unauthenticated(context, method)
            return deny

        def deny_stream(_behavior: Any, _method: str) -> Callable[..., Any]:
            async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
                await _abort_unauthenticated(context, method)
                yield  # pragma: no cover - makes this an async generator like the handler it replaces
            return deny

        return _rebuild(handler, method, deny_unary, deny_stream)


def _as_principal(principal: Principal, *, unary: bool) -> Callable[..., Any]:
    """Handler wrapper factory that runs the handler with `principal` bound."""
    def wrap(behavior: Callable[..., Any], _method: str) -> Callable[..., Any]:
        if unary:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                set_current_principal(principal)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            return call

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            set_current_principal(principal)
            async for item in behavior(request, context):
                yield item
        return stream
    return wrap


async def _abort_unauthenticated(context: grpc.aio.ServicerContext, method: str) -> None:
    status = make_rpc_status(
        grpc.StatusCode.UNAUTHENTICATED,
        f"{method} needs 'authorization: Bearer <token>' metadata with the server's token; "
        "it was missing or wrong",
        reason="UNAUTHENTICATED")
    await context.abort(status.code, status.details, status.trailing_metadata)
