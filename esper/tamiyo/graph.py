"""A `ModelGraphState` as a `torch_geometric.data.Data`: the input of learned Tamiyo policies.

`graph_to_data` is a pure function of the message (and the blueprint catalog): the same graph
always gives the same tensors, so a policy decides the same way on the same input and a replay
file can be re-featurised later.

Nodes are seed slots in message order. Node features (`node_feature_names()`):
  telemetry     activation mean (signed log), log variance, dead fraction, log gradient norm,
                gradient norm relative to the mean over all nodes, the seed's gradient alignment
                (cosine with the descent direction at its last TRAINING gate) and whether it has one
  lifecycle     one-hot of the 11 `SeedLifecycleState`s, alpha, epochs in state, embargo left,
                last counterfactual contribution and whether there is one
  structure     depth (fraction of the deepest site), width (log2 channels), chunk size (log2),
                seeds per layer, spatial size (log2), layer kind one-hot, the seed's own parameters,
                the site's width pair (units, log2; narrow: fewer units than it reads and writes)
                and the blocks already added after it by depth growth
  site order    how the site compares with the others, in task-independent terms (what a site
                rule like the heuristic's reads, so it can transfer to an unseen host): its width
                units relative to the widest site, whether it is the narrowest site, its need
                among the free sites (gradient norm relative to their mean, plus dead fraction)
                and its rank among them ordered narrow first, then by need, then shallower first
                (1 for the first, towards 0 for the last, 0 for a site that is not free): the
                order of heuristic/3. heuristic/4's least-grown-first order needs each layer's
                first width, which the graph does not carry; width relative to the widest site
                stands in for it on hosts whose layers start equally wide
  candidates    for every growth action (`action_names()`: branch x blueprint, width by k units,
                depth by one block): whether it is possible at the site, its parameters and FLOPs
                relative to the host, whether it fits the budget left, and the log of
                sqrt(parameters) per FLOP (both relative to the host): a prior of gain per cost
Edges follow the data flow (`GraphEdge`, source -> target) and are kept in that direction in
`edge_index`; `edge_index_reverse` holds the same edges reversed, so a policy can pass messages
both ways and still know which way the data flows.
Global features (`global_feature_names()`, tensor `u` of shape [1, G]): epoch fraction, losses,
loss and accuracy trends, generalisation gap, validation accuracy, budgets left, adaptations in
flight, host size.

The action space per node is [wait, cull, grow:branch:<b> for every blueprint, grow:width,
grow:depth] (`action_names()`); `mask` says which are legal at that node now: growth only at a
free site, only in the run's growth modes, only within the budget left. grow:width adds k units
to the site's width pair, k = `units_to_add(growth, units)` (growth.width_units, or
growth.width_factor x the current units) shrunk to the largest count that fits the budget (`data.width_units` per node); grow:depth adds one block after the site.
A change of this layout or of the features bumps `FEATURE_SCHEMA`, and policies trained on
another schema are refused when loaded. Schema 1 had branch growth only and no alignment;
schema 2 had no site-order features and no gain-per-cost candidate feature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch_geometric.data import Data

from esper.kasmina.growth.config import GrowthConfig, units_to_add
from esper.lifecycle import SeedLifecycleState as S
from esper.v1 import common_pb2

FEATURE_SCHEMA = "tamiyo-graph/3"

# Growth modes a policy chooses between: a catalog blueprint as a residual side branch, new units
# in the site's width pair (GraphNode.width), a new block after the site (GraphNode.deepen).
GROWTH_MODES: tuple[str, ...] = ("branch", "width", "depth")

LIFECYCLE_STATES: tuple[S, ...] = tuple(s for s in S if s != S.UNSPECIFIED)
# A seed that is live in the host can be culled by the policy.
_STATE_VALUES = tuple(int(s) for s in LIFECYCLE_STATES)
CULLABLE = frozenset(int(s) for s in (S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING))
LAYER_KINDS: tuple[str, ...] = ("linear", "conv1d", "conv2d")

WAIT, CULL, FIRST_GROW = 0, 1, 2

_TELEMETRY = ("activation_mean", "log_activation_variance", "dead_fraction", "log_gradient_norm",
              "gradient_norm_rel", "gradient_alignment", "has_gradient_alignment")
_LIFECYCLE_EXTRA = ("alpha", "epochs_in_state", "embargo_epochs_left", "last_contribution", "has_contribution")
_STRUCTURE = ("depth_fraction", "log2_width", "log2_chunk", "seeds_per_layer", "log2_spatial",
              *(f"kind_{k}" for k in LAYER_KINDS), "kind_other", "seed_params_rel",
              "log2_width_units", "width_narrow", "depth_blocks")
_SITE_ORDER = ("width_units_rel_max", "width_narrowest", "need_free", "need_rank_free")
_CANDIDATE = ("fits", "params_rel", "flops_rel", "in_budget", "log_gain_per_flop")
_GLOBAL = ("epoch_fraction", "log_train_loss", "log_val_loss", "loss_trend_1", "loss_trend_3", "gap",
           "val_accuracy", "accuracy_trend_1", "accuracy_trend_3", "parameter_budget_left",
           "compute_budget_left", "active_adaptations", "log10_host_params", "log10_host_flops",
           "log2_nodes")


def catalog_blueprints() -> tuple[str, ...]:
    """Blueprint ids in catalog order: the blueprint axis of the action space."""
    from esper.kasmina.blueprints import CATALOG

    return tuple(CATALOG)


def action_names(blueprints: Sequence[str] | None = None) -> list[str]:
    """Names of the per-node actions, in the order of the policy's output columns."""
    bps = catalog_blueprints() if blueprints is None else tuple(blueprints)
    return ["wait", "cull", *(f"grow:branch:{b}" for b in bps), "grow:width", "grow:depth"]


