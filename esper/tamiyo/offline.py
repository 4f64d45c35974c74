"""Offline training of the Tamiyo GNN from field reports: advantage-weighted regression (AWR).

Each field report is one logged decision: the graph s, the executed action a (wait, cull a seed,
grow a site with a mode and blueprint) and its reward r (`esper.tamiyo.reward`; the reward
already covers the decision's whole consequence, from germination to fossilization or cull, so
the problem is treated as one-step: returns are not bootstrapped). With ``reward="shadow-return"``
r is instead the episode's return against its no-growth shadow, the same for every decision of
the episode (a Monte-Carlo return). AWR suits logged data because
it never evaluates actions the logging policy did not take:

    value      V(s) fitted to r by squared error
    policy     maximise  sum_i  w_i * log pi(a_i | s_i),   w_i = min(exp((r_i - V(s_i)) / beta), w_max)

so logged actions that did better than the state's average are imitated, and worse ones barely
are. beta is in reward units (accuracy points).

Heuristic prior (behaviour cloning). Reports that carry a `reference_decision` (what the run's
heuristic would have decided on the same graph; `esper-tamiyo collect` records it for every
behaviour) add a cloning term on that action:

    loss = AWR policy loss + bc_weight * mean_i( -log pi(ref_i | s_i) ) + value_coef * value loss

Per state the optimum is pi(a) proportional to mu(a) w(a) + bc_weight [a = ref] (mu: the logging
policy), so the greedy policy keeps the heuristic's action unless the logged data show another
action with a clearly positive advantage (weights w = exp(A / beta) well above 1) often enough to
outweigh the prior. bc_weight 0 is plain AWR. Validation reports the greedy policy's agreement
with the reference (`ref_agreement`).

Reports are split into training and validation **by run** (`run_id`), never by report, so no run
contributes to both. The checkpoint kept is, with the cloning prior below, the one with the lowest
validation objective (AWR + cloning); without it, the one whose greedy policy has the best
estimated mean reward on the validation runs (self-normalised inverse propensity weighting with
the logging policy's recorded probabilities), or when the reports carry none, the lowest
validation AWR loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Batch, Data

from esper.kasmina.growth.config import GrowthConfig
from esper.tamiyo.exploration import locate_action
from esper.tamiyo.graph import (
    GROWTH_MODES,
    WAIT,
    GraphError,
    action_names,
    global_feature_names,
    graph_to_data,
    node_feature_names,
)
from esper.tamiyo.replay import FILE_NAME, ReplayFileError, read_replay_file
from esper.tamiyo.reward import REWARD_DEFINITION, SHADOW_RETURN_DEFINITION, shadow_return
from esper.v1 import common_pb2


class ReplayDataError(ValueError):
    """Replay data that cannot train a policy; the message says what was wrong and what was expected."""


@dataclass
class ReplayData:
    samples: list[Data]
    files: list[str]
    data_sha256: str
    skipped: dict[str, int] = field(default_factory=dict)
    # Tasks, seeds and behaviours of the collection episodes (from their done.json), so a benchmark
    # can tell held-out tasks and seeds from training ones.
    provenance: dict[str, list] = field(default_factory=dict)
    # The reward the samples carry (REWARD_DEFINITION or SHADOW_RETURN_DEFINITION).
    reward_definition: str = REWARD_DEFINITION

    @property
    def runs(self) -> list[str]:
        return sorted({s.run_id for s in self.samples})


def replay_files(paths: Iterable[Path | str]) -> list[Path]:
    """Replay files under `paths` (a file itself, or every field_reports.bin below a directory)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(FILE_NAME))
            if not found:
                raise ReplayDataError(f"{p}: no {FILE_NAME} below this directory; expected the --out directory of "
                                      "esper-tamiyo collect or a Tamiyo --replay-dir")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ReplayDataError(f"{p}: no such file or directory")
    return out


