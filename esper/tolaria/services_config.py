"""The ``services`` section of a run's config: how it reaches Urza, Tezzeret, Oona and Tamiyo
(local child processes, remote addresses or none), its auth and TLS, and its timeouts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from esper.tolaria.config_parsing import ConfigError

ServicesMode = Literal["local", "remote", "off"]
SERVICE_NAMES = ("urza", "tezzeret", "oona", "tamiyo")


@dataclass
class ServicesConfig:
    """How the run reaches Urza, Tezzeret, Oona and Tamiyo (see esper.tolaria.services).

    local: `esper-train` starts them as child processes on loopback (the default; the environment
    variable ESPER_SERVICES_MODE changes the default, e.g. to `off` for fast test suites);
    remote: connect to `addresses`; off: the in-process controller, no services.
    """

    mode: ServicesMode = field(default_factory=lambda: os.environ.get("ESPER_SERVICES_MODE", "local"))
    # name -> host:port for mode remote (urza, tezzeret, oona, tamiyo).
    addresses: dict[str, str] = field(default_factory=dict)
    # The in-process Tolaria gRPC server (run status, metrics, seeds, checkpoint, stop); -1 disables it.
    tolaria_port: int = 0
    # Deadline of one Decide call; a slower Tamiyo means "no decision this epoch".
    decision_timeout_s: float = 2.0
    # Deadline of other unary calls (Urza lookups, compile requests, reports, publishes).
    call_timeout_s: float = 5.0
    compile_timeout_s: float = 120.0
    # A germinated seed whose kernel has not arrived this many seconds after the decision is
    # cancelled; 0 waits until the compile job fails (Tezzeret ends it after compile_timeout_s).
    germination_timeout_s: float = 180.0
    # Before training, start obtaining the kernel the heuristic policy would pick first at each
    # site (a cold compile takes seconds, many epochs of a small model); false: only on decisions.
    prefetch_kernels: bool = True
    # While a compile runs: how often its job is polled (covers a missed kernel-ready event).
    poll_s: float = 2.0
    # Backoff between attempts to reach a service that is down: initial, doubled up to the max.
    retry_initial_s: float = 0.5
    retry_max_s: float = 8.0
    # Bearer token: sent on every call to the services and required by the Tolaria server (and,
    # in local mode, by the services esper-train starts). auth_token_file holds it instead (its
    # first line); set at most one of the two. Empty: no auth.
    auth_token: str = ""
    auth_token_file: str = ""
    # TLS towards the services: the PEM root certificate that signed their certificates (empty:
    # plaintext), and the name their certificates carry when it is not the host of the address.
    tls_root_cert: str = ""
    tls_server_name: str = ""
    # TLS of the Tolaria server esper-train starts: PEM certificate chain and private key (both or neither).
    tolaria_tls_cert: str = ""
    tolaria_tls_key: str = ""

    def token(self) -> str | None:
        """The run's bearer token (auth_token, or the first line of auth_token_file), or None."""
        if self.auth_token_file:
            return Path(self.auth_token_file).read_text().strip().splitlines()[0].strip()
        return self.auth_token or None
    # Local mode: how long each service may take to become healthy, compile workers, Oona backend.
    start_timeout_s: float = 120.0
    tezzeret_workers: int = 1
    oona_backend: str = "memory://"
    # Local mode (Linux): the CPUs the services, their compile workers and the trainer's network
    # threads run on, so that a compile never takes a core from the training step (esper.cpus).
    # auto: the last CPU serves and the rest train (from 2 CPUs on; a quarter serve from 8 on),
    # and torch uses one intra-op thread per training CPU unless train.torch_threads is set;
    # off: everything shares every CPU; or a CPU list such as "3" or "6-7" that serves (in
    # remote mode only an explicit list partitions: services started on those CPUs by hand).
    cpus: str = "auto"


def validate_services(svc: ServicesConfig) -> None:
    """ConfigError naming the `services.*` key of a value the type alone does not rule out."""
    unknown = [n for n in svc.addresses if n not in SERVICE_NAMES]
    if unknown:
        raise ConfigError(f"services.addresses: unknown service(s) {unknown}; expected some of {list(SERVICE_NAMES)}")
    for name, address in svc.addresses.items():
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"services.addresses.{name}: expected host:port (e.g. 127.0.0.1:50051), got {address!r}")
    if svc.mode == "remote":
        missing = [n for n in SERVICE_NAMES if n not in svc.addresses]
        if missing:
            raise ConfigError(f"services.mode remote needs services.addresses for {missing}; "
                              "expected host:port for each of urza, tezzeret, oona, tamiyo")
    for key in ("decision_timeout_s", "call_timeout_s", "compile_timeout_s", "retry_initial_s", "retry_max_s",
                "start_timeout_s", "poll_s"):
        if getattr(svc, key) <= 0:
            raise ConfigError(f"services.{key}: expected a float > 0, got {getattr(svc, key)}")
    if svc.germination_timeout_s < 0:
        raise ConfigError(f"services.germination_timeout_s: expected a float >= 0 (0: until the compile job fails), "
                          f"got {svc.germination_timeout_s}")
    if svc.auth_token and svc.auth_token_file:
        raise ConfigError("services.auth_token_file: set either services.auth_token or services.auth_token_file, not both")
    if svc.auth_token_file:
        try:
            token = Path(svc.auth_token_file).read_text().strip().splitlines()
        except OSError as exc:
            raise ConfigError(f"services.auth_token_file: cannot read {svc.auth_token_file!r} ({exc.strerror}); "
                              "expected a file holding the token") from None
        if not token or not token[0].strip():
            raise ConfigError(f"services.auth_token_file: {svc.auth_token_file!r} is empty; expected the token")
    if bool(svc.tolaria_tls_cert) != bool(svc.tolaria_tls_key):
        raise ConfigError("services.tolaria_tls_cert / services.tolaria_tls_key: expected both (TLS) or neither")
    for key in ("tls_root_cert", "tolaria_tls_cert", "tolaria_tls_key"):
        value = getattr(svc, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"services.{key}: {value!r} is not a file; expected a PEM file")
    if svc.tezzeret_workers < 1:
        raise ConfigError(f"services.tezzeret_workers: expected an int >= 1, got {svc.tezzeret_workers}")
    if svc.cpus.strip().lower() not in ("auto", "off"):
        from esper.cpus import CpuSpecError, parse_cpu_list

        try:
            parse_cpu_list(svc.cpus)
        except CpuSpecError as exc:
            raise ConfigError(f"services.cpus: {exc}; expected auto, off or a CPU list such as 3 or 6-7") from None
    if not -1 <= svc.tolaria_port < 65536:
        raise ConfigError(f"services.tolaria_port: expected -1 (off), 0 (any free port) or a port, got {svc.tolaria_port}")
