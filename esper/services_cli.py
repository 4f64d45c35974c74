"""``esper-services``: bring up Esper's servers locally, or check the health of running ones.

    esper-services up [--only urza,oona] [--state-dir DIR] [--oona-backend URL] [--write-config FILE]
    esper-services check --config FILE | --address NAME=HOST:PORT [...]

`up` starts Urza, Oona, Tezzeret (and Tamiyo when installed) as child processes on 127.0.0.1,
waits for each health check to report SERVING, prints one line per service
(``NAME  HOST:PORT  pid PID  log PATH``) and then ``READY``, and runs until Ctrl-C or SIGTERM,
which stop the servers gracefully (exit 0). If a server dies, the others are stopped (exit 1).
`check` prints each service's health; exit 0 when every one is SERVING, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from esper.durable import write_bytes_atomic
from esper.local_stack import SERVICES, LocalStack, StackError, check_health, load_addresses, validate_address


def _parse_only(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVICES]
    if not names or unknown:
        raise ValueError(f"--only: expected a comma-separated subset of {sorted(SERVICES)}, got {text!r}")
    return names


def _write_config(path: Path, addresses: dict[str, str]) -> None:
    lines = ["# written by esper-services up; read by esper-services check --config", "services:"]
    lines += [f"  {name}: {address}" for name, address in addresses.items()]
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())


def cmd_up(args: argparse.Namespace) -> int:
    stop_requested: list[int] = []

    def on_signal(signum, _frame):
        stop_requested.append(signum)

    # Install before starting anything so a Ctrl-C during startup still stops what started.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack = LocalStack(_parse_only(args.only), state_dir=args.state_dir, oona_backend=args.oona_backend,
                           tezzeret_workers=args.tezzeret_workers, log_level=args.log_level)
    except (ValueError, StackError) as exc:
        print(f"esper-services: {exc}", file=sys.stderr)
        return 2
    for name in stack.skipped:
        print(f"esper-services: skipping {name} (its server module is not installed)", file=sys.stderr)
    try:
        addresses = stack.start()
    except StackError as exc:
        print(f"esper-services: {exc}", file=sys.stderr)
        return 1
    try:
        for name, running in stack.running.items():
            print(f"{name:<10} {running.address:<22} pid {running.pid:<8} log {running.log_path}", flush=True)
        if args.write_config is not None:
            _write_config(args.write_config, addresses)
        print(f"READY {len(addresses)} service(s) SERVING; Ctrl-C or SIGTERM stops them", flush=True)
        while not stop_requested:
            died = stack.exited()
            if died:
                print(f"esper-services: {', '.join(f'{n} exited with code {c}' for n, c in died.items())}; "
                      "stopping the others", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"esper-services: {signal.Signals(stop_requested[0]).name} received; stopping", file=sys.stderr)
        return 0
    finally:
        codes = stack.stop()
        bad = {n: c for n, c in codes.items() if c not in (0, None)}
        if bad:
            print(f"esper-services: stopped with non-zero exit codes {bad}", file=sys.stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        addresses: dict[str, str] = {}
        if args.config is not None:
            addresses.update(load_addresses(args.config))
        for item in args.address or ():
            name, sep, address = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--address: expected NAME=HOST:PORT, got {item!r}")
            addresses[name] = validate_address(address, f"--address {name}")
        if not addresses:
            raise ValueError("nothing to check: give --config FILE or --address NAME=HOST:PORT")
    except ValueError as exc:
        print(f"esper-services check: {exc}", file=sys.stderr)
        return 2
    token = args.auth_token_file.read_text().strip() if args.auth_token_file else None
    statuses = check_health(addresses, timeout=args.timeout, auth_token=token)
    for s in statuses:
        extra = f"{s.latency_ms:.1f} ms" if s.status == "SERVING" else s.detail
        print(f"{s.name:<10} {s.address:<22} {s.status:<12} {extra}")
    return 0 if all(s.status == "SERVING" for s in statuses) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esper-services", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the services locally and run until Ctrl-C")
    up.add_argument("--only", help=f"comma-separated subset of {','.join(SERVICES)} (default: all installed)")
    up.add_argument("--state-dir", type=Path, help="where data and logs go (default: a temp dir, deleted at exit)")
    up.add_argument("--oona-backend", default="memory://", help="memory:// (default) or redis://host:port/db")
    up.add_argument("--tezzeret-workers", type=int, default=1, help="compiler worker processes (default 1)")
    up.add_argument("--write-config", type=Path, help="write the addresses as YAML (for `check --config`)")
    up.add_argument("--log-level", default="INFO", help="servers' log level (default %(default)s)")
    up.set_defaults(func=cmd_up)
    check = sub.add_parser("check", help="report each service's health")
    check.add_argument("--config", type=Path, help="YAML file of name: host:port (top level or under services:)")
    check.add_argument("--address", action="append", metavar="NAME=HOST:PORT", help="a service to check")
    check.add_argument("--timeout", type=float, default=3.0, help="seconds per health check (default 3)")
    check.add_argument("--auth-token-file", type=Path, help="bearer token, if the servers require one")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
