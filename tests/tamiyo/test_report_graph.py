"""The remote controller's field reports carry the graph the decision was made on, across a checkpoint."""

from __future__ import annotations

from esper.tolaria.adaptation.records import Adaptation
from esper.tolaria.adaptation.reporting import field_report
from esper.v1 import common_pb2
from tests.tamiyo.policy_helpers import chain_graph


def test_adaptation_keeps_its_graph_through_a_checkpoint_and_reports_it():
    graph = chain_graph(run_id="run-r", epoch=4)
    decision = common_pb2.AdaptationDecision(decision_id="d1", action=common_pb2.DECISION_ACTION_GERMINATE,
                                             layer_name="hidden.1", blueprint_id="residual_mlp")
    adaptation = Adaptation("hidden.1", 0, "k1", "residual_mlp", decision, 0.0, 7,
                            graph.nodes[1].seed.telemetry, graph.signals, graph_before=graph)
    restored = Adaptation.from_dict(adaptation.to_dict())
    assert restored.graph_before == graph
    report = field_report("run-r", restored, common_pb2.ADAPTATION_OUTCOME_FOSSILIZED, 6, None)
    assert report.graph == graph and report.signals_before == graph.signals
    # A checkpoint written before graphs were kept still restores (with an empty graph).
    old = adaptation.to_dict()
    del old["graph_before"]
    assert Adaptation.from_dict(old).graph_before == common_pb2.ModelGraphState()
