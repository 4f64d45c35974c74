"""The services of a training run: start or find them, watch them, wire them into the trainer.

``services.mode`` (see `esper.tolaria.services_config.ServicesConfig`):

- ``local`` (default): Urza, Oona, Tezzeret and Tamiyo are started as child processes on
  loopback with ephemeral ports by `esper.local_stack.LocalStack` (the same launcher as
  ``esper-services up``), health-checked, with state and logs under ``<run dir>/services/``
  (``services/logs/<name>.log``). Tamiyo gets the run's controller section as its policy config.
  They are stopped when the run ends, on Ctrl-C and on a crash (and, on Linux, the kernel stops
  them if esper-train itself is killed). A service that dies during the run is restarted on the
  same port by a watcher thread, with backoff.
- ``remote``: ``services.addresses`` name running servers; their health is checked at start (a
  service that is down is a warning: adaptation waits for it, training does not).
- ``off``: no services; the in-process controller (the fast path used by most tests).

The trainer is built with what `RunServices` gives it: `controller_factory` (the
`RemoteController`, built once the model is wrapped) and `hooks` (the Tolaria server's
`ServedRunHooks`); `RunServices.attach(trainer)` then connects the controller and starts the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from esper.durable import write_json_atomic
from esper.tolaria.adaptation.timing import step_time_stats
from esper.tolaria.config import Config, policy_config
from esper.tolaria.controllers import Controller, ControllerFactory
from esper.tolaria.hooks import TrainerHook
from esper.tolaria.services_config import SERVICE_NAMES

log = logging.getLogger("esper.tolaria.services")

# Compiles run at a lower CPU priority than training: on a small machine they share its cores, and
# the training step must not wait for them.
TEZZERET_NICENESS = 10


class ServicesError(RuntimeError):
    """The run's services could not be started."""


