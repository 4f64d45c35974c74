"""The summary of a finished run (summary.json): results, compute spent, seeds, adaptations."""

from __future__ import annotations

from typing import Any

from esper.tolaria.hosts import count_parameters


def run_summary(trainer: Any, test_loss: float, test_acc: float, stopped_early: bool) -> dict[str, Any]:
    """The run's summary from a trainer that has finished training (and its test evaluation)."""
    hist = trainer.state.history
    return {
        "run_name": trainer.config.run_name,
        "morphogenetic": trainer.morphogenetic,
        "dataset": trainer.config.data.name,
        "model": trainer.config.model.name,
        "device": str(trainer.device),
        "epochs": trainer.state.epoch,
        "global_step": trainer.state.global_step,
        "stopped_early": stopped_early,
        "final_val_acc": hist[-1]["val_acc"] if hist else None,
        "final_val_loss": hist[-1]["val_loss"] if hist else None,
        "best_val_acc": trainer.state.best_val_acc,
        "best_val_loss": trainer.state.best_val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "params_initial": trainer.params_initial,
        "params_final": count_parameters(trainer.model),
        "flops": {
            "train": trainer.state.train_flops,
            "eval": trainer.state.eval_flops,
            "growth_overhead": trainer.state.growth_flops,
            "total": trainer.state.train_flops + trainer.state.eval_flops + trainer.state.growth_flops,
            "forward_per_sample_initial": trainer.host_flops,
            "forward_per_sample_final": trainer.morph.eval_flops_per_sample(),
        },
        "seeds": trainer.morph.state_counts(),
        "adaptations": trainer.morph.adaptations(),
        "rollbacks": trainer.governor.rollbacks,
        "ranks": trainer.ranks.report(),
        "wall_s": trainer.state.wall_s,
    }
