"""ModelGraphState -> torch_geometric Data: on a real wrapped model, and its legality mask."""

from __future__ import annotations

import pytest
import torch

from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.graph import (
    CULL,
    FIRST_GROW,
    WAIT,
    GraphError,
    action_names,
    global_feature_names,
    graph_to_data,
    node_feature_names,
)
from esper.tolaria.config import load_config
from esper.tolaria.trainer import Trainer
from tests.tamiyo.policy_helpers import chain_graph


def test_graph_of_a_real_wrapped_model(tmp_path):
    cfg = load_config("configs/development.yaml", ["services.mode=off", "model.depth=3", "seeds.num_seeds=2",
                                                    "train.torch_threads=1"])
    trainer = Trainer(cfg, tmp_path / "run", progress="none")
    trainer.prepare()
    state = trainer.morph.graph_state(epoch=2, global_step=10, total_epochs=12, train_loss=1.0, val_loss=1.1,
                                      val_acc=0.6, history=[1.3, 1.1])
    data = graph_to_data(state)
    names = node_feature_names()
    # One node per seed slot (3 hidden layers x 2 seeds), edges from every seed of layer k to every seed of k+1.
    assert data.num_nodes == 6 and data.x.shape == (6, len(names))
    assert data.u.shape == (1, len(global_feature_names()))
    assert data.node_keys == [(f"hidden.{i}", s) for i in range(3) for s in range(2)]
    pairs = set(map(tuple, data.edge_index.t().tolist()))
    assert pairs == {(a, b) for layer in range(2) for a in (2 * layer, 2 * layer + 1)
                     for b in (2 * layer + 2, 2 * layer + 3)}
    assert torch.equal(data.edge_index_reverse, data.edge_index.flip(0))
    col = {n: i for i, n in enumerate(names)}
    assert torch.all(data.x[:, col["state_dormant"]] == 1.0)
    assert torch.all(data.x[:, col["kind_linear"]] == 1.0)
    assert data.x[:, col["depth_fraction"]].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    # The host's real budget (2x in development.yaml) is carried by the graph: every fitting blueprint is legal.
    assert state.signals.parameter_budget == 2.0 and state.signals.initial_flops_per_sample > 0
    assert data.mask[:, WAIT].all() and not data.mask[:, CULL].any()
    assert data.mask[:, FIRST_GROW + action_names()[FIRST_GROW:].index("grow:branch:residual_mlp")].all()
    assert not data.mask[:, FIRST_GROW + action_names()[FIRST_GROW:].index("grow:branch:conv3x3")].any()
    # Pure: the same message gives the same tensors.
    again = graph_to_data(state)
    assert torch.equal(again.x, data.x) and torch.equal(again.u, data.u) and torch.equal(again.mask, data.mask)


def test_mask_follows_lifecycle_and_budget():
    data = graph_to_data(chain_graph(states=(S.DORMANT, S.TRAINING, S.FOSSILIZED)))
    grow = data.mask[:, FIRST_GROW:]
    assert grow[0].any() and not grow[1].any() and not grow[2].any()
    assert data.mask[:, CULL].tolist() == [False, True, False]
    # No budget left: nothing may grow, and the in-budget features say so.
    broke = graph_to_data(chain_graph(budget_left=0.0))
    assert not broke.mask[:, FIRST_GROW:].any()
    in_budget = [i for i, n in enumerate(node_feature_names()) if n.endswith(":in_budget")]
    assert broke.x[:, in_budget].sum() == 0 and data.x[0, in_budget].sum() > 0
    # Only allowed blueprints may grow.
    only = graph_to_data(chain_graph(), allowed_blueprints=("norm_mlp",))
    legal = {action_names()[c] for c in only.mask[0].nonzero().flatten().tolist()}
    assert legal == {"wait", "grow:branch:norm_mlp"}


def test_bad_graphs_are_refused():
    empty = chain_graph(states=())
    with pytest.raises(GraphError, match="graph.nodes is empty"):
        graph_to_data(empty)
    dangling = chain_graph()
    dangling.edges.add(source_node_id="hidden.2[0]", target_node_id="nowhere[0]")
    with pytest.raises(GraphError, match="nowhere"):
        graph_to_data(dangling)
