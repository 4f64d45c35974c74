"""Tolaria's side of the counterfactual measurement: the fixed evaluation subset and refit steps.

Kasmina's `RefitCounterfactual` decides *what* is measured; this module gives it the run's data
and optimizer: `evaluate` scores the first `lifecycle.counterfactual_samples` validation samples
(the validation split is already a seeded random holdout, so its head is a fixed random subset),
and `train_step(k)` runs refit step k on batch k of a fixed permutation of the training split
(the same batches for the "with" and "without" sides of one measurement). Every FLOP of both is
added to the run's growth overhead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esper.kasmina.counterfactual import RefitCounterfactual
from esper.tolaria.data import Split, _split_generator, prepare_batch

REFIT_SALT = 2_000_000


def counterfactual_split(val: Split, samples: int) -> Split:
    """The fixed subset the counterfactual is measured on: the first `samples` validation samples."""
    if samples <= 0 or samples >= len(val):
        return val
    return Split(val.x[:samples], val.y[:samples])


def build_counterfactual(trainer) -> RefitCounterfactual:
    """The run's counterfactual measurement, reading data, model and optimizer from `trainer`."""
    cfg = trainer.config
    subset = counterfactual_split(trainer.data.val, cfg.lifecycle.counterfactual_samples)

    def evaluate() -> float:
        _, acc = trainer.evaluate(subset)
        trainer.state.growth_flops += trainer.morph.eval_flops_per_sample() * len(subset)
        return acc

    def train_step(k: int) -> None:
        data, batch = trainer.data, cfg.data.batch_size
        n = len(data.train)
        # A permutation per epoch boundary (same for both sides of a measurement, fresh each epoch).
        order = torch.randperm(n, generator=_split_generator(cfg.train.seed, REFIT_SALT + trainer.state.epoch))
        idx = order[(k * batch) % n : (k * batch) % n + batch].to(data.train.y.device)
        x, y = prepare_batch(data, data.train.x[idx], None), data.train.y[idx]
        model, opt = trainer.model, trainer.optimizer
        model.train()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"]  # the host's base rate; the snapshot restores the rest
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trainer.state.growth_flops += 3.0 * trainer.morph.train_flops_per_sample() * x.shape[0]

    return RefitCounterfactual(trainer.model, evaluate, train_step, cfg.lifecycle.refit_steps, trainer.optimizer)
