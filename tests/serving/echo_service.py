"""A tiny bytes-in/bytes-out service for testing the bootstrap without any Esper proto.

Run as a script it is a complete Esper-convention server process:
``python tests/serving/echo_service.py --port 0 [--grace S] [--auth-token-file F]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from esper import errors  # noqa: E402
from esper.serving import (  # noqa: E402
    GrpcServer,
    add_server_arguments,
    configure_logging,
    run_server_main,
    server_config_from_args,
)

SERVICE = "esper.test.Echo"
_attempts: dict[bytes, int] = {}


def _identity(data: bytes) -> bytes:
    return data


async def echo(request: bytes, context) -> bytes:
    return request


async def fail(request: bytes, context) -> bytes:
    if request == b"invalid":
        raise errors.InvalidArgumentError("payload must be 'ok', got 'invalid'", field="payload")
    if request == b"notfound":
        raise errors.NotFoundError("no such thing: 'x'")
    if request == b"dataloss":
        raise errors.DataLossError("blob corrupted", metadata={"sha256": "00ff"})
    if request == b"abort":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted itself")
    raise RuntimeError("boom: an unexpected bug")


async def slow(request: bytes, context) -> bytes:
    # Tests wait for this line to know the call is in flight on the server.
    print(f"echo: slow call started ({request.decode()} s)", file=sys.stderr, flush=True)
    await asyncio.sleep(float(request.decode()))
    return b"done"


async def flaky(request: bytes, context) -> bytes:
    """Request b'KEY:N' fails UNAVAILABLE N times per KEY, then answers the attempt count."""
    key, _, times = request.partition(b":")
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] <= int(times):
        raise errors.UnavailableError(f"flaky {key.decode()} attempt {_attempts[key]}")
    return str(_attempts[key]).encode()


async def stream(request: bytes, context):
    """Request b'N' yields N chunks; b'N!' raises a bug after N chunks."""
    text = request.decode()
    for i in range(int(text.rstrip("!"))):
        yield f"chunk{i}".encode()
    if text.endswith("!"):
        raise ValueError("stream bug after chunks")


async def collect(request_iterator, context) -> bytes:
    total = 0
    async for chunk in request_iterator:
        total += len(chunk)
    return str(total).encode()


async def flaky_collect(request_iterator, context) -> bytes:
    """First chunk b'KEY:N': fails UNAVAILABLE N times per KEY, then answers the bytes received."""
    chunks = [chunk async for chunk in request_iterator]
    key, _, times = chunks[0].partition(b":")
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] <= int(times):
        raise errors.UnavailableError(f"flaky stream {key.decode()} attempt {_attempts[key]}")
    return str(sum(map(len, chunks))).encode()


def handlers() -> grpc.GenericRpcHandler:
    """The generic handler of the echo service."""
    kw = {"request_deserializer": _identity, "response_serializer": _identity}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, **kw),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, **kw),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, **kw),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky, **kw),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, **kw),
        "Collect": grpc.stream_unary_rpc_method_handler(collect, **kw),
        "FlakyCollect": grpc.stream_unary_rpc_method_handler(flaky_collect, **kw),
    })


def add_echo(server: GrpcServer) -> None:
    server.add_generic_handlers(SERVICE, [handlers()])


def method(channel, name: str, kind: str = "unary_unary"):
    """A multicallable for one echo method on a sync or aio channel."""
    return getattr(channel, kind)(f"/{SERVICE}/{name}", request_serializer=_identity,
                                  response_deserializer=_identity)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echo-service")
    add_server_arguments(parser)
    parser.add_argument("--setup-delay", type=float, default=0.0, help="simulate a slow setup (seconds)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    async def setup(server: GrpcServer) -> None:
        print("echo: setup started", file=sys.stderr, flush=True)
        await asyncio.sleep(args.setup_delay)
        add_echo(server)

    return run_server_main(server_config_from_args(args), setup)


if __name__ == "__main__":
    sys.exit(main())