def width_column(blueprints: Sequence[str] | None = None) -> int:
    """Column of grow:width (after the branch blueprints); grow:depth is the next one."""
    return FIRST_GROW + len(catalog_blueprints() if blueprints is None else tuple(blueprints))


def node_feature_names(blueprints: Sequence[str] | None = None) -> list[str]:
    """Names of the node feature columns (see the module docstring)."""
    bps = catalog_blueprints() if blueprints is None else tuple(blueprints)
    names = [*_TELEMETRY, *(f"state_{s.name.lower()}" for s in LIFECYCLE_STATES), *_LIFECYCLE_EXTRA, *_STRUCTURE,
             *_SITE_ORDER]
    names += [f"branch:{b}:{c}" for b in bps for c in _CANDIDATE]
    names += [f"width:{c}" for c in _CANDIDATE] + [f"depth:{c}" for c in _CANDIDATE]
    return names


def global_feature_names() -> list[str]:
    return list(_GLOBAL)


def _slog(value: float) -> float:
    """Signed log1p: keeps sign and order, tames heavy tails."""
    return math.copysign(math.log1p(abs(value)), value)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _trend(history: Sequence[float], lag: int, higher_is_better: bool) -> float:
    """Relative improvement over the last `lag` epochs (0 without enough history)."""
    if len(history) < lag + 1:
        return 0.0
    before, now = history[-lag - 1], history[-1]
    change = (now - before) if higher_is_better else (before - now)
    return max(-1.0, min(1.0, change / max(abs(before), 1e-6)))


@functools.lru_cache(maxsize=4096)
def _site_costs(chunk: int, shape: tuple[int, ...], blueprints: tuple[str, ...]) -> tuple[tuple[int, int] | None, ...]:
    """(parameters, FLOPs per sample) of each blueprint at a chunk shape; None where it does not fit.
    Cached: the same site shapes recur at every epoch boundary of every run."""
    from esper.kasmina.blueprints import CATALOG, BlueprintError, blueprint_cost

    out: list[tuple[int, int] | None] = []
    for bid in blueprints:
        spec = CATALOG.get(bid)
        if spec is None:
            out.append(None)
            continue
        try:
            cost = blueprint_cost(spec, chunk, [-1, chunk, *shape])
        except (BlueprintError, ValueError):
            out.append(None)
            continue
        out.append((int(cost.parameter_count), int(cost.flops_per_sample)))
    return tuple(out)


