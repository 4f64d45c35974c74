"""The shared gRPC bootstrap used by every Esper server and client.

Server side (`esper.serving.server`)
------------------------------------
``GrpcServer(ServerConfig(...))`` is a grpc.aio server that always has:

- the standard health service (``grpc.health.v1.Health``) for "" and every registered service,
  NOT_SERVING from `start()` until `set_serving()`, NOT_SERVING again as soon as `stop()` begins;
- server reflection (``grpc.reflection.v1`` and ``v1alpha``) listing the registered services,
  health and reflection;
- `ErrorMappingInterceptor`: a handler raising an `esper.errors.EsperError` subclass gets the
  mapped status code (`esper.serving.errors.STATUS_CODE_BY_ERROR`, the one mapping) with the
  error's message and a ``google.rpc.ErrorInfo`` detail (reason, domain ``esper.v1``, metadata
  such as ``field``); any other exception is logged and becomes INTERNAL; the server keeps serving;
- max send/receive message size (default 4 MiB; streaming RPCs use chunks <= 1 MiB);
- bind to 127.0.0.1 by default, port 0 picks a free port (`server.address` has the real one);
- request bytes that do not parse answer INVALID_ARGUMENT (reason ``MALFORMED_REQUEST``) on every
  RPC, unary and streaming; error messages and ``ErrorInfo`` metadata are cut to bounded sizes so
  a status always fits in the trailers;
- optional TLS (`tls_cert_file` + `tls_key_file`) and bearer-token auth (`auth_token`, and/or
  per-token principals with roles from ``--principals-file``, see `esper.serving.auth`): a call
  without a known ``authorization: Bearer <token>`` gets UNAUTHENTICATED; health stays open for
  probes; handlers read the caller with `esper.serving.auth.current_principal()`;
- graceful shutdown: `await server.stop()` or SIGTERM/SIGINT (after `install_signal_handlers()`)
  flips health to NOT_SERVING, lets in-flight calls finish within `grace_seconds`, cancels the
  rest, then runs `add_shutdown_callback` callbacks (close pools/databases) in reverse order.

Servicers are ``async def`` methods; streaming responses are async generators. Domain code raises
`esper.errors` exceptions and never imports grpc; servicers do not catch them.

A server's ``__main__`` looks like::

    parser = argparse.ArgumentParser(prog="esper-urza")
    add_server_arguments(parser)          # --host --port --print-port --grace --max-message-mb
                                          # --tls-cert --tls-key --auth-token-file --log-level
    parser.add_argument("--data-dir", ...)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)     # logs go to stderr

    async def setup(server: GrpcServer) -> None:
        servicer = UrzaServicer(...)
        server.add_service("esper.v1.UrzaService", servicer, add_UrzaServiceServicer_to_server)
        server.add_shutdown_callback(servicer.close)

    return run_server_main(server_config_from_args(args), setup)

Process convention (every Esper server)
---------------------------------------
Started as ``python -m services.<name> --port 0 ...`` (or its console script ``esper-<name>``),
a server binds, reports SERVING, then prints exactly one line on stdout::

    LISTENING 127.0.0.1:PORT

and nothing else on stdout (logs go to stderr). It stops gracefully on SIGTERM/SIGINT with exit
code 0. `esper.serving.process.ServerProcess` starts such a process and parses that line
(`parse_listening_line`); supervisors (``esper-services``, tests) use it.

Client side (`esper.serving.client`)
------------------------------------
- ``open_aio_channel(ChannelConfig(address, tls_root_cert=..., auth_token=...))`` and
  ``open_sync_channel(...)``: channels with matching message limits, TLS and the bearer header.
- ``await unary_call(stub.Method, request, timeout=5.0, idempotent=True)`` (and
  ``unary_call_sync``): the deadline is mandatory (ValueError without one) and covers all attempts;
  only calls marked idempotent are retried, on UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED, with
  jittered exponential backoff (`RetryPolicy`).
- ``stream_call(stub.Method, request, timeout=...)``: streaming calls with a mandatory deadline,
  never retried.
- ``await wait_for_serving(channel, timeout=...)`` / ``wait_for_serving_sync``: poll health.
- ``error_info_from(rpc_error)``: the ``ErrorInfo`` (reason, metadata["field"], ...) of a failure.
- ``domain_error_from_rpc_error(rpc_error, upstream="Urza at HOST:PORT")``: a failed call to another
  Esper server as an `esper.errors` exception (same code, message and field; transport failures
  become UnavailableError), for a server that relays it (e.g. Tezzeret relaying Urza's
  INVALID_ARGUMENT).
"""

from esper.serving.client import (
    ChannelConfig,
    RetryPolicy,
    open_aio_channel,
    open_sync_channel,
    stream_call,
    unary_call,
    unary_call_sync,
    wait_for_serving,
    wait_for_serving_sync,
)
from esper.serving.errors import domain_error_from_rpc_error, error_info_from, rpc_status_for, status_code_for
from esper.serving.process import ServerProcess, ServerStartError, parse_listening_line
from esper.serving.server import (
    LISTENING_PREFIX,
    GrpcServer,
    ServerConfig,
    add_server_arguments,
    configure_logging,
    run_server_main,
    serve,
    server_config_from_args,
)

__all__ = [
    "LISTENING_PREFIX",
    "ChannelConfig",
    "GrpcServer",
    "RetryPolicy",
    "ServerConfig",
    "ServerProcess",
    "ServerStartError",
    "add_server_arguments",
    "configure_logging",
    "domain_error_from_rpc_error",
    "error_info_from",
    "open_aio_channel",
    "open_sync_channel",
    "parse_listening_line",
    "rpc_status_for",
    "run_server_main",
    "serve",
    "server_config_from_args",
    "status_code_for",
    "stream_call",
    "unary_call",
    "unary_call_sync",
    "wait_for_serving",
    "wait_for_serving_sync",
]
