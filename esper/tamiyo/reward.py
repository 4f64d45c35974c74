"""The reward of a Tamiyo decision, from the run's own counterfactual measurements.

Definition "contribution-minus-flops/1", in accuracy points (one point = 1% validation accuracy):

    GERMINATE   r = 100 * c  -  LAMBDA * flop_cost / run_host_flops  (-  ROLLBACK_PENALTY if rolled back)
    CULL        r = -100 * c_at_cull  +  LAMBDA * flops_saved / run_host_flops
    WAIT        r = 0

* c is the seed's counterfactual contribution, the last one measured for it: validation accuracy
  of the model with the seed minus with its alpha forced to 0 (Kasmina's EVALUATING / FINE_TUNING
  gates measure it, so co-adaptation of the host after grafting is not credited to the seed).
  Seeds culled or cancelled before any measurement have c = 0: they only cost FLOPs.
* flop_cost is what the seed cost the run: its forward FLOPs per sample times the samples it
  processed while it was live, training counted 3x (forward + backward) plus validation passes.
* run_host_flops is the same count for the static host over the whole run, so the cost term is
  "the fraction of a whole host run spent on this adaptation"; LAMBDA = 1 point per host run.
* WAIT is the reference action: the advantage of growing is its reward minus what waiting gives.

This is the "change in validation accuracy attributable to the adaptation, net of its FLOPs"
of the design, measured by counterfactuals rather than paired no-growth shadow runs (a shadow per
decision would multiply the collection cost by the number of decisions). It cannot see what width
growth merged at once (``growth.width_lifecycle: direct``) brings: such a seed is fossilized
without a counterfactual (c = 0), and it is charged one epoch of FLOPs, not the rest of the run.

Definition "shadow-return/1" (training-time alternative, `esper-tamiyo-train --reward
shadow-return`), in the same units, from one no-growth shadow run per task, size and seed
(`esper-tamiyo collect --shadows`: same data split, batch order and host, no adaptation):

    every decision of an episode   R = 100 * (a - a_shadow)  -  LAMBDA * (F - F_shadow) / F_shadow

with a the episode's final validation accuracy and F its total FLOPs (training, validation,
counterfactual evaluations). The growth pays at the end of the run, so R is the undiscounted
Monte-Carlo return of every decision of the episode, waits included: an advantage-weighted
learner then imitates the decisions of episodes that ended better than expected from their state.
It credits every growth mode alike, at a whole episode of noise per decision.
"""

from __future__ import annotations

import math

REWARD_DEFINITION = "contribution-minus-flops/1"
SHADOW_RETURN_DEFINITION = "shadow-return/1"
LAMBDA = 1.0
ROLLBACK_PENALTY = 1.0


def run_host_flops(host_flops_per_sample: float, epochs: int, train_samples: int, val_samples: int) -> float:
    """Forward-equivalent FLOPs of the static host over a run (training 3x, validation 1x)."""
    return host_flops_per_sample * epochs * (3.0 * train_samples + val_samples)


def seed_flop_cost(seed_flops_per_sample: float, live_epochs: float, train_samples: int, val_samples: int) -> float:
    """FLOPs a seed of `seed_flops_per_sample` cost while live for `live_epochs` epochs."""
    return seed_flops_per_sample * max(0.0, live_epochs) * (3.0 * train_samples + val_samples)


def germinate_reward(contribution: float | None, flop_cost: float, host_run_flops: float, outcome: str) -> float:
    """Reward of a germination (see the module docstring)."""
    c = 0.0 if contribution is None or not math.isfinite(contribution) else contribution
    r = 100.0 * c - LAMBDA * flop_cost / max(host_run_flops, 1.0)
    if outcome == "rolled_back":
        r -= ROLLBACK_PENALTY
    return r


def cull_reward(contribution: float | None, flops_saved: float, host_run_flops: float) -> float:
    """Reward of culling a live seed (see the module docstring)."""
    c = 0.0 if contribution is None or not math.isfinite(contribution) else contribution
    return -100.0 * c + LAMBDA * flops_saved / max(host_run_flops, 1.0)


def shadow_return(val_acc: float, shadow_val_acc: float, run_flops: float, shadow_run_flops: float) -> float:
    """The "shadow-return/1" return of an episode's decisions (see the module docstring)."""
    return 100.0 * (val_acc - shadow_val_acc) - LAMBDA * (run_flops - shadow_run_flops) / max(shadow_run_flops, 1.0)
