"""What every typed client shares: its channel, deadlines, retry policy and error translation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from esper.serving.client import (
    ChannelConfig,
    RetryPolicy,
    open_aio_channel,
    open_sync_channel,
    stream_call,
    unary_call,
    unary_call_sync,
)
from esper.serving.errors import domain_error_from_rpc_error


def address_of(config: ChannelConfig | str) -> ChannelConfig:
    """A `ChannelConfig` for an address or config (a bare address: plaintext, no token)."""
    return ChannelConfig(config) if isinstance(config, str) else config


class AioClient:
    """Base of the asyncio clients: one channel, a default deadline, domain errors on failure.

    `retry` replaces the default retry policy of idempotent calls (e.g. `NO_RETRY` under a
    `ServiceLink`, which backs off itself).
    """

    service = "service"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, retry: RetryPolicy | None = None):
        self.config = address_of(config)
        self.address = self.config.address
        self._channel = open_aio_channel(self.config)
        self._timeout = timeout_s
        self._retry = retry

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _error(self, err: grpc.RpcError) -> Exception:
        return domain_error_from_rpc_error(err, upstream=f"{self.service} at {self.address}")

    async def _unary(self, method: Callable[..., Any], request: Any, *, idempotent: bool,
                     timeout: float | None = None) -> Any:
        try:
            return await unary_call(method, request, timeout=timeout or self._timeout, idempotent=idempotent,
                                    retry=self._retry)
        except grpc.RpcError as err:
            raise self._error(err) from err

    async def _stream(self, method: Callable[..., Any], request: Any, *, timeout: float) -> AsyncIterator[Any]:
        call = stream_call(method, request, timeout=timeout)
        try:
            async for reply in call:
                yield reply
        except grpc.RpcError as err:
            raise self._error(err) from err
        finally:
            call.cancel()


class SyncClient:
    """Base of the blocking clients (for threads outside an event loop)."""

    service = "service"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, retry: RetryPolicy | None = None):
        self.config = address_of(config)
        self.address = self.config.address
        self._channel = open_sync_channel(self.config)
        self._timeout = timeout_s
        self._retry = retry

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _error(self, err: grpc.RpcError) -> Exception:
        return domain_error_from_rpc_error(err, upstream=f"{self.service} at {self.address}")

    def _unary(self, method: Callable[..., Any], request: Any, *, idempotent: bool,
               timeout: float | None = None) -> Any:
        try:
            return unary_call_sync(method, request, timeout=timeout or self._timeout, idempotent=idempotent,
                                   retry=self._retry)
        except grpc.RpcError as err:
            raise self._error(err) from err

    def _stream(self, method: Callable[..., Any], request: Any, *, timeout: float) -> Iterator[Any]:
        call = stream_call(method, request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise self._error(err) from err
        finally:
            call.cancel()
