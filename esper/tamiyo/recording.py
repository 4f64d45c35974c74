"""Field reports of a whole run: every decision with the graph it was made on, its outcome, cost and reward.

`RecordingController` wraps the controller of a run (policy + rails) and keeps, per epoch
boundary, the graph and the decision that was executed (after the rails). When the run has
ended, `field_reports` pairs each decision with what happened to it (the run's adaptation
records: outcome, counterfactual contribution, the epoch it resolved) and scores it with
`esper.tamiyo.reward`. WAITs are reported too (reward 0): they are the reference action. A
germination Tolaria refused (too late to finish its lifecycle) is reported as CANCELLED, reward 0.
Given a `reference` policy (collection passes the run's heuristic), every report also carries
what that policy would have decided on the same graph (`FieldReport.reference_decision`), before
the rails: the rails apply alike to every policy when it is served, so the reference is the
policy's own choice. It is asked on a graph copy and never executed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from esper.tamiyo.costs import cost_of, decision_cost
from esper.tamiyo.policy import Action, AdaptationDecision, ModelGraphState
from esper.tamiyo.reward import (
    REWARD_DEFINITION,
    cull_reward,
    germinate_reward,
    run_host_flops,
    seed_flop_cost,
)
from esper.v1 import common_pb2

OUTCOME_CODES = {
    "fossilized": common_pb2.ADAPTATION_OUTCOME_FOSSILIZED,
    "culled": common_pb2.ADAPTATION_OUTCOME_CULLED,
    "cancelled": common_pb2.ADAPTATION_OUTCOME_CANCELLED,
    "rolled_back": common_pb2.ADAPTATION_OUTCOME_ROLLED_BACK,
    "compile_failed": common_pb2.ADAPTATION_OUTCOME_COMPILE_FAILED,
}


@dataclass
class Recorded:
    graph: ModelGraphState
    decision: AdaptationDecision
    behavior_probability: float
    reference: AdaptationDecision | None = None


class RecordingController:
    """A controller that remembers what it decided on which graph (see the module docstring)."""

    def __init__(self, inner: Any, reference: Any = None) -> None:
        self.inner = inner
        self.reference = reference
        self.records: list[Recorded] = []

    @property
    def policy(self) -> Any:
        return self.inner.policy

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        decisions = self.inner.decide(state)
        probs = getattr(self.inner.policy, "probability_of", {})
        executed = [d for d in decisions if d.action != Action.DECISION_ACTION_WAIT] or decisions[:1]
        reference = None
        if self.reference is not None:
            seen = ModelGraphState()
            seen.CopyFrom(state)
            reference = self.reference.decide(seen)[0]
        for d in executed:
            graph = ModelGraphState()
            graph.CopyFrom(state)
            # A rail that turned a policy's choice into WAIT issued a new decision: its probability is unknown.
            p = probs.get(d.decision_id, 0.0)
            self.records.append(Recorded(graph, d, p, reference))
        return decisions

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def field_reports(records: list[Recorded], summary: dict[str, Any], *, train_samples: int, val_samples: int,
                  total_epochs: int) -> list[common_pb2.FieldReport]:
    """One FieldReport per recorded decision, scored from the run's `summary` (Trainer.summary)."""
    host_flops = float(summary["flops"]["forward_per_sample_initial"])
    host_run = run_host_flops(host_flops, total_epochs, train_samples, val_samples)
    adaptations = {(a["epoch"], a["layer"], a["seed"]): a for a in summary["adaptations"]}
    out = []
    for rec in records:
        d, graph = rec.decision, rec.graph
        epoch = graph.signals.epoch
        report = common_pb2.FieldReport(run_id=graph.run_id, decision=d, epoch=epoch,
                                        reward_definition=REWARD_DEFINITION,
                                        behavior_probability=rec.behavior_probability, run_host_flops=host_run)
        report.graph.CopyFrom(graph)
        report.signals_before.CopyFrom(graph.signals)
        if rec.reference is not None:
            report.reference_decision.CopyFrom(rec.reference)
        node = next((n for n in graph.nodes if n.layer_name == d.layer_name and n.seed.seed_index == d.seed_index),
                    None)
        if node is not None:
            report.telemetry_before.CopyFrom(node.seed.telemetry)
        if d.action == Action.DECISION_ACTION_GERMINATE and node is not None:
            record = adaptations.get((epoch, d.layer_name, d.seed_index))
            if record is None:
                # Tolaria refused it (a seed that could not finish its lifecycle in the steps left):
                # nothing was grown or spent, so it scores like a WAIT, as a cancelled adaptation.
                report.outcome = common_pb2.ADAPTATION_OUTCOME_CANCELLED
                report.reward = 0.0
                report.create_time.GetCurrentTime()
                out.append(report)
                continue
            outcome = record["outcome"]
            end = float(record.get("resolved_epoch") or total_epochs)
            cost = decision_cost(node, d)  # branch, width (units) or depth (one block)
            seed_flops = float(cost.flops) if cost is not None else 0.0
            flop_cost = seed_flop_cost(seed_flops, end - (epoch - 1), train_samples, val_samples)
            contribution = record.get("contribution")
            report.outcome = OUTCOME_CODES.get(outcome, common_pb2.ADAPTATION_OUTCOME_PENDING)
            if contribution is not None and math.isfinite(contribution):
                report.contribution = float(contribution)
            report.flop_cost = flop_cost
            report.reward = germinate_reward(contribution, flop_cost, host_run, outcome)
        elif d.action == Action.DECISION_ACTION_CULL and node is not None:
            seed_flops = _live_seed_flops(node)
            saved = seed_flop_cost(seed_flops, total_epochs - epoch + 1, train_samples, val_samples)
            c = node.seed.last_contribution if node.seed.has_contribution else None
            report.outcome = common_pb2.ADAPTATION_OUTCOME_CULLED
            report.contribution = c or 0.0
            report.flop_cost = -saved
            report.reward = cull_reward(c, saved, host_run)
        else:
            # A WAIT starts no adaptation, so nothing ever resolves it: it stays PENDING, reward 0.
            report.outcome = common_pb2.ADAPTATION_OUTCOME_PENDING
            report.reward = 0.0
        report.create_time.GetCurrentTime()
        out.append(report)
    return out


def _live_seed_flops(node: common_pb2.GraphNode) -> float:
    cost = cost_of(node, node.seed.blueprint_id) if node.seed.blueprint_id else None
    return float(cost.flops) if cost is not None else 0.0
