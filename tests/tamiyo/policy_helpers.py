"""Builders shared by the Tamiyo policy tests: graphs, untrained GNN policies on disk, a real run's graph."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.gnn import Architecture, TamiyoGNN
from esper.tamiyo.graph import WAIT, action_names, global_feature_names, node_feature_names
from esper.tamiyo.policy_store import save_policy
from esper.v1 import common_pb2


def chain_graph(states=(S.DORMANT, S.DORMANT, S.DORMANT), epoch=3, run_id="t", width=32,
                budget_left=1.0) -> common_pb2.ModelGraphState:
    """A chain of linear sites hidden.0 -> hidden.1 -> ..., one seed each."""
    msg = common_pb2.ModelGraphState(run_id=run_id)
    for i, state in enumerate(states):
        node = msg.nodes.add(node_id=f"hidden.{i}[0]", layer_name=f"hidden.{i}", layer_kind="linear", depth=i)
        node.output_shape.dims.extend([-1, width])
        node.seed.layer_name = f"hidden.{i}"
        node.seed.state = int(state)
        node.seed.chunk_size = width
        node.seed.telemetry.gradient_norm = 0.1 * (i + 1)
        node.seed.telemetry.dead_fraction = 0.1 * i
        if i:
            msg.edges.add(source_node_id=f"hidden.{i - 1}[0]", target_node_id=f"hidden.{i}[0]")
    sig = msg.signals
    sig.epoch, sig.total_epochs = epoch, 12
    sig.val_loss_history.extend([1.0, 0.9, 0.89][:epoch])
    sig.val_accuracy_history.extend([0.5, 0.6, 0.61][:epoch])
    sig.initial_parameter_count = 10_000
    sig.initial_flops_per_sample = 20_000.0
    sig.parameter_budget_left = budget_left
    sig.compute_budget_left = budget_left
    sig.parameter_budget = 2.0
    sig.compute_budget = 2.0
    return msg


def untrained_gnn(seed: int = 0, hidden: int = 16, layers: int = 2) -> TamiyoGNN:
    torch.manual_seed(seed)
    arch = Architecture(node_features=len(node_feature_names()), global_features=len(global_feature_names()),
                        actions=len(action_names()), hidden=hidden, layers=layers)
    return TamiyoGNN(arch).eval()


def always_grow_gnn(blueprint: str = "residual_mlp", action: str = "") -> TamiyoGNN:
    """A network whose scores make growing with `blueprint` (or the named `action`, e.g.
    "grow:width") overwhelmingly likely wherever it is legal."""
    model = untrained_gnn()
    last = model.node_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-50.0)
        last.bias[action_names().index(action or f"grow:branch:{blueprint}")] = 50.0
        last.bias[WAIT] = -50.0
    return model


def with_growth_sites(msg: common_pb2.ModelGraphState, units: int = 32, depth_available: bool = True
                      ) -> common_pb2.ModelGraphState:
    """`msg` with a width pair (narrow: `units` < 64 in and out) and a deepen site at every node."""
    for node in msg.nodes:
        node.width.units, node.width.input_dim, node.width.output_dim = units, 64, 64
        node.width.unit_parameters, node.width.unit_flops, node.width.available = 129, 256, True
        node.deepen.block_parameters, node.deepen.block_flops = 1056, 2048
        node.deepen.available = depth_available
    return msg


def write_policy(directory: Path, model: TamiyoGNN | None = None, version: str | None = None) -> dict:
    return save_policy(directory, model if model is not None else untrained_gnn(), training_data_sha256="0" * 64,
                       training={"method": "test"}, metrics={"note": 1.0}, version=version)
