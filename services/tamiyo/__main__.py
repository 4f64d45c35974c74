"""``esper-tamiyo`` / ``python -m services.tamiyo``: run the Tamiyo controller server.

The policy (heuristic, random or a learned GNN) behind the safety rails (`esper.tamiyo`),
configured by ``--policy-config`` (a YAML/JSON mapping with the keys of a Tolaria config's
``controller`` section and a ``growth`` mapping, or a whole Tolaria config whose ``controller``,
``growth`` and ``seeds.blueprints`` are used); ``--policy DIR`` serves the GNN policy in DIR and checks it every ``--policy-poll-s``
seconds for a newer version, which replaces the running one without a restart. Field reports go
to the replay buffer in ``--replay-dir``. Prints ``LISTENING host:port`` on stdout once SERVING.

``esper-tamiyo collect ...`` runs exploration episodes instead (`esper.tamiyo.collect`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import yaml

from esper.serving import (
    GrpcServer,
    add_server_arguments,
    configure_logging,
    run_server_main,
    server_config_from_args,
)
from esper.tamiyo.metrics import tamiyo_sampler
from esper.tamiyo.service import TamiyoCore
from esper.tamiyo.settings import LEGACY_GROWTH_KEYS, PolicySettings, policy_settings_from_mapping
from esper.v1 import tamiyo_pb2_grpc
from services.tamiyo.servicer import SERVICE_NAME, TamiyoServicer

log = logging.getLogger("esper.tamiyo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-tamiyo", description="Tamiyo: Esper's adaptation controller.")
    add_server_arguments(parser)
    parser.add_argument("--replay-dir", type=Path, required=True, help="directory of the on-disk replay buffer")
    parser.add_argument("--policy-config", type=Path, default=None,
                        help="YAML/JSON policy knobs (a Tolaria 'controller' section or a whole Tolaria config)")
    parser.add_argument("--policy", type=Path, default=None,
                        help="serve the learned GNN policy in this directory (sets policy: gnn, policy_path)")
    parser.add_argument("--policy-poll-s", type=float, default=2.0,
                        help="seconds between checks of the policy directory for a newer version (0: never)")
    return parser


def load_policy_settings(path: Path | None) -> PolicySettings:
    """Settings from a file (see the module docstring); defaults without one."""
    if path is None:
        return PolicySettings()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--policy-config {path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--policy-config {path}: expected a mapping, got {type(data).__name__}")
    if "controller" in data:  # a whole Tolaria config
        section = dict(data.get("controller") or {})
        blueprints = (data.get("seeds") or {}).get("blueprints")
        if blueprints:
            section["blueprints"] = blueprints
        if data.get("growth") is not None:
            # The run's growth section; the flat growth keys older runs wrote under controller
            # never took effect in Tolaria, so they are not read either.
            section = {k: v for k, v in section.items() if k not in LEGACY_GROWTH_KEYS}
            section["growth"] = data["growth"]
        data = section
    return policy_settings_from_mapping(data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["collect"]:
        from esper.tamiyo.collect import main as collect_main

        return collect_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = load_policy_settings(args.policy_config)
        if args.policy is not None:
            settings.policy = "gnn"
            settings.policy_path = str(args.policy.resolve())
        if settings.policy == "gnn":
            from esper.tamiyo.policy_store import load_policy

            load_policy(settings.policy_path)  # refuse a bad policy before listening
            import torch

            # One small graph per decision: intra-op threads would only contend with the trainer's CPUs.
            torch.set_num_threads(1)
    except ValueError as exc:
        print(f"esper-tamiyo: {exc}", file=sys.stderr)
        return 2
    config = server_config_from_args(args)

    async def setup(server: GrpcServer) -> None:
        core = await asyncio.to_thread(TamiyoCore, settings, args.replay_dir)
        await asyncio.to_thread(core.warm_up)
        core.watch_policy(args.policy_poll_s)
        if core.replay.truncated_bytes:
            log.warning("replay buffer %s: cut a torn tail of %d bytes", core.replay.path, core.replay.truncated_bytes)
        log.info("replay buffer %s holds %d field reports", core.replay.path, len(core.replay))
        servicer = TamiyoServicer(core)
        server.add_service(SERVICE_NAME, servicer, tamiyo_pb2_grpc.add_TamiyoServiceServicer_to_server)
        server.add_shutdown_callback(servicer.close)
        if server.metrics is not None:
            server.metrics.add_sampler(tamiyo_sampler(core))

    return run_server_main(config, setup)


if __name__ == "__main__":
    sys.exit(main())
