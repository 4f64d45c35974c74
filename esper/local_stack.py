"""Run Esper's servers as local child processes on loopback, and check any server's health.

`LocalStack` starts Urza, Oona, Tezzeret (and Tamiyo when its server module exists) with
``python -m services.<name> --port 0``, learns each address from the ``LISTENING host:port``
line (see `esper.serving`), confirms SERVING through the standard health service, and stops
them in reverse order with SIGTERM (SIGKILL after a timeout). `esper-services` (esper.services_cli)
is its command line; `esper-train` can use it to bring up the services it needs.

`check_health` asks the health service of each named address and reports SERVING, NOT_SERVING
or UNREACHABLE with the reason; `load_addresses` reads a config file of ``name: host:port``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esper.serving.client import ChannelConfig, open_sync_channel
from esper.serving.process import ServerProcess, ServerStartError


@dataclass(frozen=True)
class StackOptions:
    """What the servers of a local stack are given."""

    state_dir: Path
    oona_backend: str = "memory://"
    host: str = "127.0.0.1"
    tezzeret_workers: int = 1
    log_level: str = "INFO"
    extra_args: Mapping[str, list[str]] = field(default_factory=dict)


ArgsBuilder = Callable[[StackOptions, Mapping[str, str]], list[str]]


@dataclass(frozen=True)
class ServiceSpec:
    """One server: its module, gRPC service name, the servers it needs, and its arguments."""

    name: str
    module: str
    grpc_service: str
    needs: tuple[str, ...] = ()
    optional: bool = False
    args: ArgsBuilder = lambda options, addresses: []


def _urza_args(options: StackOptions, addresses: Mapping[str, str]) -> list[str]:
    return ["--data-dir", str(options.state_dir / "urza")]


def _oona_args(options: StackOptions, addresses: Mapping[str, str]) -> list[str]:
    return ["--backend", options.oona_backend]


def _tezzeret_args(options: StackOptions, addresses: Mapping[str, str]) -> list[str]:
    args = ["--urza", addresses["urza"], "--workers", str(options.tezzeret_workers),
            "--work-dir", str(options.state_dir / "tezzeret")]
    if "oona" in addresses:
        args += ["--oona", addresses["oona"]]
    return args


def _tamiyo_args(options: StackOptions, addresses: Mapping[str, str]) -> list[str]:
    return ["--replay-dir", str(options.state_dir / "tamiyo")]


# Start order: a service starts after everything it needs.
SERVICES: dict[str, ServiceSpec] = {
    "urza": ServiceSpec("urza", "services.urza", "esper.v1.UrzaService", args=_urza_args),
    "oona": ServiceSpec("oona", "services.oona", "esper.v1.OonaService", args=_oona_args),
    "tezzeret": ServiceSpec("tezzeret", "services.tezzeret", "esper.v1.TezzeretService", needs=("urza",),
                            args=_tezzeret_args),
    "tamiyo": ServiceSpec("tamiyo", "services.tamiyo", "esper.v1.TamiyoService", optional=True,
                          args=_tamiyo_args),
}


def module_available(module: str) -> bool:
    """Whether ``python -m module`` can run here (its ``__main__`` exists)."""
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


class StackError(RuntimeError):
    """A service could not be started or did not become healthy."""


@dataclass
class RunningService:
    spec: ServiceSpec
    process: ServerProcess
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid


class LocalStack:
    """Start a set of servers as child processes; use as a context manager or `start()`/`stop()`.

    `names` defaults to every service whose module exists (optional ones are skipped when
    missing; a missing required one is an error). Logs go to ``state_dir/logs/<name>.log``.
    Without `state_dir` a temporary directory is used and deleted by `stop()`.
    """

    def __init__(self, names: Iterable[str] | None = None, *, state_dir: Path | None = None,
                 oona_backend: str = "memory://", tezzeret_workers: int = 1, log_level: str = "INFO",
                 start_timeout: float = 120.0, stop_timeout: float = 20.0,
                 extra_args: Mapping[str, list[str]] | None = None, die_with_parent: bool = False,
                 niceness: Mapping[str, int] | None = None):
        requested = list(names) if names is not None else list(SERVICES)
        unknown = [n for n in requested if n not in SERVICES]
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; expected some of {sorted(SERVICES)}")
        self._temp_dir = None if state_dir is not None else tempfile.mkdtemp(prefix="esper-services-")
        self.state_dir = Path(state_dir if state_dir is not None else self._temp_dir)
        self.options = StackOptions(state_dir=self.state_dir, oona_backend=oona_backend,
                                    tezzeret_workers=tezzeret_workers, log_level=log_level,
                                    extra_args=dict(extra_args or {}))
        self.skipped: list[str] = []
        self.specs: list[ServiceSpec] = []
        for name in SERVICES:  # SERVICES order is the start order
            if name not in requested:
                continue
            spec = SERVICES[name]
            missing = [n for n in spec.needs if n not in requested]
            if missing:
                raise ValueError(f"service {name!r} needs {missing}; add them to the services to start")
            if not module_available(spec.module):
                if spec.optional:
                    self.skipped.append(name)
                    continue
                raise StackError(f"service {name!r} needs module {spec.module}.__main__, which is not installed")
            self.specs.append(spec)
        self.die_with_parent = die_with_parent
        # Lower CPU priority per service (e.g. Tezzeret's compile workers next to a training process).
        self.niceness = dict(niceness or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.running: dict[str, RunningService] = {}

    @property
    def addresses(self) -> dict[str, str]:
        return {name: r.address for name, r in self.running.items()}

    def start(self) -> dict[str, str]:
        """Start every service in dependency order and wait until each reports SERVING."""
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            for spec in self.specs:
                self._start_one(spec)
        except BaseException:
            self.stop()
            raise
        return self.addresses

    def restart(self, name: str) -> str:
        """Stop service `name` if it still runs and start it again on the same port; its address."""
        running = self.running.get(name)
        if running is None:
            raise ValueError(f"service {name!r} is not part of this stack; expected one of {list(self.running)}")
        running.process.stop(timeout=self.stop_timeout)
        port = int(running.address.rpartition(":")[2])
        self._start_one(running.spec, port=port, append_log=True)
        return self.running[name].address

    def _start_one(self, spec: ServiceSpec, port: int = 0, append_log: bool = False) -> None:
        log_path = self.state_dir / "logs" / f"{spec.name}.log"
        if append_log and log_path.exists():  # keep the previous incarnation's log
            log_path.rename(log_path.with_suffix(f".{int(time.time())}.log"))
        argv = ["--host", self.options.host, "--port", str(port), "--log-level", self.options.log_level,
                *spec.args(self.options, self.addresses), *self.options.extra_args.get(spec.name, [])]
        command = [sys.executable, "-m", spec.module, *argv]
        # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which then stops
        # the servers in order (otherwise each would also get SIGINT and race our SIGTERM).
        # setsid(1) execs in place (the child is not a group leader), so the pid stays the server's.
        setsid = shutil.which("setsid")
        nice = shutil.which("nice")
        if self.niceness.get(spec.name) and nice:
            command = [nice, "-n", str(self.niceness[spec.name]), *command]
        process = ServerProcess([setsid, *command] if setsid else command, start_timeout=self.start_timeout,
                                stderr_path=log_path, die_with_parent=self.die_with_parent)
        try:
            address = process.start()
        except ServerStartError as exc:
            raise StackError(f"{spec.name} did not start: {exc}\n--- last lines of {log_path} ---\n"
                             f"{_tail(log_path)}") from exc
        self.running[spec.name] = RunningService(spec, process, address, log_path)
        status = check_one(spec.name, address, spec.grpc_service, timeout=10.0)
        if status.status != "SERVING":
            raise StackError(f"{spec.name} at {address} printed LISTENING but its health says {status.status}: "
                             f"{status.detail}")

    def exited(self) -> dict[str, int]:
        """Services whose process has ended, with the exit code (empty while all run)."""
        out = {}
        for name, r in self.running.items():
            assert r.process.process is not None
            code = r.process.process.poll()
            if code is not None:
                out[name] = code
        return out

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every service in reverse start order; returns exit codes."""
        codes: dict[str, int | None] = {}
        for name in reversed(list(self.running)):
            codes[name] = self.running[name].process.stop(timeout=self.stop_timeout)
        self.running.clear()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        return codes

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class HealthStatus:
    name: str
    address: str
    status: str  # SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN or UNREACHABLE
    detail: str = ""
    latency_ms: float = 0.0


