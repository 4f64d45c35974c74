"""A grpc.aio server with one empty unary method: the baseline of `esper-bench services`.

``python -m esper.bench.ping_server --port 0`` prints ``LISTENING 127.0.0.1:PORT`` like every Esper
server, then answers ``/esper.bench.Ping/Ping`` with an empty message. By default it is bare (no
interceptors, health or reflection): the floor a real service's unary call is compared with.
``--bootstrap`` serves the same method through the shared `esper.serving.GrpcServer` (error-mapping
interceptor, health, reflection) to show what the bootstrap itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from esper.serving.server import LISTENING_PREFIX

PING_METHOD = "/esper.bench.Ping/Ping"


async def _ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("esper.bench.Ping",
                                                {"Ping": grpc.unary_unary_rpc_method_handler(_ping)})


async def serve_bootstrap(host: str, port: int) -> None:
    from esper.serving import ServerConfig
    from esper.serving import serve as serve_esper

    async def setup(server) -> None:
        server.add_generic_handlers("esper.bench.Ping", [_handler()])

    await serve_esper(ServerConfig(host=host, port=port), setup)


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"{LISTENING_PREFIX}{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esper-bench-ping-server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bootstrap", action="store_true", help="serve through esper.serving.GrpcServer")
    args = parser.parse_args(argv)
    asyncio.run((serve_bootstrap if args.bootstrap else serve)(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
