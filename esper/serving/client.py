"""Client helpers: channels with auth/TLS, calls that always carry a deadline, retries with
backoff only for idempotent calls, and waiting for a server's health to report SERVING.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esper.serving.server import DEFAULT_MAX_MESSAGE_BYTES

T = TypeVar("T")

# Codes worth retrying for an idempotent call: the server was unreachable or shedding load.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.ABORTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by the call's deadline."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retryable_codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def backoff(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ChannelConfig:
    """Where and how to connect. `tls_root_cert` enables TLS; `auth_token` adds a bearer header."""

    address: str
    tls_root_cert: Path | bytes | None = None
    tls_server_name: str | None = None
    auth_token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def _channel_options(config: ChannelConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Our own retry loop decides what is retried; the core's transparent retries stay on.
        ("grpc.enable_retries", 1),
    ]
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return options


def _root_cert_bytes(cert: Path | bytes) -> bytes:
    return cert if isinstance(cert, bytes) else Path(cert).read_bytes()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a call needs for bearer-token auth (empty without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _with_auth(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# grpc.aio files each interceptor under one call kind only, so there is one class per kind.
class _AioAuthUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]):
        self._header = header

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_auth(client_call_details, self._header), request)


class _AioAuthUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]):
        self._header = header

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_auth(client_call_details, self._header), request)


class _AioAuthStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]):
        self._header = header

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_auth(client_call_details, self._header), request_iterator)


class _AioAuthStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]):
        self._header = header

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_auth(client_call_details, self._header), request_iterator)


def _aio_auth_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    header = ("authorization", f"Bearer {token}")
    return [_AioAuthUnaryUnary(header), _AioAuthUnaryStream(header), _AioAuthStreamUnary(header),
            _AioAuthStreamStream(header)]


def open_aio_channel(config: ChannelConfig | str) -> grpc.aio.Channel:
    """A grpc.aio channel; TLS when a root certificate is given; bearer token on every call."""
    if isinstance(config, str):
        config = ChannelConfig(config)
    interceptors = _aio_auth_interceptors(config.auth_token) if config.auth_token else None
    options = _channel_options(config)
    if config.tls_root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=_root_cert_bytes(config.tls_root_cert))
        return grpc.aio.secure_channel(config.address, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(config.address, options=options, interceptors=interceptors)


class _SyncAuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return _SyncCallDetails(details.method, details.timeout, metadata, details.credentials,
                                getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


@dataclass(frozen=True)
class _SyncCallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def open_sync_channel(config: ChannelConfig | str) -> grpc.Channel:
    """A blocking channel (for threads outside an event loop, e.g. the training process)."""
    if isinstance(config, str):
        config = ChannelConfig(config)
    options = _channel_options(config)
    if config.tls_root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=_root_cert_bytes(config.tls_root_cert))
        channel = grpc.secure_channel(config.address, creds, options=options)
    else:
        channel = grpc.insecure_channel(config.address, options=options)
    if config.auth_token:
        channel = grpc.intercept_channel(channel, _SyncAuthInterceptor(config.auth_token))
    return channel


def _check_timeout(timeout: float | None) -> float:
    if timeout is None or not timeout > 0:
        raise ValueError(f"every call needs a deadline: timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def _retry_plan(idempotent: bool, retry: RetryPolicy | None) -> RetryPolicy:
    if not idempotent:
        return NO_RETRY
    return retry or RetryPolicy()


def _fresh(request: Any) -> Any:
    # A list/tuple of messages is the request stream of a stream-unary call: each attempt sends it
    # again from the start (a generator could not be replayed, so it is never retried safely).
    return iter(request) if isinstance(request, (list, tuple)) else request


async def unary_call(method: Callable[..., Any], request: Any, *, timeout: float, idempotent: bool,
                     retry: RetryPolicy | None = None,
                     metadata: Iterable[tuple[str, str]] | None = None) -> Any:
    """Call a grpc.aio unary method, or a stream-unary one with a list of request messages.

    `timeout` (seconds) is the deadline of the whole call, retries included. Only an `idempotent`
    call is retried, on UNAVAILABLE/RESOURCE_EXHAUSTED/ABORTED, with jittered exponential backoff.
    """
    deadline = time.monotonic() + _check_timeout(timeout)
    plan = _retry_plan(idempotent, retry)
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            return await method(_fresh(request), timeout=max(remaining, 0.001), metadata=metadata)
        except grpc.aio.AioRpcError as err:
            pause = plan.backoff(attempt)
            if (attempt >= plan.max_attempts or err.code() not in plan.retryable_codes
                    or time.monotonic() + pause >= deadline):
                raise
            await asyncio.sleep(pause)


def unary_call_sync(method: Callable[..., Any], request: Any, *, timeout: float, idempotent: bool,
                    retry: RetryPolicy | None = None,
                    metadata: Iterable[tuple[str, str]] | None = None) -> Any:
    """Blocking twin of `unary_call` for sync stubs."""
    deadline = time.monotonic() + _check_timeout(timeout)
    plan = _retry_plan(idempotent, retry)
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            return method(_fresh(request), timeout=max(remaining, 0.001), metadata=metadata)
        except grpc.RpcError as err:
            pause = plan.backoff(attempt)
            if (attempt >= plan.max_attempts or err.code() not in plan.retryable_codes
                    or time.monotonic() + pause >= deadline):
                raise
            time.sleep(pause)


def stream_call(method: Callable[..., Any], request: Any, *, timeout: float,
                metadata: Iterable[tuple[str, str]] | None = None) -> Any:
    """Start a streaming call with a mandatory deadline (streams are never retried: a partly
    consumed stream cannot be replayed safely). Works for aio and sync stubs alike."""
    return method(request, timeout=_check_timeout(timeout), metadata=metadata)


async def wait_for_serving(channel: grpc.aio.Channel, *, timeout: float, service: str = "",
                           poll_s: float = 0.05) -> None:
    """Poll the standard health service until `service` reports SERVING; TimeoutError otherwise."""
    deadline = time.monotonic() + _check_timeout(timeout)
    stub = health_pb2_grpc.HealthStub(channel)
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                     timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as err:
            last = f"{err.code().name}: {err.details()}"
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"service {service!r} not SERVING within {timeout} s (last: {last})")


def wait_for_serving_sync(channel: grpc.Channel, *, timeout: float, service: str = "",
                          poll_s: float = 0.05) -> None:
    """Blocking twin of `wait_for_serving`."""
    deadline = time.monotonic() + _check_timeout(timeout)
    stub = health_pb2_grpc.HealthStub(channel)
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                               timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        time.sleep(poll_s)
    raise TimeoutError(f"service {service!r} not SERVING within {timeout} s (last: {last})")
