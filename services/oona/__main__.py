"""``esper-oona`` / ``python -m services.oona``: the Oona message-bus server.

Prints ``LISTENING 127.0.0.1:PORT`` as its first stdout line once SERVING (see `esper.serving`).
"""

from __future__ import annotations

import argparse
import os
import sys

from esper.oona import DEFAULT_RETENTION, OonaBus, open_backend
from esper.oona.metrics import oona_sampler
from esper.oona.redis_streams import RedisStreamsBackend
from esper.serving import (
    GrpcServer,
    add_server_arguments,
    configure_logging,
    run_server_main,
    server_config_from_args,
)
from esper.v1 import oona_pb2_grpc
from services.oona.servicer import SERVICE_NAME, OonaServicer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-oona", description="Oona: Esper's message bus (gRPC server).")
    add_server_arguments(parser)
    parser.add_argument("--backend", default=os.environ.get("ESPER_OONA_BACKEND", "memory://"),
                        help="memory:// (default) or redis://host:port/db; env ESPER_OONA_BACKEND")
    parser.add_argument("--retention", type=int, default=DEFAULT_RETENTION,
                        help="messages kept per topic (default %(default)s); a retention= URL option wins")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.retention <= 0:
        print(f"esper-oona: --retention must be positive, got {args.retention}", file=sys.stderr)
        return 2
    config = server_config_from_args(args)

    async def setup(server: GrpcServer) -> None:
        backend = open_backend(args.backend, retention=args.retention)
        if isinstance(backend, RedisStreamsBackend):
            await backend.ping()  # fail at start, not on the first publish
        bus = OonaBus(backend)
        servicer = OonaServicer(bus, max_message_bytes=config.max_message_bytes)
        server.add_service(SERVICE_NAME, servicer, oona_pb2_grpc.add_OonaServiceServicer_to_server)
        server.add_shutdown_callback(bus.close)
        if server.metrics is not None:
            server.metrics.add_sampler(oona_sampler(bus))

    return run_server_main(config, setup)


if __name__ == "__main__":
    sys.exit(main())