def budget_fractions(signals: common_pb2.TrainingSignals, parameter_budget: float,
                     compute_budget: float) -> tuple[float, float]:
    """(parameters, forward FLOPs per sample) still allowed by the budgets (as in the rails). The
    budgets the graph carries win over the arguments, so a stored graph is read as it was seen."""
    parameter_budget = signals.parameter_budget or parameter_budget
    compute_budget = signals.compute_budget or compute_budget
    params = signals.parameter_budget_left * parameter_budget * signals.initial_parameter_count
    flops = signals.compute_budget_left * compute_budget * signals.initial_flops_per_sample
    return params, flops


class GraphError(ValueError):
    """A ModelGraphState that cannot be turned into policy input (names the field)."""


def _width_candidate(node: common_pb2.GraphNode, growth: GrowthConfig, params_left: float, flops_left: float,
                     host_params: float, host_flops: float) -> tuple[list[float], int]:
    """(candidate features, units) of growing the node's width pair by the configured units,
    shrunk to what fits the budget left (units 0: not possible or nothing fits)."""
    from esper.tamiyo.costs import units_that_fit

    w = node.width
    if not node.HasField("width") or w.units <= 0 or not w.available:
        return [0.0] * len(_CANDIDATE), 0
    wanted = units_to_add(growth, int(w.units))
    units = units_that_fit(node, wanted, params_left, flops_left)
    shown = units or wanted  # the cost of what was wanted when nothing fits
    p, f = shown * w.unit_parameters / host_params, shown * w.unit_flops / host_flops
    return [1.0, p, f, 1.0 if units > 0 else 0.0, _gain_per_flop(p, f)], units


def _depth_candidate(node: common_pb2.GraphNode, params_left: float, flops_left: float, host_params: float,
                     host_flops: float) -> tuple[list[float], bool]:
    """(candidate features, fits the budget) of one more block after the node."""
    d = node.deepen
    if not node.HasField("deepen") or not d.available:
        return [0.0] * len(_CANDIDATE), False
    fits = d.block_parameters <= params_left and d.block_flops <= flops_left
    p, f = d.block_parameters / host_params, d.block_flops / host_flops
    return [1.0, p, f, 1.0 if fits else 0.0, _gain_per_flop(p, f)], fits


def _gain_per_flop(params_rel: float, flops_rel: float) -> float:
    """log(sqrt(parameters) / FLOPs), both relative to the host, scaled to about [-1, 1]: the
    heuristic's prior of gain per cost (returns diminish with size) as a feature."""
    if params_rel <= 0 or flops_rel <= 0:
        return 0.0
    return max(-2.0, min(2.0, math.log(math.sqrt(params_rel) / flops_rel) / 5.0))


def _site_order(nodes: list[common_pb2.GraphNode], grads: list[float]) -> list[list[float]]:
    """The site-order features of every node (see the module docstring), in node order."""
    dormant = int(S.DORMANT)
    free = [n.seed.state == dormant and n.seed.embargo_epochs_left == 0 for n in nodes]
    units = [int(n.width.units) if n.HasField("width") and n.width.units > 0 else 0 for n in nodes]
    widest = max(units)
    narrowest = min((u for u in units if u > 0), default=0)
    free_grads = [g for g, f in zip(grads, free, strict=True) if f]
    mean_free = sum(free_grads) / len(free_grads) if free_grads else 0.0
    need = [(g / mean_free if mean_free > 0 else 0.0) + _finite(n.seed.telemetry.dead_fraction) if f else 0.0
            for n, g, f in zip(nodes, grads, free, strict=True)]

    def is_narrow(n: common_pb2.GraphNode) -> bool:
        w = n.width
        return n.HasField("width") and w.units > 0 and w.units < min(w.input_dim, w.output_dim)

    order = sorted((i for i in range(len(nodes)) if free[i]),
                   key=lambda i: (not is_narrow(nodes[i]), -need[i], nodes[i].depth, nodes[i].seed.seed_index))
    rank = [0.0] * len(nodes)
    for pos, i in enumerate(order):
        rank[i] = 1.0 - pos / len(order)
    return [[u / widest if widest else 0.0, 1.0 if u and u == narrowest else 0.0, min(need[i], 5.0), rank[i]]
            for i, u in enumerate(units)]


