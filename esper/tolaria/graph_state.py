"""What Tamiyo sees of a run: the `ModelGraphState` of its seed sites, and their output shapes.

One node per seed slot (its telemetry and lifecycle state, the width or depth growth its site
allows), edges in forward order between consecutive sites, and the run's training signals
(losses, accuracy trend, budgets left).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esper.kasmina.model_state import buffers_and_mode_kept
from esper.lifecycle import SeedLifecycleState as S
from esper.tolaria.hosts import count_parameters
from esper.v1 import common_pb2

IN_FLIGHT = frozenset({S.GERMINATED, S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING})


def probe_output_shapes(model: nn.Module, sites: list[tuple[str, Any]], input_shape: tuple[int, ...],
                        device: torch.device) -> dict[str, list[int]]:
    """Each seed site's output shape (batch dimension -1), from one forward pass of zeros that
    leaves the model's buffers (normalisation statistics) and mode as they were."""
    shapes: dict[str, list[int]] = {}
    hooks = [layer.register_forward_hook(
        lambda mod, args, out, name=name: shapes.__setitem__(name, [-1, *out.shape[1:]]))
        for name, layer in sites]
    try:
        with buffers_and_mode_kept(model), torch.no_grad():
            model.eval()
            model(torch.zeros((2, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def model_graph_state(morph: Any, epoch: int, global_step: int, total_epochs: int, train_loss: float,
                      val_loss: float, val_acc: float, history: list[float]) -> common_pb2.ModelGraphState:
    """The ModelGraphState of `morph` (a `Morphogenesis`) at an epoch boundary: one node per seed
    slot, edges in forward order."""
    msg = common_pb2.ModelGraphState(run_id=morph.run_id)
    previous: list[str] = []
    for depth, (name, layer) in enumerate(morph.driver.sites):
        kind = type(layer.host).__name__.lower()
        current = []
        for row in layer.seed_table():
            node_id = f"{name}[{row.seed}]"
            node = msg.nodes.add(node_id=node_id, layer_name=name, layer_kind=kind, depth=depth)
            node.seed.CopyFrom(row.to_proto())
            node.output_shape.dims.extend(morph.output_shapes.get(name, []))
            width = morph.growth.width_site(name) if morph.growth is not None else None
            if width is not None:
                node.width.CopyFrom(width)
            deepen = morph.growth.depth_site(name) if morph.growth is not None else None
            if deepen is not None:
                node.deepen.CopyFrom(deepen)
            current.append(node_id)
        for src in previous:
            for dst in current:
                msg.edges.add(source_node_id=src, target_node_id=dst)
        previous = current
    params = count_parameters(morph.model)
    flops = morph.eval_flops_per_sample()
    ctl = morph.cfg.controller
    param_frac = (params - morph.params_initial) / max(1e-12, ctl.parameter_budget * morph.params_initial)
    flop_frac = (flops - morph.flops_initial) / max(1e-12, ctl.compute_budget * morph.flops_initial)
    sig = msg.signals
    sig.epoch = epoch
    sig.total_epochs = total_epochs
    sig.global_step = global_step
    sig.train_loss = train_loss
    sig.val_loss = val_loss
    sig.val_accuracy = val_acc
    sig.val_loss_history.extend(history)
    sig.parameter_count = params
    sig.initial_parameter_count = morph.params_initial
    sig.initial_flops_per_sample = float(morph.flops_initial)
    sig.val_accuracy_history.extend(morph.accuracy_history)
    sig.parameter_budget_left = min(1.0, max(0.0, 1.0 - param_frac))
    sig.compute_budget_left = min(1.0, max(0.0, 1.0 - flop_frac))
    sig.parameter_budget = ctl.parameter_budget
    sig.compute_budget = ctl.compute_budget
    sig.active_adaptations = sum(1 for _, layer in morph.driver.sites for i in range(layer.num_seeds)
                                 if layer.state_of(i) in IN_FLIGHT)
    msg.create_time.GetCurrentTime()
    return msg
