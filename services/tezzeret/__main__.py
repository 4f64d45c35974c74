"""``esper-tezzeret`` / ``python -m services.tezzeret``: run the Tezzeret compiler server.

Needs an Urza server (``--urza HOST:PORT``); publishes kernel-ready events on Oona when
``--oona HOST:PORT`` is given. Prints ``LISTENING host:port`` on stdout once SERVING (the worker
pool is started and Urza answers).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from esper.clients import AsyncUrzaClient, KernelReadyPublisher
from esper.serving import (
    ChannelConfig,
    GrpcServer,
    add_server_arguments,
    configure_logging,
    run_server_main,
    server_config_from_args,
    wait_for_serving,
)
from esper.tezzeret import CompileJobs, CompileLimits, WorkerPool, warm_up_compiler
from esper.tezzeret.metrics import tezzeret_sampler
from esper.v1 import tezzeret_pb2_grpc
from services.tezzeret.servicer import SERVICE_NAME, TezzeretServicer

log = logging.getLogger("esper.tezzeret")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-tezzeret",
                                     description="Tezzeret: compiles blueprints into validated kernel artifacts.")
    add_server_arguments(parser)
    parser.add_argument("--urza", required=True, help="address of the Urza server, HOST:PORT")
    parser.add_argument("--oona", default=None, help="address of the Oona server for kernel-ready events (optional)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile worker processes (default %(default)s)")
    parser.add_argument("--default-timeout", type=float, default=120.0,
                        help="seconds a compile may take when the request sets none (default %(default)s)")
    parser.add_argument("--max-timeout", type=float, default=3600.0,
                        help="largest timeout a request may ask for (default %(default)s)")
    parser.add_argument("--upstream-tls-root-cert", type=Path, default=None,
                        help="PEM root certificate for TLS connections to Urza and Oona (default: plaintext)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch directory of the compile workers (their TMPDIR); default: the system temp dir")
    parser.add_argument("--max-parameters", type=int, default=CompileLimits.max_parameters,
                        help="largest seed (parameters) this server compiles (default %(default)s)")
    parser.add_argument("--max-flops-per-sample", type=int, default=CompileLimits.max_flops_per_sample,
                        help="largest forward cost per sample, FLOPs (default %(default)s)")
    parser.add_argument("--worker-memory-mb", type=int, default=CompileLimits.worker_memory_bytes // 2**20,
                        help="memory one compile may use in a worker, MiB, estimated before building "
                             "(default %(default)s)")
    parser.add_argument("--store-retry-seconds", type=float, default=300.0,
                        help="how long a compiled result keeps being offered to Urza while Urza is unavailable, "
                             "with exponential backoff (default %(default)s)")
    parser.add_argument("--urza-wait", type=float, default=30.0,
                        help="seconds to wait at startup for Urza to report SERVING (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.workers < 1:
        print(f"esper-tezzeret: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if not 0 < args.default_timeout <= args.max_timeout:
        print("esper-tezzeret: need 0 < --default-timeout <= --max-timeout", file=sys.stderr)
        return 2
    try:
        limits = CompileLimits(max_parameters=args.max_parameters, max_flops_per_sample=args.max_flops_per_sample,
                               worker_memory_bytes=args.worker_memory_mb * 2**20)
    except ValueError as exc:
        print(f"esper-tezzeret: {exc}", file=sys.stderr)
        return 2
    config = server_config_from_args(args)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        # Spawned workers inherit the environment: torch.export's temporary files land here.
        os.environ["TMPDIR"] = str(args.work_dir.resolve())

    async def setup(server: GrpcServer) -> None:
        import torch

        # Outgoing calls use the same deployment token as incoming ones (if any).
        urza = AsyncUrzaClient(ChannelConfig(args.urza, auth_token=config.auth_token,
                                        tls_root_cert=args.upstream_tls_root_cert))
        server.add_shutdown_callback(urza.close)
        await wait_for_serving(urza.channel, timeout=args.urza_wait)
        publisher = None
        if args.oona:
            publisher = KernelReadyPublisher(ChannelConfig(args.oona, auth_token=config.auth_token,
                                                          tls_root_cert=args.upstream_tls_root_cert))
            server.add_shutdown_callback(publisher.close)
        pool = WorkerPool(args.workers, initializer=warm_up_compiler)
        await asyncio.to_thread(pool.start)
        log.info("%d compile workers ready (pids %s)", args.workers, pool.worker_pids)
        jobs = CompileJobs(pool, urza, publisher, default_timeout_s=args.default_timeout,
                           max_timeout_s=args.max_timeout, cuda_available=torch.cuda.is_available(), limits=limits,
                           store_retry_s=args.store_retry_seconds)
        server.add_service(SERVICE_NAME, TezzeretServicer(jobs), tezzeret_pb2_grpc.add_TezzeretServiceServicer_to_server)
        server.add_shutdown_callback(jobs.close)
        if server.metrics is not None:
            server.metrics.add_sampler(tezzeret_sampler(jobs))

    return run_server_main(config, setup)


if __name__ == "__main__":
    sys.exit(main())