def sample_from_report(report: common_pb2.FieldReport) -> Data:
    """The training sample of one report: graph features, logged action, reward."""
    # Every growth mode is legal here: the mask only has to admit what any run may have logged.
    data = graph_to_data(report.graph, growth=GrowthConfig(modes=list(GROWTH_MODES)))
    node, column = locate_action(report.graph, report.decision)
    if node is not None and not bool(data.mask[node, column]):
        raise GraphError(f"logged action {action_names()[column]} at node {node} is not legal in its own graph")
    # The logged action as an index into the node rows (-1 for WAIT) and a column.
    data.action_node = torch.tensor([-1 if node is None else node], dtype=torch.long)
    data.action_column = torch.tensor([WAIT if node is None else column], dtype=torch.long)
    ref_node, ref_column = reference_action(report, data)
    data.ref_node = torch.tensor([-1 if ref_node is None else ref_node], dtype=torch.long)
    data.ref_column = torch.tensor([ref_column], dtype=torch.long)
    data.has_ref = torch.tensor([ref_column >= 0], dtype=torch.bool)
    data.reward = torch.tensor([float(report.reward)], dtype=torch.float32)
    data.behavior_probability = torch.tensor([float(report.behavior_probability)], dtype=torch.float32)
    data.run_id = report.run_id
    del data.node_keys, data.width_units  # lists do not batch; decisions need them, training does not
    return data


def reference_action(report: common_pb2.FieldReport, data: Data) -> tuple[int | None, int]:
    """(node index or None for WAIT, column) of the report's reference decision; column -1 when the
    report has none or it is not a legal action of its own graph (then it is no cloning target)."""
    if not report.HasField("reference_decision"):
        return None, -1
    node, column = locate_action(report.graph, report.reference_decision)
    if report.reference_decision.action != common_pb2.DECISION_ACTION_WAIT and node is None:
        return None, -1  # names a slot or blueprint this graph does not have
    if node is not None and not bool(data.mask[node, column]):
        return None, -1
    return node, column


REWARDS = {"contribution": REWARD_DEFINITION, "shadow-return": SHADOW_RETURN_DEFINITION}


def episode_shadow_return(path: Path) -> float:
    """The shadow return (`esper.tamiyo.reward.shadow_return`) of the collection episode whose
    replay file is `path` (``<out>/episodes/<id>/field_reports.bin``), from its done.json and
    the no-growth shadow's (``<out>/shadows/<task>.<size>.s<seed>/done.json``)."""
    done_path = path.parent / "done.json"
    try:
        done = json.loads(done_path.read_text())
        key = f"{done['task']}.{done['size']}.s{int(done['seed'])}"
    except (OSError, ValueError, KeyError):
        raise ReplayDataError(f"{path}: no readable done.json with task, size and seed next to it; the shadow "
                              "return needs replay directories written by esper-tamiyo collect") from None
    shadow_path = path.parent.parent.parent / "shadows" / key / "done.json"
    try:
        shadow = json.loads(shadow_path.read_text())
    except (OSError, ValueError):
        raise ReplayDataError(f"{path}: no no-growth shadow of {key} ({shadow_path} missing or unreadable); "
                              "expected a collection run with esper-tamiyo collect --shadows") from None
    for where, record in ((done_path, done), (shadow_path, shadow)):
        if record.get("final_val_acc") is None or record.get("flops_total") is None:
            raise ReplayDataError(f"{where}: no final_val_acc/flops_total; expected an episode collected with "
                                  "final validation accuracy recorded (re-run esper-tamiyo collect --shadows)")
    return shadow_return(float(done["final_val_acc"]), float(shadow["final_val_acc"]), float(done["flops_total"]),
                         float(shadow["flops_total"]))


