"""``esper-urza`` / ``python -m services.urza``: run the Urza server.

Prints ``LISTENING host:port`` on stdout once SERVING (see `esper.serving`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from esper.serving import (
    GrpcServer,
    add_server_arguments,
    configure_logging,
    run_server_main,
    server_config_from_args,
)
from esper.urza import UrzaLibrary
from esper.urza.metrics import urza_sampler
from esper.v1 import urza_pb2_grpc
from services.urza.servicer import SERVICE_NAME, UrzaServicer

log = logging.getLogger("esper.urza")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-urza", description="Urza: blueprint and kernel artifact library.")
    add_server_arguments(parser)
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="directory for blobs (and the SQLite metadata file unless --database-url)")
    parser.add_argument("--database-url", default=None,
                        help="SQLAlchemy URL of the metadata database, e.g. postgresql://user@host:5432/urza "
                             "(default: sqlite file DATA_DIR/urza.db)")
    parser.add_argument("--register-catalog", action=argparse.BooleanOptionalAction, default=True,
                        help="register the shipped blueprint catalog at startup (default: yes)")
    return parser


def register_catalog(library: UrzaLibrary) -> int:
    """Register every shipped blueprint (idempotent); returns how many were new."""
    from esper.kasmina.blueprints import CATALOG

    return sum(1 for spec in CATALOG.values() if library.register_blueprint(spec)[1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    config = server_config_from_args(args)

    async def setup(server: GrpcServer) -> None:
        library = await asyncio.to_thread(UrzaLibrary, args.data_dir, args.database_url)
        if args.register_catalog:
            created = await asyncio.to_thread(register_catalog, library)
            log.info("blueprint catalog registered (%d new)", created)
        servicer = UrzaServicer(library)
        server.add_service(SERVICE_NAME, servicer, urza_pb2_grpc.add_UrzaServiceServicer_to_server)
        server.add_shutdown_callback(servicer.close)
        if server.metrics is not None:
            server.metrics.add_sampler(urza_sampler(library))

    return run_server_main(config, setup)


if __name__ == "__main__":
    sys.exit(main())
