"""The Tamiyo graph network: per-node action scores and a value over a model graph.

    node encoder   MLP of the node features, plus an encoding of the global features
    message passing `layers` x (SAGEConv along the data flow + SAGEConv against it), each with
                   a LayerNorm and a residual connection (so depth never hurts the identity path)
    pooling        mean and max of the node embeddings with the global encoding -> graph embedding
    heads          per node: [wait, cull, grow(mode, blueprint)...] scores from (node, graph)
                   embeddings; per graph: a value
The policy's distribution over a graph is one softmax over every legal (node, grow/cull) entry
plus a single WAIT whose score is the mean of the nodes' wait scores (`flat_log_probs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch_geometric.nn import SAGEConv, global_max_pool, global_mean_pool
from torch_geometric.utils import scatter

from esper.tamiyo.graph import WAIT


@dataclass(frozen=True)
class Architecture:
    """Shapes of a `TamiyoGNN`; stored in the policy manifest."""

    node_features: int
    global_features: int
    actions: int
    hidden: int = 64
    layers: int = 3

    def __post_init__(self) -> None:
        if not 2 <= self.layers <= 4:
            raise ValueError(f"Architecture.layers must be 2..4 message-passing layers, got {self.layers}")
        if self.hidden < 4:
            raise ValueError(f"Architecture.hidden must be >= 4, got {self.hidden}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class TamiyoGNN(nn.Module):
    """See the module docstring."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        h = arch.hidden
        self.node_encoder = nn.Sequential(nn.Linear(arch.node_features, h), nn.ReLU(), nn.Linear(h, h))
        self.global_encoder = nn.Sequential(nn.Linear(arch.global_features, h), nn.ReLU())
        self.forward_convs = nn.ModuleList(SAGEConv(h, h) for _ in range(arch.layers))
        self.backward_convs = nn.ModuleList(SAGEConv(h, h) for _ in range(arch.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(arch.layers))
        self.graph_head = nn.Sequential(nn.Linear(3 * h, h), nn.ReLU())
        self.node_head = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, arch.actions))
        self.value_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_index_reverse: torch.Tensor,
                u: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(node scores [N, actions], value [num_graphs])."""
        g = self.global_encoder(u)
        hnode = self.node_encoder(x) + g[batch]
        for fwd, bwd, norm in zip(self.forward_convs, self.backward_convs, self.norms, strict=True):
            hnode = hnode + torch.relu(norm(fwd(hnode, edge_index) + bwd(hnode, edge_index_reverse)))
        pooled = torch.cat([global_mean_pool(hnode, batch, num_graphs), global_max_pool(hnode, batch, num_graphs), g],
                           dim=1)
        graph = self.graph_head(pooled)
        scores = self.node_head(torch.cat([hnode, graph[batch]], dim=1))
        value = self.value_head(graph).squeeze(1)
        return scores, value


def flat_log_probs(scores: torch.Tensor, mask: torch.Tensor, batch: torch.Tensor,
                   num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the flat per-graph distribution (see the module docstring).

    Returns (node_logp [N, A] with -inf where illegal and in the wait column, wait_logp [num_graphs]).
    """
    wait_score = scatter(scores[:, WAIT], batch, dim=0, dim_size=num_graphs, reduce="mean")
    legal = mask.clone()
    legal[:, WAIT] = False
    neg_inf = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~legal, neg_inf)
    node_max = masked.max(dim=1).values
    graph_max = torch.maximum(scatter(node_max, batch, dim=0, dim_size=num_graphs, reduce="max"), wait_score)
    shifted = (masked - graph_max[batch].unsqueeze(1)).exp() * legal
    total = scatter(shifted.sum(dim=1), batch, dim=0, dim_size=num_graphs, reduce="sum") \
        + (wait_score - graph_max).exp()
    log_z = graph_max + total.log()
    node_logp = (masked - log_z[batch].unsqueeze(1)).masked_fill(~legal, float("-inf"))
    return node_logp, wait_score - log_z
