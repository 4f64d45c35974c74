"""The GNN policy: safetensors + manifest round trip, refusals, deterministic decisions with reasons,
and the safety rails bounding a policy that always wants to grow."""

from __future__ import annotations

import json

import pytest
import torch

from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.gnn_policy import GNNPolicy
from esper.tamiyo.graph import FEATURE_SCHEMA
from esper.tamiyo.policy import RailsConfig
from esper.tamiyo.policy_store import MANIFEST, PolicyLoadError, load_policy
from esper.tamiyo.rails import Controller, SafetyRails
from esper.v1 import common_pb2
from tests.tamiyo.policy_helpers import always_grow_gnn, chain_graph, untrained_gnn, write_policy

GERMINATE = common_pb2.DECISION_ACTION_GERMINATE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_save_load_round_trip(tmp_path):
    model = untrained_gnn(seed=3)
    manifest = write_policy(tmp_path / "p", model)
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == [MANIFEST, manifest["weights_file"]] and manifest["weights_file"].endswith(".safetensors")
    loaded = load_policy(tmp_path / "p")
    assert loaded.version == manifest["version"]
    assert loaded.manifest["feature_schema"] == FEATURE_SCHEMA == "tamiyo-graph/3"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    rails = RailsConfig(parameter_budget=2.0, compute_budget=2.0)
    a = GNNPolicy(loaded, rails).decide(chain_graph())[0]
    b = GNNPolicy(load_policy(tmp_path / "p"), rails).decide(chain_graph())[0]
    assert (a.action, a.layer_name, a.blueprint_id, a.confidence) == (b.action, b.layer_name, b.blueprint_id,
                                                                      b.confidence)


def _edit_manifest(directory, **changes):
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_refuses_mismatched_schema_layout_and_corruption(tmp_path):
    write_policy(tmp_path / "p")
    _edit_manifest(tmp_path / "p", feature_schema="tamiyo-graph/0")
    with pytest.raises(PolicyLoadError, match=r"feature schema 'tamiyo-graph/0'.*builds 'tamiyo-graph/3'"):
        load_policy(tmp_path / "p")
    manifest = write_policy(tmp_path / "q")
    _edit_manifest(tmp_path / "q", actions=manifest["actions"][:-1])
    with pytest.raises(PolicyLoadError, match="actions"):
        load_policy(tmp_path / "q")
    manifest = write_policy(tmp_path / "r")
    weights = tmp_path / "r" / manifest["weights_file"]
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PolicyLoadError, match="weights_sha256"):
        load_policy(tmp_path / "r")
    with pytest.raises(PolicyLoadError, match="no manifest.json"):
        load_policy(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(PolicyLoadError, match="expected 'esper-tamiyo-policy/1'"):
        load_policy(tmp_path / "s")


def test_decisions_are_deterministic_and_explained(tmp_path):
    write_policy(tmp_path / "p", untrained_gnn(seed=1))
    policy = GNNPolicy(load_policy(tmp_path / "p"), RailsConfig(parameter_budget=2.0, compute_budget=2.0))
    graph = chain_graph(states=(S.DORMANT, S.TRAINING, S.DORMANT))
    first = [policy.decide(graph)[0] for _ in range(3)]
    assert len({(d.action, d.layer_name, d.blueprint_id, round(d.confidence, 9)) for d in first}) == 1
    d = first[0]
    assert 0.0 < d.confidence <= 1.0 and d.policy_version == policy.version
    assert d.reason.startswith(f"gnn {policy.version}: ") and "driven by " in d.reason
    # The reason names features from the schema, e.g. "hidden.1[0].dead_fraction=0.1 (+0.02)".
    drivers = d.reason.split("driven by ", 1)[1].split(", ")
    assert len(drivers) == 3 and all("=" in x and ("global." in x or "hidden." in x) for x in drivers)


def test_rails_bound_a_policy_that_always_wants_to_grow(tmp_path):
    write_policy(tmp_path / "p", always_grow_gnn())
    rails_cfg = RailsConfig(cooldown_epochs=2, max_concurrent=1, max_adaptations=2, parameter_budget=2.0,
                            compute_budget=2.0)
    policy = GNNPolicy(load_policy(tmp_path / "p"), rails_cfg)
    controller = Controller(policy, SafetyRails(rails_cfg, 20_000.0))
    raw = policy.decide(chain_graph())[0]
    # All probability on growing residual_mlp, shared by the three free sites.
    assert raw.action == GERMINATE and raw.blueprint_id == "residual_mlp" and raw.confidence == pytest.approx(1 / 3, abs=1e-4)
    states = [S.DORMANT, S.DORMANT, S.DORMANT]
    grown_at: dict[int, int] = {}
    grown, held = [], []
    for epoch in range(1, 11):
        for slot, at in grown_at.items():  # a seed is in flight for 3 epochs, then fossilized
            if epoch - at >= 3:
                states[slot] = S.FOSSILIZED
        graph = chain_graph(states=tuple(states), epoch=epoch)
        graph.signals.active_adaptations = sum(s == S.TRAINING for s in states)
        (d,) = controller.decide(graph)
        if d.action == GERMINATE:
            grown.append(epoch)
            slot = int(d.layer_name.split(".")[1])
            states[slot] = S.TRAINING
            grown_at[slot] = epoch
        else:
            held.append(d.reason)
    # The policy wanted to grow at every epoch; cooldown 2, max_concurrent 1 and max_adaptations 2 held it to:
    assert grown == [1, 4]
    assert [r.split(" (")[0].split(":")[0] for r in held[:2]] == ["rail", "rail"]
    assert "cooldown" in held[0] and "adaptations in flight" in held[1]
    assert all("max_adaptations 2 reached" in r for r in held[4:])


def test_flat_distribution_sums_to_one_per_graph_and_respects_the_mask():
    from torch_geometric.data import Batch

    from esper.tamiyo.gnn import flat_log_probs
    from esper.tamiyo.graph import graph_to_data

    model = untrained_gnn(seed=2)
    graphs = [graph_to_data(chain_graph(states=(S.DORMANT, S.TRAINING))), graph_to_data(chain_graph())]
    for g in graphs:
        del g.node_keys
    batch = Batch.from_data_list(graphs)
    scores, value = model(batch.x, batch.edge_index, batch.edge_index_reverse, batch.u, batch.batch, 2)
    node_logp, wait_logp = flat_log_probs(scores, batch.mask, batch.batch, 2)
    assert value.shape == (2,)
    for g in range(2):
        rows = batch.batch == g
        total = node_logp[rows].exp().sum() + wait_logp[g].exp()
        assert total.item() == pytest.approx(1.0, abs=1e-5)
    illegal = ~batch.mask
    illegal[:, 0] = True  # the wait column is carried by wait_logp
    assert torch.all(node_logp[illegal] == float("-inf"))
