"""What the Tamiyo server does, without gRPC: per-run controllers, the replay buffer, policy info.

`TamiyoCore` keeps one `Controller` (the heuristic policy behind the safety rails, the same code
Tolaria runs in-process with ``services.mode: off``) per run id, because the rails carry per-run
state (cooldown, adaptation count). That state is kept next to the replay buffer
(``<replay dir>/controllers/<hash of run id>.json``, written atomically whenever a decision changes
it: when a germination passes the rails), so a restarted Tamiyo keeps a run's cooldown and
adaptation count. The policy knobs come from a `PolicySettings` (the
``controller`` section of a Tolaria config, passed to ``esper-tamiyo --policy-config``); the host's
FLOPs, which the compute budget is measured in, come with every graph
(`TrainingSignals.initial_flops_per_sample`). `PolicySettings` is defined in `esper.tamiyo.settings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from esper.errors import InvalidArgumentError
from esper.tamiyo.heuristic import VERSION
from esper.tamiyo.rails import Controller, SafetyRails
from esper.tamiyo.replay import ReplayBuffer
from esper.tamiyo.settings import PolicySettings
from esper.v1 import common_pb2

log = logging.getLogger("esper.tamiyo")


class TamiyoCore:
    """Per-run controllers over one policy configuration, plus the replay buffer."""

    def __init__(self, settings: PolicySettings, replay_dir: Path | str):
        self.settings = settings
        self.replay = ReplayBuffer(replay_dir)
        self.state_dir = Path(replay_dir) / "controllers"
        self._controllers: dict[str, Controller] = {}
        self._saved: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # Decisions returned since start, by DecisionAction name (for monitoring).
        self.decisions_by_action: dict[str, int] = {}
        # A learned policy is loaded once and shared by every run's controller; `reload_policy`
        # replaces it when a newer version appears at policy_path (hot swap, no restart).
        self.loaded = None
        self.policy_swaps = 0
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if settings.policy == "gnn":
            from esper.tamiyo.policy_source import load_policy_ref

            self.loaded = load_policy_ref(settings.policy_path)

    @property
    def version(self) -> str:
        if self.loaded is not None:
            return self.loaded.version
        if self.settings.policy == "random":
            from esper.tamiyo.exploration import RANDOM_VERSION

            return RANDOM_VERSION
        return VERSION

    @property
    def uses_torch(self) -> bool:
        """Decisions run a network (keep them off the event loop)."""
        return self.loaded is not None

    def policy_info(self) -> dict[str, Any]:
        """Kind, version, source, swap count and feature schema of the policy in force."""
        loaded = self.loaded
        return {"kind": self.settings.policy, "version": self.version,
                "source": loaded.source if loaded is not None else "", "swaps": self.policy_swaps,
                "feature_schema": loaded.manifest["feature_schema"] if loaded is not None else ""}

    def reload_policy(self) -> bool:
        """Loads the policy at policy_path (a directory, or a name in Urza: its newest version unless
        pinned) if its version differs from the one in force and swaps every run's controller to it
        (rails state kept). A policy that fails to load is logged and the current one stays. True
        when a swap happened."""
        if self.loaded is None:
            return False
        from esper.tamiyo.policy_source import current_version, load_policy_ref
        from esper.tamiyo.policy_store import PolicyLoadError

        version = current_version(self.settings.policy_path)
        if version is None or version == self.loaded.version:
            return False
        try:
            new = load_policy_ref(self.settings.policy_path)
        except PolicyLoadError as exc:
            log.error("policy %s at %s not loaded, keeping %s: %s", version, self.settings.policy_path,
                      self.loaded.version, exc)
            return False
        from esper.tamiyo.exploration import GrowthSpace
        from esper.tamiyo.gnn_policy import GNNPolicy

        with self._lock:
            old = self.loaded.version
            self.loaded = new
            for controller in self._controllers.values():
                controller.policy = GNNPolicy(new, controller.rails.cfg, GrowthSpace.of(self.settings))
            self.policy_swaps += 1
        log.info("policy swapped: %s -> %s (%s)", old, new.version, self.settings.policy_path)
        return True

    def watch_policy(self, interval_s: float) -> None:
        """Checks policy_path for a newer version every `interval_s` seconds in a daemon thread."""
        if self.loaded is None or interval_s <= 0 or self._watcher is not None:
            return

        def loop() -> None:
            while not self._watch_stop.wait(interval_s):
                try:
                    self.reload_policy()
                except Exception:  # the watcher must outlive any one bad read
                    log.exception("policy watcher")

        self._watcher = threading.Thread(target=loop, name="tamiyo-policy-watch", daemon=True)
        self._watcher.start()

    def controller_for(self, run_id: str, host_flops: float) -> Controller:
        with self._lock:
            controller = self._controllers.get(run_id)
            if controller is None:
                controller = self.settings.controller(host_flops, self.loaded)
                saved = self._load_state(run_id)
                if saved is not None:
                    controller.rails.load_state_dict(saved)
                    self._saved[run_id] = saved
                self._controllers[run_id] = controller
            return controller

    def _state_path(self, run_id: str) -> Path:
        return self.state_dir / f"{hashlib.sha256(run_id.encode()).hexdigest()[:24]}.json"

    def _load_state(self, run_id: str) -> dict[str, Any] | None:
        path = self._state_path(run_id)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("controller state of run %r at %s is unreadable (%s); starting it afresh", run_id, path, exc)
            return None
        if record.get("run_id") != run_id:
            return None
        return record["state"]

    def _save_state(self, run_id: str, controller: Controller) -> None:
        """Write the run's rails state if a decision changed it (atomic, fsynced: only when a
        germination passes the rails, not at every Decide)."""
        state = controller.rails.state_dict()
        if self._saved.get(run_id) == state:
            return
        from esper.durable import fsync_dir, write_json_atomic

        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._state_path(run_id), {"run_id": run_id, "state": state})
        fsync_dir(self.state_dir)
        self._saved[run_id] = state

    def decide(self, graph: common_pb2.ModelGraphState) -> list[common_pb2.AdaptationDecision]:
        """Decisions for one epoch boundary of run `graph.run_id` (rails applied)."""
        if not graph.run_id:
            raise InvalidArgumentError("graph.run_id is empty; expected the id of the training run",
                                       field="graph.run_id")
        if graph.signals.initial_flops_per_sample <= 0:
            raise InvalidArgumentError(
                "graph.signals.initial_flops_per_sample must be > 0 (the host's forward FLOPs per sample, "
                "the unit of the compute budget)", field="graph.signals.initial_flops_per_sample")
        for node in graph.nodes:
            if node.seed.chunk_size <= 0:
                raise InvalidArgumentError(f"graph node {node.node_id!r} has chunk_size {node.seed.chunk_size}; "
                                           "expected > 0", field="graph.nodes.seed.chunk_size")
        controller = self.controller_for(graph.run_id, graph.signals.initial_flops_per_sample)
        with self._lock:  # rails state is per run but Decide calls for one run may overlap
            decisions = controller.decide(graph)
            self._save_state(graph.run_id, controller)
            for d in decisions:
                name = common_pb2.DecisionAction.Name(d.action)
                self.decisions_by_action[name] = self.decisions_by_action.get(name, 0) + 1
            return decisions

    def report(self, report: common_pb2.FieldReport) -> tuple[str, int]:
        """Appends a field report durably; (report id, buffer size)."""
        if not report.decision.decision_id:
            raise InvalidArgumentError("report.decision.decision_id is empty; expected the decision reported on",
                                       field="report.decision.decision_id")
        if report.outcome == common_pb2.ADAPTATION_OUTCOME_UNSPECIFIED:
            raise InvalidArgumentError("report.outcome is ADAPTATION_OUTCOME_UNSPECIFIED; expected an outcome",
                                       field="report.outcome")
        stored = common_pb2.FieldReport()
        stored.CopyFrom(report)
        if not stored.report_id:
            stored.report_id = uuid.uuid4().hex
        if not stored.HasField("create_time"):
            stored.create_time.GetCurrentTime()
        size = self.replay.append(stored)
        if stored.outcome == common_pb2.ADAPTATION_OUTCOME_SERVICE_UNAVAILABLE and stored.run_id:
            self._give_back(stored.run_id, stored.decision.decision_id)
        return stored.report_id, size

    def _give_back(self, run_id: str, decision_id: str) -> None:
        """An outage cancelled this germination: it no longer counts against max_adaptations."""
        with self._lock:
            controller = self._controllers.get(run_id)
            if controller is not None:
                if controller.rails.give_back(decision_id):
                    self._save_state(run_id, controller)
                return
            saved = self._load_state(run_id)
            if saved is None:
                return  # no rails state for this run: nothing was counted here
            rails = SafetyRails(self.settings.rails(), 1.0)  # host FLOPs do not matter to the count
            rails.load_state_dict(saved)
            if rails.give_back(decision_id):
                from esper.durable import write_json_atomic

                write_json_atomic(self._state_path(run_id), {"run_id": run_id, "state": rails.state_dict()})

    def warm_up(self) -> None:
        """One throwaway decision so the first real Decide does not pay for imports (blueprint costs)."""
        from esper.lifecycle import SeedLifecycleState

        graph = common_pb2.ModelGraphState(run_id="warm-up")
        node = graph.nodes.add(node_id="warm[0]", layer_name="warm", layer_kind="linear")
        node.output_shape.dims.extend([-1, 8])
        node.seed.state = int(SeedLifecycleState.DORMANT)
        node.seed.chunk_size = 8
        graph.signals.epoch = 5
        graph.signals.val_loss_history.extend([1.0, 1.0, 1.0])
        graph.signals.initial_parameter_count = 1000
        graph.signals.parameter_budget_left = 1.0
        graph.signals.compute_budget_left = 1.0
        self.settings.controller(1000.0, self.loaded).decide(graph)

    def rails_info(self) -> dict[str, str]:
        r = self.settings.rails()
        return {k: str(v) for k, v in dataclasses.asdict(r).items()}

    def close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
        self.replay.close()
