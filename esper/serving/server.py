"""The shared grpc.aio server: health, reflection, interceptors, limits, TLS, graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from esper.serving.auth import DEPLOYMENT, Principal, load_principals
from esper.serving.interceptors import HEALTH_METHOD_PREFIX, BearerTokenInterceptor, ErrorMappingInterceptor
from esper.serving.metrics import ServerMetrics
from esper.serving.reflection import enable_reflection

log = logging.getLogger("esper.serving")

DEFAULT_HOST = "127.0.0.1"
# Streaming RPCs send chunks of at most 1 MiB, so 4 MiB leaves room for metadata messages.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_GRACE_SECONDS = 5.0
LISTENING_PREFIX = "LISTENING "

ShutdownCallback = Callable[[], Awaitable[None]]


@dataclass
class ServerConfig:
    """How a server binds and protects itself. Defaults: loopback, port 0, no TLS, no auth."""

    host: str = DEFAULT_HOST
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    auth_token: str | None = None
    # token -> Principal (name and roles), e.g. from --principals-file; any of them is accepted.
    principals: dict[str, Principal] = field(default_factory=dict)
    reflection: bool = True
    extra_options: list[tuple[str, Any]] = field(default_factory=list)
    # Prometheus /metrics over HTTP on `host` (esper.serving.metrics): None = off, 0 = a free port.
    metrics_port: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad setting."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {self.port}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file, or neither")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token must be non-empty when set")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 (0 picks a free port), got {self.metrics_port}")
        if any(not token.strip() for token in self.principals):
            raise ValueError("principals: every token must be a non-empty string")

    def token_principals(self) -> dict[str, Principal]:
        """Every accepted token with its principal (the deployment token has every role)."""
        tokens = dict(self.principals)
        if self.auth_token:
            tokens.setdefault(self.auth_token, DEPLOYMENT)
        return tokens


class GrpcServer:
    """A grpc.aio server with Esper's standard equipment.

    Lifecycle: construct, `add_service(...)` for each servicer, `await start()` (binds; health is
    NOT_SERVING), finish any readiness work, `set_serving()`, then `await wait_for_termination()`.
    `await stop()` (also run by SIGTERM/SIGINT after `install_signal_handlers()`) flips health to
    NOT_SERVING, lets in-flight calls finish within the grace period, cancels the rest, then runs
    the shutdown callbacks in reverse order of registration.
    """

    def __init__(self, config: ServerConfig | None = None, metrics: ServerMetrics | None = None):
        """`metrics`: record into these (served by their owner) rather than per `config.metrics_port`."""
        self.config = config or ServerConfig()
        self.config.validate()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        self.metrics = metrics
        if self.metrics is None and self.config.metrics_port is not None:
            self.metrics = ServerMetrics()
        if self.metrics is not None:
            # Outermost, so it records the status every other interceptor settled on.
            interceptors.append(self.metrics.interceptor())
        tokens = self.config.token_principals()
        if tokens:
            interceptors.append(BearerTokenInterceptor(tokens, (HEALTH_METHOD_PREFIX,)))
        interceptors.append(ErrorMappingInterceptor())
        options = [
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *self.config.extra_options,
        ]
        self._server = grpc.aio.server(interceptors=interceptors, options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._service_names: list[str] = []
        self._shutdown_callbacks: list[ShutdownCallback] = []
        self._port: int | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stop_requested = False

    def add_service(self, service_name: str, servicer: object,
                    add_to_server: Callable[[object, grpc.aio.Server], None]) -> None:
        """Register a servicer, e.g. ``add_service("esper.v1.UrzaService", s, add_UrzaServiceServicer_to_server)``."""
        if self._port is not None:
            raise RuntimeError("add_service must be called before start()")
        add_to_server(servicer, self._server)
        self._service_names.append(service_name)

    def add_generic_handlers(self, service_name: str, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register hand-written handlers (no generated code) under a service name."""
        self._server.add_generic_rpc_handlers(tuple(handlers))
        self._service_names.append(service_name)

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run `await callback()` after the server stopped (close pools, databases, clients)."""
        self._shutdown_callbacks.append(callback)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` actually bound (the real port when the config asked for 0)."""
        return f"{self.config.host}:{self.port}"

    @property
    def service_names(self) -> list[str]:
        return list(self._service_names)

    async def start(self) -> str:
        """Bind and start serving RPCs; health reports NOT_SERVING until `set_serving()`."""
        for name in ("", *self._service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.reflection:
            enable_reflection((*self._service_names, health.SERVICE_NAME), self._server)
        target = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert_file is not None:
            assert self.config.tls_key_file is not None
            creds = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key_file).read_bytes(), Path(self.config.tls_cert_file).read_bytes())])
            port = self._server.add_secure_port(target, creds)
        else:
            port = self._server.add_insecure_port(target)
        if port == 0:
            raise OSError(f"could not bind {target}")
        self._port = port
        await self._server.start()
        log.info("listening on %s (%s)", self.address, ", ".join(self._service_names) or "no services")
        if self.metrics is not None and self.config.metrics_port is not None:
            endpoint = self.metrics.start(self.config.host, self.config.metrics_port)
            print(f"metrics: {endpoint.url}", file=sys.stderr, flush=True)  # stdout has only LISTENING
        return self.address

    async def set_serving(self) -> None:
        """Report SERVING for the server ("") and every registered service."""
        for name in ("", *self._service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        """Report NOT_SERVING everywhere (e.g. while a dependency is down, or when stopping)."""
        for name in ("", *self._service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, drain in-flight calls for `grace` seconds, run callbacks.

        Idempotent and safe to call concurrently: later callers wait for the first stop.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(self.config.grace_seconds if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        try:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            for callback in reversed(self._shutdown_callbacks):
                try:
                    await callback()
                except Exception:  # one failing callback must not skip the others
                    log.exception("shutdown callback %r failed", callback)
            self._stopped.set()
            log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Wait until `stop()` completed (by a call or a signal)."""
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a graceful stop (a second signal does not hurry it)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    @property
    def stop_requested(self) -> bool:
        """True once a signal asked the server to stop (possibly before it started)."""
        return self._stop_requested

    def _on_signal(self, sig: signal.Signals) -> None:
        self._stop_requested = True
        if self._port is None:
            log.info("received %s while starting; stopping once setup has finished", sig.name)
            return
        log.info("received %s; stopping within %.1f s", sig.name, self.config.grace_seconds)
        asyncio.ensure_future(self.stop())


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options every Esper server shares."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    group.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    group.add_argument("--print-port", action="store_true",
                       help=f"print '{LISTENING_PREFIX}HOST:PORT' as the first stdout line once bound "
                            "(always printed; kept for compatibility with supervisors that pass it)")
    group.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS,
                       help="seconds in-flight calls may take to finish on shutdown (default %(default)s)")
    group.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                       help="largest message sent or received, MiB (default %(default)s)")
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain; enables TLS with --tls-key")
    group.add_argument("--tls-key", type=Path, help="PEM private key")
    group.add_argument("--auth-token-file", type=Path,
                       help="file holding the bearer token clients must send (env ESPER_AUTH_TOKEN also works)")
    group.add_argument("--principals-file", type=Path,
                       help="JSON file of accepted tokens, each with a principal name and roles, e.g. "
                            "{\"principals\": [{\"name\": \"tezzeret\", \"token\": \"...\", "
                            "\"roles\": [\"compiler\"]}]} (see esper.serving.auth)")
    group.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    group.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus /metrics over HTTP on --host at this port (0: a free one; "
                            "default off); the URL is printed on stderr at start")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build a ServerConfig from `add_server_arguments` options (token: file, else $ESPER_AUTH_TOKEN)."""
    import os

    token: str | None = None
    if args.auth_token_file is not None:
        token = Path(args.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty; expected a token")
    elif os.environ.get("ESPER_AUTH_TOKEN"):
        token = os.environ["ESPER_AUTH_TOKEN"].strip()
    principals = load_principals(args.principals_file) if getattr(args, "principals_file", None) else {}
    config = ServerConfig(host=args.host, port=args.port, grace_seconds=args.grace,
                          max_message_bytes=int(args.max_message_mb * 2**20),
                          tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, auth_token=token,
                          principals=principals, metrics_port=getattr(args, "metrics_port", None))
    config.validate()
    return config


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr (stdout carries only the LISTENING line)."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(config: ServerConfig, setup: Callable[[GrpcServer], Awaitable[None]]) -> None:
    """Run a server process until SIGTERM/SIGINT.

    `setup(server)` registers services and shutdown callbacks and may do async initialisation;
    then the server binds, reports SERVING, prints ``LISTENING host:port`` as the first stdout
    line, and waits for a signal.
    """
    server = GrpcServer(config)
    # Installed first so a SIGTERM during a slow setup (worker pools, databases) still stops cleanly.
    server.install_signal_handlers()
    await setup(server)
    if server.stop_requested:
        await server.stop(0)  # runs the shutdown callbacks setup registered; nothing was bound
        return
    address = await server.start()
    await server.set_serving()
    print(f"{LISTENING_PREFIX}{address}", flush=True)
    await server.wait_for_termination()


def run_server_main(config: ServerConfig, setup: Callable[[GrpcServer], Awaitable[None]]) -> int:
    """`asyncio.run(serve(...))` for a `__main__`; returns the process exit code."""
    try:
        asyncio.run(serve(config, setup))
    except KeyboardInterrupt:  # a signal that arrived before handlers were installed
        return 130
    except Exception as exc:  # e.g. a dependency not reachable at startup: say why, exit non-zero
        log.error("server failed: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