def check_one(name: str, address: str, grpc_service: str = "", *, timeout: float = 3.0,
              channel_config: ChannelConfig | None = None) -> HealthStatus:
    """Health of one server: the named gRPC service when given (falls back to the server, "")."""
    config = channel_config or ChannelConfig(address)
    started = time.perf_counter()
    try:
        with open_sync_channel(config) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=grpc_service), timeout=timeout)
            except grpc.RpcError as err:
                if grpc_service and err.code() == grpc.StatusCode.NOT_FOUND:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                else:
                    raise
    except grpc.RpcError as err:
        return HealthStatus(name, address, "UNREACHABLE", f"{err.code().name}: {err.details()}")
    latency = (time.perf_counter() - started) * 1000
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthStatus(name, address, status, "", latency)


def check_health(addresses: Mapping[str, str], *, timeout: float = 3.0, auth_token: str | None = None,
                 tls_root_cert: Path | None = None, tls_server_name: str | None = None) -> list[HealthStatus]:
    """Health of each ``name -> host:port``; known names are checked on their own gRPC service."""
    out = []
    for name, address in addresses.items():
        spec = SERVICES.get(name)
        config = ChannelConfig(address, auth_token=auth_token, tls_root_cert=tls_root_cert,
                               tls_server_name=tls_server_name)
        out.append(check_one(name, address, spec.grpc_service if spec else "", timeout=timeout,
                             channel_config=config))
    return out


def validate_address(address: str, what: str) -> str:
    """``host:port`` with a numeric port in 1..65535, else ValueError naming `what`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected host:port (e.g. 127.0.0.1:50051), got {address!r}")
    return address


def load_addresses(path: Path) -> dict[str, str]:
    """Read ``name: host:port`` pairs from a YAML/JSON file, at the top level or under ``services:``.

    A value may also be a mapping with an ``address`` key.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read service addresses from {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("services"), dict):
        data = data["services"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of service name to host:port (optionally under 'services:')")
    out = {}
    for name, value in data.items():
        if isinstance(value, dict):
            value = value.get("address")
        if not isinstance(value, str):
            raise ValueError(f"{path}: service {name!r} needs an address string host:port, got {value!r}")
        out[str(name)] = validate_address(value, f"{path}: service {name!r}")
    return out