def graph_to_data(state: common_pb2.ModelGraphState, *, parameter_budget: float = 1.0,
                  compute_budget: float = 1.0, allowed_blueprints: Sequence[str] = (),
                  blueprints: Sequence[str] | None = None, growth: GrowthConfig | None = None) -> Data:
    """The policy input for `state` (see the module docstring).

    `parameter_budget`/`compute_budget` are the rails' budgets (multiples of the host), used to
    mark candidates that fit what is left when the graph does not carry its own;
    `allowed_blueprints` (empty: all) and `growth.modes` restrict growth as the run's config does
    (the features describe every mode either way; None: the default GrowthConfig, branch only);
    `growth.width_units`/`width_factor` size a width seed. Extra attributes: `u` [1, G] global
    features, `mask` [N, A] legal actions, `edge_index_reverse`, `node_keys` (layer name, seed
    index) and `width_units` (units grow:width adds) per node.
    """
    growth = GrowthConfig() if growth is None else growth
    unknown = [m for m in growth.modes if m not in GROWTH_MODES]
    if unknown:
        raise GraphError(f"growth.modes has {unknown}; expected some of {list(GROWTH_MODES)}")
    bps = catalog_blueprints() if blueprints is None else tuple(blueprints)
    nodes = list(state.nodes)
    if not nodes:
        raise GraphError("graph.nodes is empty; expected one node per seed site")
    sig = state.signals
    host_params = max(1.0, float(sig.initial_parameter_count))
    host_flops = max(1.0, float(sig.initial_flops_per_sample))
    params_left, flops_left = budget_fractions(sig, parameter_budget, compute_budget)
    max_depth = max(1, max(n.depth for n in nodes))
    grads = [max(0.0, _finite(n.seed.telemetry.gradient_norm)) for n in nodes]
    mean_grad = sum(grads) / len(grads)
    per_layer: dict[str, int] = {}
    for n in nodes:
        per_layer[n.layer_name] = per_layer.get(n.layer_name, 0) + 1
    allowed = set(allowed_blueprints)
    num_actions = FIRST_GROW + len(bps) + 2
    branch_ok, width_ok, depth_ok = (m in growth.modes for m in GROWTH_MODES)
    grow_units: list[int] = []

    rows: list[list[float]] = []
    mask_rows: list[list[bool]] = []
    # Candidate features and growth legality depend on the site's shape only: computed once per
    # distinct shape in the graph (a deep graph repeats a handful of shapes).
    by_shape: dict[tuple[int, tuple[int, ...]], tuple[list[float], list[bool]]] = {}
    dormant = int(S.DORMANT)
    site_order = _site_order(nodes, grads)
    for i, n in enumerate(nodes):
        seed, t = n.seed, n.seed.telemetry
        if seed.chunk_size <= 0:
            raise GraphError(f"graph node {n.node_id!r}: seed.chunk_size is {seed.chunk_size}; expected > 0")
        dims = list(n.output_shape.dims)
        width = dims[1] if len(dims) >= 2 else seed.chunk_size
        spatial = math.prod(dims[2:]) if len(dims) > 2 else 1
        state_value = seed.state
        row = [
            _slog(_finite(t.activation_mean)), math.log1p(max(0.0, _finite(t.activation_variance))),
            _finite(t.dead_fraction), math.log1p(grads[i]), grads[i] / mean_grad if mean_grad > 0 else 0.0,
            max(-1.0, min(1.0, _finite(t.gradient_alignment))), 1.0 if t.has_gradient_alignment else 0.0,
        ]
        row += [1.0 if state_value == s else 0.0 for s in _STATE_VALUES]
        row += [_finite(seed.alpha), min(seed.epochs_in_state, 20) / 10.0, min(seed.embargo_epochs_left, 10) / 5.0,
                max(-1.0, min(1.0, 10.0 * _finite(seed.last_contribution))), 1.0 if seed.has_contribution else 0.0]
        kind = n.layer_kind.lower()
        row += [n.depth / max_depth, math.log2(max(1, width)) / 10.0, math.log2(seed.chunk_size) / 10.0,
                per_layer[n.layer_name] / 8.0, math.log2(max(1, spatial)) / 10.0,
                *(1.0 if kind == k else 0.0 for k in LAYER_KINDS), 0.0 if kind in LAYER_KINDS else 1.0,
                seed.parameter_count / host_params]
        w = n.width
        has_width = n.HasField("width") and w.units > 0
        row += [math.log2(max(1, w.units)) / 10.0 if has_width else 0.0,
                1.0 if has_width and w.units < min(w.input_dim, w.output_dim) else 0.0,
                min(n.deepen.blocks, 8) / 4.0 if n.HasField("deepen") else 0.0]
        row += site_order[i]
        key = (int(seed.chunk_size), tuple(int(d) for d in dims[2:]))
        cached = by_shape.get(key)
        if cached is None:
            feats: list[float] = []
            grow: list[bool] = []
            costs = _site_costs(key[0], key[1], bps)
            for b_index, bid in enumerate(bps):
                cost = costs[b_index]
                if cost is None:
                    feats += [0.0] * len(_CANDIDATE)
                    grow.append(False)
                    continue
                p, f = cost
                in_budget = p <= params_left and f <= flops_left
                feats += [1.0, p / host_params, f / host_flops, 1.0 if in_budget else 0.0,
                          _gain_per_flop(p / host_params, f / host_flops)]
                grow.append(branch_ok and in_budget and (not allowed or bid in allowed))
            cached = by_shape[key] = (feats, grow)
        width_feats, units = _width_candidate(n, growth, params_left, flops_left, host_params, host_flops)
        depth_feats, depth_fits = _depth_candidate(n, params_left, flops_left, host_params, host_flops)
        row += cached[0] + width_feats + depth_feats
        grow_units.append(units)
        free = state_value == dormant and seed.embargo_epochs_left == 0
        legal_growth = [*cached[1], width_ok and units > 0, depth_ok and depth_fits]
        mask_rows.append([True, state_value in CULLABLE, *(legal_growth if free else [False] * len(legal_growth))])
        rows.append(row)
    mask = torch.tensor(mask_rows, dtype=torch.bool).reshape(len(nodes), num_actions)

    index = {n.node_id: i for i, n in enumerate(nodes)}
    edges = []
    for e in state.edges:
        if e.source_node_id not in index or e.target_node_id not in index:
            raise GraphError(f"graph edge {e.source_node_id!r} -> {e.target_node_id!r} names a node that is not "
                             "in graph.nodes")
        edges.append((index[e.source_node_id], index[e.target_node_id]))
    edge_index = torch.tensor(edges, dtype=torch.long).t().contiguous() if edges else torch.zeros((2, 0), dtype=torch.long)

    loss_hist = [_finite(v) for v in sig.val_loss_history]
    acc_hist = [_finite(v) for v in sig.val_accuracy_history]
    total = max(1, sig.total_epochs)
    gap = (sig.val_loss - sig.train_loss) / max(abs(sig.val_loss), 1e-6) if sig.val_loss else 0.0
    u = [
        min(1.0, sig.epoch / total), math.log1p(max(0.0, _finite(sig.train_loss))),
        math.log1p(max(0.0, _finite(sig.val_loss))), _trend(loss_hist, 1, False), _trend(loss_hist, 3, False),
        max(-1.0, min(1.0, _finite(gap))), _finite(sig.val_accuracy), _trend(acc_hist, 1, True),
        _trend(acc_hist, 3, True), sig.parameter_budget_left, sig.compute_budget_left,
        sig.active_adaptations / len(nodes), math.log10(host_params) / 6.0, math.log10(host_flops) / 8.0,
        math.log2(len(nodes)) / 6.0,
    ]
    data = Data(x=torch.tensor(rows, dtype=torch.float32), edge_index=edge_index,
                edge_index_reverse=edge_index.flip(0), u=torch.tensor([u], dtype=torch.float32), mask=mask)
    data.node_keys = [(n.layer_name, int(n.seed.seed_index)) for n in nodes]
    data.width_units = grow_units
    data.num_nodes = len(nodes)
    return data
