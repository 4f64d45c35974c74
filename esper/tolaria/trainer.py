"""The Tolaria training recipe: setup, train (with the morphogenetic loop), checkpoint, resume.

One `Trainer` runs one job in one run directory. Everything that can fail on bad input (config,
data, checkpoint, architecture mismatch) is checked in `prepare()`, before anything is written to
the run directory, so a rejected command leaves an existing run untouched.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import Config, architecture_of, to_dict, to_yaml
from esper.tolaria.controllers import Controller, ControllerFactory, policy_controller
from esper.tolaria.data import (
    Dataset,
    eval_batches,
    load_dataset,
    num_train_batches,
    reshape_dataset,
    train_batches,
)
from esper.tolaria.distributed import RankGroup
from esper.tolaria.governor import Governor
from esper.tolaria.hooks import TrainerHook
from esper.tolaria.hosts import build_host, count_parameters, forward_flops_per_sample, model_input_shape
from esper.tolaria.loggers import RunLoggers, build_loggers
from esper.tolaria.resume import check_architecture, find_resume_payload
from esper.tolaria.run_state import EpochRecord, RunState
from esper.tolaria.runtime import resolve_device, seed_everything
from esper.tolaria.schedule import LRSchedule, build_optimizer
from esper.tolaria.seed_groups import sync_seed_groups
from esper.tolaria.states import (
    Attribute,
    ModelState,
    OptimizerGroups,
    RngState,
    StateRegistry,
)
from esper.tolaria.summary import run_summary


class Trainer:
    """Runs one training job; see `esper.tolaria.cli` for the command line around it."""

    def __init__(self, config: Config, run_dir: Path, morphogenetic: bool = True, verbose: bool = False,
                 progress: str = "auto", resume: str | None = None, ranks: RankGroup | None = None,
                 controller: ControllerFactory | None = None, hooks: Sequence[TrainerHook] = ()) -> None:
        """`controller` builds the run's controller once the model is wrapped (default: the config's
        policy in process, `esper.tolaria.controllers.policy_controller`); `hooks` are called after
        the controller, in order, on the training thread (see `esper.tolaria.hooks`)."""
        self.config = config
        # This process's place in a torchrun job (esper.tolaria.distributed); one process by default.
        self.ranks = ranks if ranks is not None else RankGroup()
        self.run_dir = Path(run_dir)
        self.morphogenetic = morphogenetic and config.morphogenetic
        self.verbose = verbose
        self.progress_mode = progress
        self.resume_spec = resume
        self.state = RunState()
        self.payload: dict[str, Any] | None = None
        self.morph = None
        self._display = None
        self.controller_factory: ControllerFactory = controller or policy_controller
        # Extension points (esper.tolaria.hooks.TrainerHook: the profiler, the Prometheus metrics,
        # esper.tolaria.server.ServedRunHooks); prepare() puts the run's controller first.
        self.hooks: list[TrainerHook] = list(hooks)
        self.stop_requested = False

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Validates everything and builds the model, data and optimizer; writes nothing."""
        cfg = self.config
        self.payload = find_resume_payload(self.resume_spec, self.run_dir)
        if self.payload is not None:
            check_architecture(self.payload, cfg)
        self.device = self.ranks.place(resolve_device(cfg.train.device))
        self.ranks.check_global_batch(cfg.data.batch_size)
        if cfg.train.torch_threads > 0:
            torch.set_num_threads(cfg.train.torch_threads)
        seed_everything(cfg.train.seed)
        dataset = load_dataset(cfg.data, cfg.train.seed)
        self.input_shape = model_input_shape(cfg.model, dataset.input_shape)
        self.data: Dataset = reshape_dataset(dataset, self.input_shape).to(self.device)
        self.model = build_host(cfg.model, self.input_shape, self.data.num_classes).to(self.device)
        self.params_initial = count_parameters(self.model)
        self.host_flops = forward_flops_per_sample(self.model, self.input_shape, self.device)
        self.steps_per_epoch = num_train_batches(len(self.data.train), cfg.data.batch_size)
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
        from esper.tolaria.morphogenesis import Morphogenesis

        # The seeds are planted in every run (the baseline too) so both have the same architecture;
        # with --no-morphogenetic they simply never germinate.
        self.morph = Morphogenesis(
            self.model, cfg, run_id=cfg.run_name, input_shape=self.input_shape, device=self.device,
            params_initial=self.params_initial, flops_initial=self.host_flops, enabled=self.morphogenetic,
            controller=self._build_controller, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
        )
        self.model = self.morph.model
        # The controller is the first hook: it sees a checkpoint before the model loads it and
        # applies what its services sent before the other hooks look at the step.
        self.hooks.insert(0, self.morph.controller)
        if self.payload is not None:  # merged width, before the optimizer (a missing state: see _restore)
            self.morph.restore_structure(self.payload.get("morph", {}))
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        if self.morph.growth is not None:
            self.morph.growth.optimizer = self.optimizer
            self.morph.growth.batches = self._growth_batches
        self.schedule = LRSchedule(cfg.schedule, self.total_steps, self.steps_per_epoch)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
        # bfloat16 has float32's range: no loss scaling needed.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.governor = Governor(cfg.governor)
        from esper.tolaria.counterfactual import build_counterfactual

        self.morph.driver.counterfactual = build_counterfactual(self)
        self.states = self._register_states()
        if self.payload is not None:
            self._restore(self.payload)
        self.ranks.broadcast_model(self.model)

    def _build_controller(self, morph: Any) -> Controller:
        """The run's controller for `morph`; under torchrun, rank 0's decisions broadcast to all."""
        return self.ranks.controller(self.controller_factory(morph, self.display_line))

    def _register_states(self) -> StateRegistry:
        """The run's stateful components under their checkpoint keys, in restore order: the seeds'
        morphogenesis after the model, the seed groups before the optimizer's state."""
        states = StateRegistry()
        states.register("model", ModelState(self.model))
        states.register("morph", self.morph, snapshot=True)
        states.register("optimizer_groups", OptimizerGroups(self.optimizer, self._rebuild_seed_groups))
        states.register("optimizer", self.optimizer)
        states.register("schedule", self.schedule)
        states.register("scaler", self.scaler, snapshot=True)
        states.register("governor", self.governor)
        states.register("run_state", self.state)
        states.register("params_initial", Attribute(self, "params_initial", int))
        states.register("rng", RngState())
        return states

    def _restore(self, payload: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.before_restore(payload)
        self.states.load_state_dict(payload, source=str(payload.get("path")))

    def _rebuild_seed_groups(self, order: list[str]) -> None:
        """One optimizer group per live seed module (after a load or rollback), in `order` first
        (the order the groups had when saved: optimizer state is matched by position)."""
        sync_seed_groups(self.optimizer, self.morph.param_groups(), self.config.optim.lr, order=order)

    # ------------------------------------------------------------------ run

    def start(self) -> None:
        """Creates the run directory and its writers (the first write of a run)."""
        if not self.ranks.is_writer:
            self.metrics = RunLoggers([])  # rank 0 writes the run's metrics
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.config))
        resume_step = self.state.global_step if self.payload is not None else None
        self.metrics = build_loggers(self.config, self.run_dir, resume_step)
        self.metrics.log_config(to_dict(self.config))
        self.morph.attach_event_log(self.run_dir / "events.jsonl", resume_step)

    def train(self) -> dict[str, Any]:
        """Runs the remaining epochs; returns the summary (also written to summary.json)."""
        from esper.tolaria.report import ProgressDisplay, write_summary

        cfg = self.config
        display = ProgressDisplay(self.progress_mode, cfg.train.epochs, self.steps_per_epoch, self.verbose)
        self._display = display
        if self.verbose:
            self.morph.echo = display.print
        wall_start = time.perf_counter() - self.state.wall_s
        stopped_early = False
        # Everything set up so far (torch, gRPC, the model, the data) lives for the whole run: move
        # it out of the collector's sight, so that a full collection triggered in the middle of a
        # step scans only what the run allocates later (~110 ms -> ~0 ms for the digits MLP here).
        gc.collect()
        gc.freeze()
        try:
            with display:
                for epoch in range(self.state.epoch, cfg.train.epochs):
                    if cfg.train.max_steps and self.state.global_step >= cfg.train.max_steps:
                        break
                    t0 = time.perf_counter()
                    train_loss, train_acc = self._train_epoch(epoch, display)
                    if self.stop_requested:
                        break
                    val_loss, val_acc = self.evaluate(self.data.val)
                    self._account_eval(len(self.data.val))
                    if cfg.governor.enabled and not math.isfinite(val_loss):
                        # The last update of the epoch broke the weights (its own loss was still
                        # finite): restore the epoch-start snapshot rather than keep them.
                        self._rollback(epoch, f"non-finite validation loss ({val_loss})")
                        val_loss, val_acc = self.evaluate(self.data.val)
                        self._account_eval(len(self.data.val))
                    self.state.record_validation(val_loss, val_acc)
                    self.ranks.reduce_telemetry(self.model)
                    growth = self.morph.epoch_end(
                        epoch=epoch, global_step=self.state.global_step, total_epochs=cfg.train.epochs,
                        train_loss=train_loss, val_loss=val_loss, val_acc=val_acc,
                        history=[h["val_loss"] for h in self.state.history] + [val_loss],
                        evaluate=self._counterfactual_eval,
                    )
                    self._apply_growth(growth)
                    record = EpochRecord(
                        epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                        val_acc=val_acc, lr=self.optimizer.param_groups[0]["lr"],
                        params=count_parameters(self.model), wall_s=time.perf_counter() - t0,
                    )
                    self.state.history.append(record.__dict__)
                    self.state.epoch = epoch + 1
                    self.state.wall_s = time.perf_counter() - wall_start
                    self.metrics.log_metrics("epoch", self.state.global_step, epoch + 1, {
                        **{k: v for k, v in record.__dict__.items() if k != "epoch"},
                        "active_seeds": self.morph.active_count(),
                        "train_flops": self.state.train_flops, "eval_flops": self.state.eval_flops,
                    })
                    self.metrics.flush()
                    display.epoch_done(record, self.morph.describe())
                    if any([hook.after_epoch(self, epoch, record) for hook in self.hooks]):
                        self.stop_requested = True
                    self.stop_requested = self.ranks.epoch_end(self, epoch, self.stop_requested)
                    if epoch + 1 == cfg.train.epochs or (epoch + 1) % cfg.checkpoint.every_epochs == 0:
                        self._checkpoint(best_metric=val_loss if cfg.checkpoint.save_best else None)
                    if self.stop_requested:
                        break
                    patience = cfg.train.early_stopping_patience
                    if patience and self.state.epochs_without_improvement >= patience:
                        stopped_early = True
                        if (epoch + 1) % cfg.checkpoint.every_epochs != 0:
                            self._checkpoint(best_metric=val_loss if cfg.checkpoint.save_best else None)
                        break
            test_loss, test_acc = self.evaluate(self.data.test)
            self.state.wall_s = time.perf_counter() - wall_start
            summary = run_summary(self, test_loss, test_acc, stopped_early)
            if self.ranks.is_writer:
                write_summary(self.run_dir, summary, self.morph.timeline(), plot=cfg.logging.timeline_plot,
                              echo=display)
            self.metrics.log_run_end(self.run_dir, summary)
        except BaseException:
            self.metrics.close(failed=True)
            raise
        finally:
            gc.unfreeze()  # what the run leaves behind is collected as usual (tests run many trainers)
        self.metrics.close()
        return summary

    def _train_epoch(self, epoch: int, display) -> tuple[float, float]:
        cfg = self.config
        self.model.train()
        start = self.state.global_step - epoch * self.steps_per_epoch
        start = max(0, min(start, self.steps_per_epoch))
        self.morph.lifecycle_changed = False
        self.governor.take_snapshot(self.model, self.optimizer, self._snapshot_extra())
        step_flops = 3.0 * self.morph.train_flops_per_sample()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        for _, x, y in train_batches(self.data, cfg.data.batch_size, cfg.train.seed, epoch, start, cfg.data.augment,
                                     shard=self.ranks.shard):
            if cfg.train.max_steps and self.state.global_step >= cfg.train.max_steps:
                break
            if self.morph.lifecycle_changed:  # a rollback must not undo a seed's transition
                self.morph.lifecycle_changed = False
                self.governor.take_snapshot(self.model, self.optimizer, self._snapshot_extra())
            lr_factor = self.schedule.apply(self.optimizer)
            model = self.ranks.training_model(self.model)  # DDP under torchrun, rebuilt as the model grows
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            # One sync per step: the governor needs the value (the global batch's, on every rank).
            loss_value = self.ranks.mean(loss)
            reason = self.governor.anomaly(loss_value)
            if reason is not None:
                self._rollback(epoch, reason)
                step_flops = 3.0 * self.morph.train_flops_per_sample()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.step()
                self.state.global_step += 1
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            self.state.global_step += 1
            self.state.train_flops += step_flops * x.shape[0] * self.ranks.world_size
            self.ranks.sync_alignment(self.model)  # the TRAINING gate reads it in after_step
            if self.morph.after_step(self.state.global_step, epoch):
                step_flops = 3.0 * self.morph.train_flops_per_sample()
                self._sync_param_groups()
            loss_sum += loss.detach().double() * x.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += x.shape[0]
            self.metrics.log_metrics("step", self.state.global_step, epoch + 1,
                               {"loss": loss_value, "lr": self.optimizer.param_groups[0]["initial_lr"] * lr_factor})
            display.step_done(loss_value)
            stop = any([hook.after_step(self, epoch, loss_value) for hook in self.hooks])
            if self.ranks.step_end(self, stop):  # every rank stops at the same step
                self.stop_requested = True
                break
        return self.ranks.epoch_means(loss_sum, correct, seen)

    @torch.no_grad()
    def evaluate(self, split) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the model on a split, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        self.ranks.sync_buffers(self.model)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        rows = self.ranks.eval_shard(len(split))  # each rank evaluates a slice; sums are all-reduced
        shard = type(split)(split.x[rows], split.y[rows])
        for x, y in eval_batches(self.data, shard, self.config.data.eval_batch_size):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                logits = self.model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
        loss_sum, correct = self.ranks.sum(loss_sum, correct)
        self.model.train(was_training)
        n = max(1, len(split))
        return float(loss_sum) / n, float(correct) / n

    def _counterfactual_eval(self) -> tuple[float, float]:
        """Validation used by the lifecycle's counterfactual measurement (its compute is growth overhead)."""
        result = self.evaluate(self.data.val)
        self.state.growth_flops += self.morph.eval_flops_per_sample() * len(self.data.val)
        return result

    def _account_eval(self, n: int) -> None:
        self.state.eval_flops += self.morph.eval_flops_per_sample() * n

    def _growth_batches(self):
        """Training batches for a width seed's statistics pass (its own order, no augmentation)."""
        cfg = self.config
        for _, x, y in train_batches(self.data, cfg.data.batch_size, cfg.train.seed + 7919, self.state.epoch):
            yield x, y

    def _apply_growth(self, growth) -> None:
        """After an epoch boundary (`growth` says what changed): the optimizer follows the seeds."""
        self.state.growth_flops += growth.flops
        self._sync_param_groups()

    def _sync_param_groups(self) -> None:
        """Makes the optimizer's seed groups match the live seeds (host and kept seeds keep their state)."""
        sync_seed_groups(self.optimizer, self.morph.param_groups(), self.config.optim.lr)

    def _snapshot_extra(self) -> dict[str, Any]:
        """What the governor's snapshot keeps besides the model and optimizer."""
        return self.states.state_dict(snapshot=True)

    def _rollback(self, epoch: int, reason: str) -> None:
        self.governor.roll_back(self.model, self.optimizer, self.states, self._rebuild_seed_groups)
        blamed = self.morph.roll_back_culprit(epoch, self.state.global_step, reason)
        self._sync_param_groups()
        self.metrics.log_metrics("event", self.state.global_step, epoch + 1, {"rollback": reason, "culled": blamed or ""})
        self.display_line(f"governor: {reason} at step {self.state.global_step}; rolled back"
                          + (f", seed {blamed} rolled back" if blamed else ""))

    def display_line(self, line: str) -> None:
        if self._display is not None:
            self._display.print(line)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, best_metric: float | None) -> None:
        """The loop's checkpoint: rank 0 writes it, every rank waits until it is complete."""
        self.save(best_metric)
        self.ranks.barrier()  # no rank goes on (or exits) before the checkpoint is complete

    def save(self, best_metric: float | None) -> Path | None:
        """Writes an atomic checkpoint of everything an exact resume needs; under torchrun only rank 0
        writes (and may call this alone, e.g. from the Tolaria server's hooks), the others get None."""
        if not self.ranks.is_writer:
            return None
        payload = {
            # What the run is (read before anything is built, or by esper-export); not restored.
            "config": to_dict(self.config),
            "architecture": architecture_of(self.config),
            "seed_manifest": self.morph.manifest(),
            "input_shape": list(self.input_shape),
            "num_classes": self.data.num_classes,
            "world_size": self.ranks.world_size,
            **self.states.state_dict(),
        }
        return ckpt.save_checkpoint(self.run_dir, self.state.epoch, payload, self.config.checkpoint.keep_last, best_metric)

