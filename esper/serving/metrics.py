"""Prometheus metrics of a gRPC server: RPC counts, latency and in-flight calls, plus gauges that
each service samples from its own state when /metrics is scraped.

Off by default; `ServerConfig.metrics_port` (`--metrics-port`) turns it on. Then `GrpcServer`
installs `MetricsInterceptor` as its outermost interceptor (so it sees the final status code of
every call, UNAUTHENTICATED and mapped domain errors included) and serves `/metrics` over HTTP on
that port from a daemon thread. Series (labels `grpc_service`, `grpc_method`, `grpc_code`):

    esper_grpc_server_handled_total            counter    calls completed, by status code
    esper_grpc_server_handling_seconds         histogram  latency (to the last message of a stream)
    esper_grpc_server_in_flight                gauge      calls in progress (no grpc_code)

A service adds its own gauges with `ServerMetrics.add_sampler(async_fn)`: the coroutine runs on
the server's event loop at scrape time (the state it reads belongs to that loop, so no locks), and
returns `prometheus_client` metric families.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric

log = logging.getLogger("esper.serving")

# From a loopback health check (~100 us) to a long compile wait or a stream of minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
# A scrape waits at most this long for the service's samplers (a busy loop must not hang it).
SAMPLE_TIMEOUT_S = 5.0

Sampler = Callable[[], Awaitable[Iterable[Metric]]]


class MetricsEndpoint:
    """`/metrics` of one registry over HTTP, served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stops serving and releases the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class ServerMetrics:
    """The metrics of one server process, in their own registry (several servers may share a
    process in tests, and the default registry would mix them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A given registry lets a process that already serves /metrics (esper-train) add a server's
        # series to its own endpoint instead of opening a second one.
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("grpc_service", "grpc_method", "grpc_code")
        self.handled = Counter("esper_grpc_server_handled", "RPCs completed, by method and status code", labels,
                               registry=self.registry)
        self.latency = Histogram("esper_grpc_server_handling_seconds", "RPC latency by method and status code, "
                                 "to the last response message", labels, buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.in_flight = Gauge("esper_grpc_server_in_flight", "RPCs in progress, by method", labels[:2],
                               registry=self.registry)
        self._samplers: list[Sampler] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registry.register(_SampledCollector(self))
        self.endpoint: MetricsEndpoint | None = None

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def add_sampler(self, sampler: Sampler) -> None:
        """Adds `async sampler() -> metric families`, run on the server's loop at each scrape."""
        self._samplers.append(sampler)

    def start(self, host: str, port: int) -> MetricsEndpoint:
        """Serves /metrics on host:port (0 picks a free port); call from the server's event loop."""
        self._loop = asyncio.get_running_loop()
        self.endpoint = MetricsEndpoint(self.registry, host, port)
        return self.endpoint

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    async def _sample(self) -> list[Metric]:
        out: list[Metric] = []
        for sampler in self._samplers:
            try:
                out.extend(await sampler())
            except Exception:  # one failing sampler must not take the RPC metrics down with it
                log.exception("metrics sampler %r failed", sampler)
        return out

    def sample_from_thread(self) -> list[Metric]:
        """The samplers' metrics, computed on the server loop (called by the HTTP thread)."""
        loop = self._loop
        if not self._samplers or loop is None or loop.is_closed():
            return []
        future = asyncio.run_coroutine_threadsafe(self._sample(), loop)
        try:
            return future.result(timeout=SAMPLE_TIMEOUT_S)
        except Exception as exc:  # timeout or a closing loop: serve the RPC metrics alone
            future.cancel()
            log.warning("service gauges skipped in this scrape: %s", type(exc).__name__)
            return []


class _SampledCollector:
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are only known at scrape time; skips the collect() at registration

    def collect(self) -> Iterable[Metric]:
        return self._metrics.sample_from_thread()


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").partition("/")
    return service, method


def _code_name(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        return default.name
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:
        return grpc.StatusCode[str(code)].name if isinstance(code, str) else _BY_VALUE[int(code)].name
    except (KeyError, ValueError):
        return default.name


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call, times it and tracks it in flight (see the module docstring)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, service, method), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, service, method), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, service, method), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, service, method), **kwargs)

    def _begin(self, service: str, method: str) -> float:
        self._m.in_flight.labels(service, method).inc()
        return time.perf_counter()

    def _end(self, service: str, method: str, start: float, code: str) -> None:
        self._m.in_flight.labels(service, method).dec()
        self._m.handled.labels(service, method, code).inc()
        self._m.latency.labels(service, method, code).observe(time.perf_counter() - start)

    def _unary(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = self._begin(service, method)
            code = grpc.StatusCode.UNKNOWN.name
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = _code_name(context, grpc.StatusCode.OK)
                return result
            except BaseException as exc:
                code = _failure_code(exc, context)
                raise
            finally:
                self._end(service, method, start, code)

        return wrapped

    def _stream(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = self._begin(service, method)
            code = grpc.StatusCode.UNKNOWN.name
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result  # the handler writes with context.write()
                else:
                    for item in result:
                        yield item
                code = _code_name(context, grpc.StatusCode.OK)
            except BaseException as exc:
                code = _failure_code(exc, context)
                raise
            finally:
                self._end(service, method, start, code)

        return wrapped


def _failure_code(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        return _code_name(context, grpc.StatusCode.UNKNOWN)
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name  # what grpc reports for an exception no interceptor mapped