def load_replay(paths: Iterable[Path | str], echo: Callable[[str], None] = lambda s: None,
                reward: str = "contribution") -> ReplayData:
    """Samples from every usable report under `paths`; ReplayDataError when none is usable.

    `reward`: "contribution" (each report's own `contribution-minus-flops/1` reward) or
    "shadow-return" (every decision of an episode gets the episode's `shadow-return/1`, which
    needs the no-growth shadows of ``esper-tamiyo collect --shadows``)."""
    if reward not in REWARDS:
        raise ReplayDataError(f"reward {reward!r}; expected one of {sorted(REWARDS)}")
    files = replay_files(paths)
    digest = hashlib.sha256()
    samples: list[Data] = []
    skipped = {"no_graph": 0, "no_reward": 0, "unusable_graph": 0}
    tasks: set[str] = set()
    seeds: set[int] = set()
    behaviours: set[str] = set()
    for path in files:
        done = path.parent / "done.json"
        if done.is_file():
            try:
                record = json.loads(done.read_text())
                tasks.add(str(record["task"]))
                seeds.add(int(record["seed"]))
                behaviours.add(str(record["behaviour"]))
            except (OSError, ValueError, KeyError):
                tasks.add("unknown")
        else:
            tasks.add("unknown")
        try:
            reports, tail = read_replay_file(path)
        except ReplayFileError as exc:
            raise ReplayDataError(str(exc)) from None
        if tail:
            echo(f"warning: {path}: {tail} bytes after the last intact record ignored (torn tail)")
        episode_return = episode_shadow_return(path) if reward == "shadow-return" else None
        for i, report in enumerate(reports):
            if report.reward_definition and report.reward_definition != REWARD_DEFINITION:
                raise ReplayDataError(
                    f"{path}: report {i} is scored with reward {report.reward_definition!r}; this trainer uses "
                    f"{REWARD_DEFINITION!r}; expected reports collected with the same reward definition")
            if not report.graph.nodes:
                skipped["no_graph"] += 1
                continue
            if not report.reward_definition:
                skipped["no_reward"] += 1
                continue
            try:
                sample = sample_from_report(report)
            except GraphError:
                skipped["unusable_graph"] += 1
                continue
            if episode_return is not None:
                sample.reward = torch.tensor([episode_return], dtype=torch.float32)
                digest.update(f"{SHADOW_RETURN_DEFINITION}={episode_return!r}".encode())
            samples.append(sample)
            digest.update(report.SerializeToString(deterministic=True))
    if not samples:
        raise ReplayDataError(
            f"no usable field report in {len(files)} file(s) (skipped: {skipped}); expected reports that carry a "
            f"graph and a {REWARD_DEFINITION!r} reward, as written by esper-tamiyo collect")
    provenance = {"tasks": sorted(tasks), "seeds": sorted(seeds), "behaviours": sorted(behaviours)}
    return ReplayData(samples, [str(f) for f in files], digest.hexdigest(), skipped, provenance, REWARDS[reward])