class RunServices:
    """The services of one run (see module doc). Use as a context manager or start()/stop()."""

    def __init__(self, cfg: Config, run_dir: Path, echo: Callable[[str], None] = print, server_metrics: Any = None):
        self.cfg = cfg
        self.mode = cfg.services.mode
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.stack = None
        self.addresses: dict[str, str] = {}
        self.restarts: dict[str, int] = {}
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.remote = None
        self.tolaria = None
        self.control = None
        # esper-train under --metrics-port: the Tolaria server's RPCs join the trainer's /metrics.
        self.server_metrics = server_metrics
        # services.cpus (local mode): the training thread's CPUs and the services' (esper.cpus).
        self.partition = None
        self._restore_cpus: tuple[set[int], int] | None = None

    def _service_cpus(self):
        return self.partition.services if self.partition is not None else None

    def partition_cpus(self) -> None:
        """Move the training thread to its CPUs (see ServicesConfig.cpus); idempotent.

        Local mode; remote mode only with an explicit CPU list (services running on this machine,
        pinned there by whoever started them).
        """
        setting = self.cfg.services.cpus.strip().lower()
        if self._restore_cpus is not None or self.mode == "off" or (self.mode == "remote" and setting == "auto"):
            return
        import os

        import torch

        from esper import cpus

        try:
            self.partition = cpus.plan_partition(self.cfg.services.cpus)
        except cpus.CpuSpecError as exc:
            raise ServicesError(f"services.cpus: {exc}") from exc
        if self.partition is None:
            return
        self._restore_cpus = (os.sched_getaffinity(0), torch.get_num_threads())
        cpus.pin_current_thread(self.partition.train)
        if self.cfg.train.torch_threads <= 0:
            torch.set_num_threads(len(self.partition.train))
        self.echo(f"cpus: {self.partition.describe()} (services.cpus={self.cfg.services.cpus}; "
                  f"torch threads {torch.get_num_threads()})")

    def _unpartition(self) -> None:
        if self._restore_cpus is None:
            return
        import torch

        from esper import cpus

        mask, threads = self._restore_cpus
        self._restore_cpus = None
        cpus.pin_current_thread(sorted(mask))
        torch.set_num_threads(threads)

    # ------------------------------------------------------------------ services

    def start(self, warn: bool = True) -> dict[str, str]:
        """Start (local) or check (remote, warning about those down when `warn`); their addresses."""
        svc = self.cfg.services
        if self.mode == "off":
            return {}
        if self.mode == "remote":
            self.addresses = {name: svc.addresses[name] for name in SERVICE_NAMES}
            for status in self.check() if warn else ():
                if status.status != "SERVING":
                    self.echo(f"warning: {status.name} at {status.address} is {status.status} {status.detail}; "
                              "training starts anyway, adaptation waits for it")
            return self.addresses
        from esper.cpus import on_cpus

        with on_cpus(self._service_cpus()):  # children and the watcher thread inherit these CPUs
            return self._start_local(svc)

    def _start_local(self, svc: Any) -> dict[str, str]:
        from esper.local_stack import LocalStack, StackError

        state_dir = self.run_dir / "services"
        state_dir.mkdir(parents=True, exist_ok=True)
        policy_path = state_dir / "tamiyo-policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy_config(self.cfg), sort_keys=False))
        extra_args: dict[str, list[str]] = {name: [] for name in SERVICE_NAMES}
        extra_args["tamiyo"] += ["--policy-config", str(policy_path)]
        token = svc.token()
        if token:  # the services this run starts require the run's token too
            token_path = state_dir / "auth-token"
            token_path.touch(mode=0o600)
            token_path.write_text(token + "\n")
            for args in extra_args.values():
                args += ["--auth-token-file", str(token_path)]
        self.stack = LocalStack(list(SERVICE_NAMES), state_dir=state_dir, oona_backend=svc.oona_backend,
                                tezzeret_workers=svc.tezzeret_workers, start_timeout=svc.start_timeout_s,
                                extra_args=extra_args,
                                die_with_parent=True, niceness={"tezzeret": TEZZERET_NICENESS})
        started = time.perf_counter()
        try:
            self.addresses = self.stack.start()
        except (StackError, ValueError) as exc:
            raise ServicesError(f"services.mode local: {exc}") from exc
        missing = [n for n in SERVICE_NAMES if n not in self.addresses]
        if missing:
            self.stack.stop()
            raise ServicesError(f"services.mode local: {missing} could not be started (modules not installed)")
        self.echo(f"services up in {time.perf_counter() - started:.1f} s: "
                  + ", ".join(f"{n} {a}" for n, a in self.addresses.items())
                  + f" (logs in {state_dir / 'logs'})")
        self._write_pids()
        self._watcher = threading.Thread(target=self._watch, name="esper-services-watch", daemon=True)
        self._watcher.start()
        return self.addresses

    def check(self) -> list[Any]:
        """Health of every service of this run (SERVING, NOT_SERVING or UNREACHABLE)."""
        from esper.local_stack import check_health

        svc = self.cfg.services
        return check_health(self.addresses, timeout=3.0, auth_token=svc.token(),
                            tls_root_cert=Path(svc.tls_root_cert) if svc.tls_root_cert and self.mode == "remote" else None,
                            tls_server_name=svc.tls_server_name or None)

    def _watch(self) -> None:
        """Restart local services that died, on their old port, with backoff (see module doc).

        Runs until stop(): on Linux a child started from this thread is stopped when the thread ends.
        """
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while not self._watch_stop.wait(0.5):
            stack = self.stack
            if stack is None:
                return
            for name, code in stack.exited().items():
                if self._watch_stop.is_set() or time.monotonic() < next_try.get(name, 0.0):
                    continue
                self.echo(f"warning: service {name} exited with code {code}; restarting it")
                try:
                    stack.restart(name)
                except Exception as exc:  # keep watching; try again later
                    backoff[name] = min(30.0, backoff.get(name, 1.0) * 2)
                    next_try[name] = time.monotonic() + backoff[name]
                    self.echo(f"warning: restarting {name} failed ({exc}); next attempt in {backoff[name]:.0f} s")
                    continue
                backoff.pop(name, None)
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._write_pids()
                self.echo(f"service {name} restarted at {stack.running[name].address}")

    def _write_pids(self) -> None:
        write_json_atomic(self.run_dir / "services" / "pids.json",
                          {"pids": self.pids(), "addresses": dict(self.addresses), "restarts": dict(self.restarts)})

    def pids(self) -> dict[str, int]:
        """Process ids of local services (tests kill them to check degradation)."""
        if self.stack is None:
            return {}
        return {name: r.pid for name, r in self.stack.running.items()}

    # ------------------------------------------------------------------ trainer wiring

    def controller_factory(self, morphogenetic: bool) -> ControllerFactory | None:
        """The trainer's controller factory: the remote controller when the run has services and
        grows (built with the model, no network yet; `attach` connects it), else None (in process)."""
        if self.mode == "off" or not morphogenetic:
            return None
        return self._remote_controller

    def _remote_controller(self, morph: Any, echo: Callable[[str], None]) -> Controller:
        from esper.tolaria.adaptation import RemoteController

        self.remote = RemoteController(morph, self.cfg.services, self.run_dir, echo=echo)
        return self.remote

    def hooks(self) -> list[TrainerHook]:
        """The trainer hooks of the run's Tolaria server (``services.tolaria_port`` >= 0): they keep
        its status current and serve its requests; `attach` starts the server."""
        if self.cfg.services.tolaria_port < 0:
            return []
        from esper.tolaria.control import RunControl
        from esper.tolaria.server import ServedRunHooks

        if self.control is None:
            self.control = RunControl(self.cfg.run_name, str(self.run_dir), self.cfg.train.epochs)
        return [ServedRunHooks(self.control)]

    def attach(self, trainer: Any) -> None:
        """After `start()`: connect the remote controller, start the Tolaria server, resume pending kernels.

        Their threads are started on the service CPUs (local mode with a CPU partition).
        """
        from esper.cpus import on_cpus

        with on_cpus(self._service_cpus()):
            self._attach(trainer)

    def _attach(self, trainer: Any) -> None:
        from esper.tolaria.server import TolariaServer

        svc = self.cfg.services
        if self.remote is not None:
            self.remote.connect(self.addresses)
            if trainer.payload is not None:
                self.remote.resume_pending(trainer.state.global_step)
            elif svc.prefetch_kernels:
                ctl = self.cfg.controller
                self.remote.prefetch_first_kernels(self.cfg.seeds.blueprints or ctl.blueprints,
                                                   ctl.parameter_budget, ctl.compute_budget)
        if self.control is not None:
            self.control.mark_started()
            self.tolaria = TolariaServer(self.control, port=svc.tolaria_port, auth_token=svc.token(),
                                         tls_cert_file=svc.tolaria_tls_cert or None,
                                         tls_key_file=svc.tolaria_tls_key or None, metrics=self.server_metrics)
            address = self.tolaria.start()
            (self.run_dir / "services").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "services" / "tolaria.address").write_text(address + "\n")
            self.echo(f"tolaria server at {address}")
            if self.remote is not None:
                self.remote.on_status_change(
                    lambda paused, reason: self.control.update_status(adaptation_paused=paused,
                                                                      paused_reason=reason))

    def report(self) -> dict[str, Any]:
        """What the run's summary records about the services."""
        out: dict[str, Any] = {"mode": self.mode, "addresses": dict(self.addresses), "restarts": dict(self.restarts)}
        if self.remote is not None:
            r = self.remote
            lat = sorted(r.decision_latencies_ms)
            out["decisions"] = len(lat)
            if lat:
                out["decision_round_trip_ms"] = {"p50": lat[len(lat) // 2],
                                                 "max": lat[-1]}
            out["germinations"] = list(r.germinations)
            out["outages"] = r.outages()
            out["kernel_cache"] = r.kernels.stats()
            out["notes"] = [e["note"] for e in r.events][-200:]
            out["step_times"] = step_time_stats(r.step_times)
            waits = sorted(r.load_slice_waits())
            if waits:  # kernel loads ran in slices between steps (esper.tolaria.slices)
                out["load_slices"] = {"n": len(waits), "median_ms": waits[len(waits) // 2] * 1000,
                                      "max_ms": waits[-1] * 1000}
        return out

    def finish(self, trainer: Any) -> None:
        """After training: flush reports and add the services' record to summary.json."""
        import json

        if self.remote is not None:
            self.remote.close()
        path = self.run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        summary["services"] = self.report()
        summary["stopped_by_request"] = bool(trainer.stop_requested)
        adaptations = list(summary.get("adaptations", []))
        for g in summary["services"].get("germinations", []):
            source = ("compiled by Tezzeret for this run" if g["path"] == "cold" else "from the kernel cache")
            match = next((a for a in adaptations if a["layer"] == g["layer"] and a["seed"] == g["seed"]), None)
            outcome = "?"
            if match is not None:  # germinations and adaptations of one slot come in the same order
                adaptations.remove(match)
                outcome = match["outcome"]
            self.echo(f"seed {g['layer']}[{g['seed']}] ran kernel {g['kernel_id']} ({source}, loaded via {g['via']}, "
                      f"active {g['latency_s']:.2f} s after the decision, {g['steps_meanwhile']} steps meanwhile): "
                      f"{outcome.upper()}")
        write_json_atomic(path, summary, indent=2)

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Stop the remote controller, the Tolaria server and any local services (idempotent)."""
        if self.remote is not None:
            self.remote.close()
        if self.tolaria is not None:
            self.tolaria.stop()
            self.tolaria = None
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        if self.stack is not None:
            codes = self.stack.stop()
            self.stack = None
            bad = {n: c for n, c in codes.items() if c not in (0, None)}
            if bad:
                log.warning("services exited with codes %s", bad)
        self._unpartition()

    def __enter__(self) -> RunServices:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()



def sigterm_as_interrupt() -> None:
    """In the main thread: SIGTERM raises KeyboardInterrupt, so `finally` blocks stop the services."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def services_command(cfg: Config, run_dir: Path, check: bool) -> int:
    """``esper-train --check-services`` (check=True) and ``--services-only``; the exit status."""
    if cfg.services.mode == "off":
        print("services.mode is off: this run uses the in-process controller and no services")
        return 0
    services = RunServices(cfg, run_dir)
    try:
        addresses = services.start(warn=False)
        statuses = services.check()
        for s in statuses:
            line = f"{s.name:<9} {s.address:<22} {s.status}"
            print(line + (f" ({s.latency_ms:.1f} ms)" if s.status == "SERVING" else f" {s.detail}"), flush=True)
        healthy = all(s.status == "SERVING" for s in statuses)
        if check:
            return 0 if healthy else 1
        print("services up: " + " ".join(f"{n}={a}" for n, a in addresses.items()), flush=True)
        print("press Ctrl-C to stop them", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        services.stop()
