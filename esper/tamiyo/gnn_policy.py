"""The learned Tamiyo policy: a `TamiyoGNN` choosing among the legal actions of a model graph.

`decide` featurises the graph (`esper.tamiyo.graph.graph_to_data`), scores it, and takes the
most probable legal action: WAIT, CULL a live seed, or GROW a free site by a branch blueprint,
by width units or by a block (as the run's growth modes allow). It is deterministic for a given graph (no sampling, no dropout). The decision carries
the action's probability as its confidence and a reason naming the features that drove it:
the largest input-times-gradient attributions of the chosen action's score, over the chosen
node's features and the global ones. The safety rails are applied around it by the Controller,
exactly as for every other policy.
"""

from __future__ import annotations

from typing import Any

import torch

from esper.tamiyo.exploration import BRANCH_ONLY, GrowthSpace, decision_for
from esper.tamiyo.graph import WAIT, global_feature_names, node_feature_names
from esper.tamiyo.policy import AdaptationDecision, ModelGraphState, RailsConfig, wait
from esper.tamiyo.policy_store import LoadedPolicy

REASON_FEATURES = 3


class GNNPolicy:
    """A loaded GNN behind the Policy interface (see the module docstring)."""

    def __init__(self, loaded: LoadedPolicy, rails: RailsConfig, space: GrowthSpace = BRANCH_ONLY) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.rails = rails
        self.space = space
        self.version = loaded.version
        self.decisions_made = 0
        self._node_names = node_feature_names()
        self._global_names = global_feature_names()

    def scores(self, state: ModelGraphState):
        """(data, node log-probs [N, A], wait log-prob, value) for `state`, with gradients enabled
        on the inputs so a reason can be attributed."""
        from esper.tamiyo.gnn import flat_log_probs

        data = self.space.graph(state, self.rails)
        data.x.requires_grad_(True)
        data.u.requires_grad_(True)
        batch = torch.zeros(data.num_nodes, dtype=torch.long)
        scores, value = self.model(data.x, data.edge_index, data.edge_index_reverse, data.u, batch, 1)
        node_logp, wait_logp = flat_log_probs(scores, data.mask, batch, 1)
        return data, scores, node_logp, wait_logp[0], value[0]

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        data, scores, node_logp, wait_logp, value = self.scores(state)
        flat = node_logp.flatten()
        best = int(torch.argmax(flat)) if flat.numel() else 0
        if flat.numel() == 0 or bool(wait_logp >= flat[best]):
            target = scores[:, WAIT].mean()
            node, column, logp = None, WAIT, wait_logp
        else:
            node, column = divmod(best, node_logp.shape[1])
            target = scores[node, column]
            logp = flat[best]
        drivers = self._drivers(data, target, node)
        confidence = float(logp.detach().exp())
        where = "" if node is None else f" at {data.node_keys[node][0]}[{data.node_keys[node][1]}]"
        what = "wait" if node is None else ("cull" if column == 1 else f"grow ({_action_label(column)})")
        reason = (f"gnn {self.version}: {what}{where} (p={confidence:.2f}, value {float(value.detach()):+.3f}); "
                  f"driven by {drivers}")
        if node is None:
            d = wait(reason, self.version)
            d.confidence = confidence
            return [d]
        self.decisions_made += 1
        return [decision_for(state, node, column, reason, self.version, confidence, data.width_units[node])]

    def _drivers(self, data, target: torch.Tensor, node: int | None) -> str:
        """The REASON_FEATURES largest input x gradient attributions of `target`, named."""
        gx, gu = torch.autograd.grad(target, [data.x, data.u])
        with torch.no_grad():
            ax = data.x * gx if node is None else (data.x[node] * gx[node]).unsqueeze(0)
            au = (data.u * gu)[0]
            k = REASON_FEATURES
            width = ax.shape[1]
            items: list[tuple[float, str, float]] = []
            for flat_index in torch.topk(ax.abs().flatten(), min(k, ax.numel())).indices.tolist():
                row, j = divmod(flat_index, width)
                i = row if node is None else node
                layer, seed = data.node_keys[i]
                items.append((float(ax[row, j]), f"{layer}[{seed}].{self._node_names[j]}", float(data.x[i, j])))
            for j in torch.topk(au.abs(), min(k, au.numel())).indices.tolist():
                items.append((float(au[j]), f"global.{self._global_names[j]}", float(data.u[0, j])))
        items.sort(key=lambda t: -abs(t[0]))
        return ", ".join(f"{name}={value:.3g} ({attr:+.2f})" for attr, name, value in items[:k])

    def state_dict(self) -> dict[str, Any]:
        return {"decisions_made": self.decisions_made, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decisions_made = int(state.get("decisions_made", 0))


def _action_label(column: int) -> str:
    from esper.tamiyo.graph import action_names

    return action_names()[column]