def split_by_run(runs: list[str], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(training runs, validation runs): a seeded shuffle of the run ids, never splitting a run."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = sorted(runs)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(order))) if len(order) > 1 else 0
    return set(order[n_val:]), set(order[:n_val])


@dataclass
class TrainSettings:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    beta: float = 1.0
    max_weight: float = 20.0
    value_coef: float = 0.5
    # Weight of the cloning term on the reports' reference (heuristic) action; 0: plain AWR.
    bc_weight: float = 1.0
    hidden: int = 64
    layers: int = 3
    val_fraction: float = 0.2
    seed: int = 0


def batch_losses(model, batch: Batch, settings: TrainSettings) -> dict[str, torch.Tensor]:
    """AWR policy loss, value loss and diagnostics over one batch of samples."""
    from esper.tamiyo.gnn import flat_log_probs

    num_graphs = batch.num_graphs
    scores, value = model(batch.x, batch.edge_index, batch.edge_index_reverse, batch.u, batch.batch, num_graphs)
    node_logp, wait_logp = flat_log_probs(scores, batch.mask, batch.batch, num_graphs)
    action_node = batch.action_node
    is_wait = action_node < 0
    # action_node is local to each graph; Batch offsets node indices by graph via `ptr`.
    global_node = (action_node + batch.ptr[:-1]).clamp(min=0)
    logp = torch.where(is_wait, wait_logp, node_logp[global_node, batch.action_column])
    reward = batch.reward
    advantage = reward - value.detach()
    weight = torch.clamp(torch.exp(advantage / settings.beta), max=settings.max_weight)
    policy_loss = -(weight * logp).mean()
    value_loss = torch.mean((value - reward) ** 2)
    # Log-probability of the reference (heuristic) action, where the report has a usable one.
    has_ref = batch.has_ref
    ref_is_wait = batch.ref_node < 0
    ref_global = (batch.ref_node + batch.ptr[:-1]).clamp(min=0)
    ref_logp = torch.where(ref_is_wait, wait_logp, node_logp[ref_global, batch.ref_column.clamp(min=0)])
    ref_logp = torch.where(has_ref, ref_logp, torch.zeros_like(ref_logp))
    bc_loss = -ref_logp.sum() / has_ref.sum().clamp(min=1)
    # Greedy action of the current policy, to compare with the logged one and the reference.
    flat_best = torch.full((num_graphs,), -math.inf)
    flat_best = flat_best.scatter_reduce(0, batch.batch, node_logp.max(dim=1).values, reduce="amax")
    greedy_wait = wait_logp >= flat_best
    logged_is_greedy = torch.where(is_wait, greedy_wait, ~greedy_wait & (logp >= flat_best - 1e-6))
    ref_is_greedy = torch.where(ref_is_wait, greedy_wait, ~greedy_wait & (ref_logp >= flat_best - 1e-6))
    loss = policy_loss + settings.bc_weight * bc_loss + settings.value_coef * value_loss
    return {"policy_loss": policy_loss, "value_loss": value_loss, "bc_loss": bc_loss, "loss": loss,
            "weight_mean": weight.mean(), "logged_is_greedy": logged_is_greedy.float(), "reward": reward,
            "greedy_wait": greedy_wait.float(), "behavior_probability": batch.behavior_probability,
            "ref_is_greedy": (ref_is_greedy & has_ref).float(), "has_ref": has_ref.float()}


def evaluate(model, batches: list[Batch], settings: TrainSettings) -> dict[str, float]:
    """Validation metrics: AWR losses, agreement with the logged action, and off-policy estimates
    of the greedy policy's mean reward (matched-action mean, and inverse propensity where known)."""
    if not batches:
        return {}
    model.eval()
    totals = {"policy_loss": 0.0, "value_loss": 0.0}
    matched_reward, matched, ips_sum, ips_n, ips_weights, greedy_wait = 0.0, 0, 0.0, 0, 0.0, 0.0
    ref_hits, ref_n, bc_sum = 0.0, 0.0, 0.0
    rewards = 0.0
    n = 0
    with torch.no_grad():
        for batch in batches:
            out = batch_losses(model, batch, settings)
            size = batch.num_graphs
            n += size
            rewards += float(out["reward"].sum())
            for k in totals:
                totals[k] += float(out[k]) * size
            hit = out["logged_is_greedy"]
            matched_reward += float((hit * out["reward"]).sum())
            matched += int(hit.sum())
            pb = out["behavior_probability"]
            known = pb > 0
            w = (hit / pb.clamp(min=1e-6))[known]
            ips_sum += float((w * out["reward"][known]).sum())
            ips_weights += float(w.sum())
            ips_n += int(known.sum())
            greedy_wait += float(out["greedy_wait"].sum())
            ref_hits += float(out["ref_is_greedy"].sum())
            batch_refs = float(out["has_ref"].sum())
            ref_n += batch_refs
            bc_sum += float(out["bc_loss"]) * batch_refs
    refs = {"ref_agreement": ref_hits / ref_n, "bc_loss": bc_sum / ref_n} if ref_n else {}
    return {**refs, "policy_loss": totals["policy_loss"] / n, "value_loss": totals["value_loss"] / n,
            "agreement": matched / n, "greedy_wait_rate": greedy_wait / n,
            "matched_mean_reward": matched_reward / matched if matched else 0.0,
            "ips_mean_reward": ips_sum / ips_n if ips_n else 0.0,
            "snips_mean_reward": ips_sum / ips_weights if ips_weights else 0.0, "logged_mean_reward": rewards / n}


def train(data: ReplayData, settings: TrainSettings, *, on_epoch: Callable[[int, dict[str, float]], None] | None = None
          ) -> tuple[Any, dict[str, Any]]:
    """Fits a TamiyoGNN by AWR; returns (the best model on the validation runs, report)."""
    import copy

    from esper.tamiyo.gnn import Architecture, TamiyoGNN

    torch.manual_seed(settings.seed)
    train_runs, val_runs = split_by_run(data.runs, settings.val_fraction, settings.seed)
    train_set = [s for s in data.samples if s.run_id in train_runs]
    val_set = [s for s in data.samples if s.run_id in val_runs]
    if not train_set:
        raise ReplayDataError(f"no training samples after the split by run ({len(data.runs)} runs); expected more runs")
    arch = Architecture(node_features=len(node_feature_names()), global_features=len(global_feature_names()),
                        actions=len(action_names()), hidden=settings.hidden, layers=settings.layers)
    model = TamiyoGNN(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = random.Random(settings.seed)
    # Collating graphs into a Batch is the slow part of a step (Python per graph): the training set
    # is cut into fixed random mini-batches once, and only their order is shuffled per epoch.
    order = list(range(len(train_set)))
    rng.shuffle(order)
    batches = [Batch.from_data_list([train_set[i] for i in order[start:start + settings.batch_size]])
               for start in range(0, len(order), settings.batch_size)]
    val_batches = [Batch.from_data_list(val_set[start:start + 256]) for start in range(0, len(val_set), 256)]
    best: tuple[float, int, dict[str, Any], dict[str, float]] | None = None
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        rng.shuffle(batches)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "bc_loss": 0.0, "weight_mean": 0.0}
        for batch in batches:
            out = batch_losses(model, batch, settings)
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            for k in sums:
                sums[k] += out[k].item()
        metrics = {f"train/{k}": v / max(1, len(batches)) for k, v in sums.items()}
        val = evaluate(model, val_batches, settings)
        metrics.update({f"val/{k}": v for k, v in val.items()})
        history.append({"epoch": epoch, **metrics})
        # Model selection. With the cloning prior: the lowest validation value of the objective
        # trained (AWR + bc_weight x cloning), so the kept policy deviates from the heuristic only
        # as far as held-out runs support; the importance-sampling estimate is too noisy to
        # license deviations on its own. Without it: the self-normalised importance-sampling
        # estimate of the greedy policy's mean reward on the validation runs (the AWR loss alone
        # is no criterion, its weights move with the value estimate); without behaviour
        # probabilities, the lowest loss.
        if settings.bc_weight > 0 and "bc_loss" in val:
            score = val["policy_loss"] + settings.bc_weight * val["bc_loss"]
        elif val.get("snips_mean_reward"):
            score = -val["snips_mean_reward"]
        else:
            score = val.get("policy_loss", metrics["train/policy_loss"])
        if best is None or score < best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()), metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    report = {
        "method": "AWR (one-step advantage-weighted regression with a learned value baseline)" + (
            f" + behaviour cloning of the reference (heuristic) action, weight {settings.bc_weight:g}"
            if settings.bc_weight > 0 else ""),
        "settings": settings.__dict__, "architecture": arch.to_dict(), "best_epoch": best[1],
        "best_metrics": best[3], "history": history,
        "data": {"files": len(data.files), "samples": len(data.samples), "runs": len(data.runs),
                 "train_runs": len(train_runs), "val_runs": len(val_runs), "train_samples": len(train_set),
                 "val_samples": len(val_set), "skipped": data.skipped, "sha256": data.data_sha256,
                 "samples_with_reference": sum(int(s.has_ref) for s in data.samples),
                 "reward_definition": data.reward_definition,
                 **data.provenance,
                 "val_run_ids": sorted(val_runs)},
    }
    return model, report
