"""Data-parallel training under torchrun: one `RankGroup` per process, a no-op for a single process.

    torchrun --nproc-per-node 2 -m esper.tolaria.cli --config configs/development.yaml
    esper-train --nproc 2 --config configs/development.yaml          # launches torchrun for you

Every rank holds the whole model and the whole (in-memory) dataset; `data.batch_size` is the
*global* batch, and rank r trains on the r-th contiguous slice of each global batch. So the data
position of a run is still (epoch, batch index), independent of the number of ranks, and a
checkpoint resumes exactly on any number of ranks that divides the batch.

Growth stays in lockstep without sending models around:
- the deterministic parts of the lifecycle (step and epoch gates, embargoes, counterfactual
  measurements) run on every rank on identical inputs: telemetry is all-reduced before the epoch
  decision, the TRAINING gate's gradient alignment after each step, validation is sharded and
  all-reduced;
- what is not deterministic comes from rank 0 only: the controller's decisions (broadcast with the
  step they apply at), and seeds that rank 0's remote controller germinates, attaches or cancels
  between steps (the other ranks adopt rank 0's layer when their seed states differ);
- whenever the set of parameters changes (a seed is built, culled, a layer is replaced by a wider
  one), parameters are broadcast from rank 0 and the DistributedDataParallel wrapper is rebuilt;
- after each epoch the ranks all-gather a digest of their parameters, buffers, seed specs and
  optimizer groups and stop with an error naming what differs.

Collectives have a timeout (`--collective-timeout`), so a rank that dies never leaves the others
waiting for ever; torchrun then stops the job with a non-zero exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esper.kasmina.lifecycle import FROZEN_STATES
from esper.kasmina.ops import TELEMETRY_GRAD_SQ, TELEMETRY_GRAD_STEPS
from esper.lifecycle import SeedLifecycleState as S
from esper.tolaria.replicas import (
    BroadcastDecisions,
    DistributedError,
    adopt_layer,
    layer_state,
    match_optimizer_groups,
    mismatch_error,
    replica_digests,
    seed_layers,
)
from esper.tolaria.torchrun import launched_by_torchrun

DEFAULT_TIMEOUT_S = 30.0


def _is_seed_table(name: str) -> bool:
    return ".table." in f".{name}"


class RankGroup:
    """This process's place in a data-parallel job; every method is a cheap no-op for one process."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str = "") -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend = backend
        # Where collectives' own tensors live: NCCL reduces CUDA tensors only.
        self.device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        self._ddp: nn.Module | None = None
        self._ddp_key: tuple | None = None
        self._broadcast_key: tuple | None = None
        self._alignment_base: dict[str, torch.Tensor] = {}
        # (epoch, every rank's replica digest) from each epoch's check, for the run's summary.
        self.digests: list[tuple[int, list[str]]] = []

    # ------------------------------------------------------------------ set-up

    @classmethod
    def start(cls, device: str, timeout_s: float = DEFAULT_TIMEOUT_S, torch_threads: int = 0) -> RankGroup:
        """Joins the job torchrun set up (env RANK/WORLD_SIZE/...), or returns the single-process group.

        `device` is train.device: gloo on CPU, NCCL on CUDA (cuda:LOCAL_RANK per rank).
        """
        if not launched_by_torchrun():
            return cls()
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local)
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        if torch_threads <= 0 and not use_cuda:
            # Ranks on one machine share its cores: oversubscribed intra-op pools thrash.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        return cls(rank, world, local, backend)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run directory and talks to the services; the others only compute."""
        return self.rank == 0

    def close(self) -> None:
        """After a run: every rank done (rank 0 writes the summary last), then the group goes."""
        if self.active and dist.is_initialized():
            # Tearing the group down while a peer still uses its connections can abort the process.
            self.wait(600, "every rank to finish")
            dist.destroy_process_group()

    def place(self, device: torch.device) -> torch.device:
        """The device of this rank (cuda -> cuda:LOCAL_RANK)."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def check_global_batch(self, batch_size: int) -> None:
        from esper.tolaria.config import ConfigError

        if batch_size % self.world_size:
            raise ConfigError(
                f"data.batch_size: the global batch {batch_size} does not split over {self.world_size} ranks; "
                f"expected a multiple of {self.world_size} (each rank trains on batch_size / ranks samples)"
            )

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): which slice of each global batch this rank trains on."""
        return self.rank, self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wait(self, seconds: float, what: str) -> None:
        """A barrier that may take longer than a collective's timeout (rank 0 starting services)."""
        if not self.active:
            return
        try:
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=seconds))
            else:
                dist.barrier()
        except RuntimeError as exc:
            raise DistributedError(f"waited {seconds:.0f} s for {what}: {str(exc).splitlines()[0][:200]}") from None

    def _device_of(self, model: nn.Module) -> torch.device:
        ref = next(model.parameters(), None)
        return ref.device if ref is not None else torch.device("cpu")

    def report(self) -> dict[str, Any]:
        """What the run's summary records about the ranks (and each epoch's replica check)."""
        return {"world_size": self.world_size, "backend": self.backend or "none",
                "replica_digests": [{"epoch": e, "ranks": d} for e, d in self.digests]}

    # ------------------------------------------------------------------ the model

    def controller(self, controller: Any) -> Any:
        """The controller this rank's morphogenesis uses: under torchrun, rank 0's decisions
        (`controller` decides on rank 0 only), broadcast to every rank; else `controller` itself."""
        return BroadcastDecisions(controller, self) if self.active else controller

    def broadcast_model(self, model: nn.Module, buffers: bool = True) -> None:
        """Parameters (and buffers) of rank 0 on every rank: at start, after a resume, after growth."""
        if not self.active:
            return
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
            if buffers:
                for _, b in model.named_buffers():
                    dist.broadcast(b, src=0)
        self._broadcast_key = self._parameter_key(model)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers outside the seed tables (normalisation statistics) before an evaluation,
        as DistributedDataParallel's buffer broadcast would; seed tables are kept equal by the
        lifecycle itself and their telemetry accumulators are per rank until reduced."""
        if not self.active:
            return
        with torch.no_grad():
            for name, b in model.named_buffers():
                if not _is_seed_table(name):
                    dist.broadcast(b, src=0)

    @staticmethod
    def _parameter_key(model: nn.Module) -> tuple:
        return tuple((id(p), tuple(p.shape)) for p in model.parameters())

    def training_model(self, model: nn.Module) -> nn.Module:
        """The module to run the training forward on: a DistributedDataParallel wrapper of `model`,
        rebuilt whenever its parameters change (a seed built or removed, a layer widened) or a seed
        starts or stops being frozen (frozen seeds get no gradient: DDP must look for unused ones)."""
        if not self.active:
            return model
        layers = seed_layers(model)
        frozen = any(layer.state_of(i) in FROZEN_STATES for _, layer in layers for i in range(layer.num_seeds))
        key = (self._parameter_key(model), frozen)
        if self._ddp is None or key != self._ddp_key:
            from torch.nn.parallel import DistributedDataParallel

            device = self._device_of(model)
            # No init sync: parameters are broadcast explicitly when they change, and the seed
            # tables' telemetry accumulators must stay per rank until they are all-reduced.
            self._ddp = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False,
                forward_sync_buffers=False, find_unused_parameters=frozen,
            )
            self._ddp_key = key
        self._alignment_base = {name: layer.table.alignment.clone() for name, layer in layers
                                if any(layer.state_of(i) == S.TRAINING for i in range(layer.num_seeds))}
        self._ddp.train(model.training)
        return self._ddp

    # ------------------------------------------------------------------ reductions

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (the global batch's loss); one collective."""
        if not self.active:
            return float(value.detach())
        t = value.detach().to(self.device, torch.float64).reshape(1)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Element-wise sums over the ranks of scalars (one collective)."""
        if not self.active:
            return list(values)
        t = torch.stack([v.detach().to(self.device, torch.float64).reshape(()) for v in values])
        dist.all_reduce(t)
        return list(t.unbind(0))

    def epoch_means(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float]:
        """(mean loss, accuracy) of one epoch over every rank's samples."""
        total_loss, total_correct, total_seen = self.sum(loss_sum, correct, torch.tensor(float(seen)))
        n = float(total_seen)
        if n == 0:
            return float("nan"), float("nan")
        return float(total_loss) / n, float(total_correct) / n

    def eval_shard(self, n: int) -> slice:
        """This rank's contiguous slice of an n-sample evaluation split."""
        per = -(-n // self.world_size)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def sync_alignment(self, model: nn.Module) -> None:
        """Before the step gates read it: the TRAINING seeds' gradient alignment of this step,
        summed over ranks and rescaled to what one process with the global batch accumulates.

        Each rank's loss is a mean over batch/ranks samples, so its dL/dh is `ranks` times the
        global one: <g, s> sums to ranks x, |g|^2 to ranks^2 x, |s|^2 to 1 x the global values.
        """
        if not self.active or not self._alignment_base:
            return
        layers = dict(seed_layers(model))
        names = sorted(self._alignment_base)
        deltas = torch.cat([(layers[n].table.alignment - self._alignment_base[n]).reshape(-1) for n in names])
        dist.all_reduce(deltas)
        scale = torch.tensor([1.0 / self.world_size, 1.0 / self.world_size**2, 1.0], dtype=deltas.dtype,
                             device=deltas.device)
        offset = 0
        for n in names:
            table = layers[n].table
            size = table.alignment.numel()
            delta = deltas[offset : offset + size].view_as(table.alignment) * scale
            table.alignment.copy_(self._alignment_base[n] + delta)
            offset += size

    def reduce_telemetry(self, model: nn.Module) -> None:
        """Before the epoch's decision: every site's telemetry summed over ranks, the gradient
        columns rescaled to the global batch (|dL/dh|^2 / ranks^2, one count per global step)."""
        if not self.active:
            return
        tables = [layer.table.telemetry for _, layer in seed_layers(model)]
        if not tables:
            return
        flat = torch.cat([t.reshape(-1) for t in tables])
        dist.all_reduce(flat)
        offset = 0
        for t in tables:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            t[:, TELEMETRY_GRAD_SQ] /= self.world_size**2
            t[:, TELEMETRY_GRAD_STEPS] /= self.world_size
            offset += t.numel()

    # ------------------------------------------------------------------ agreement between steps

    def step_end(self, trainer: Any, stop: bool) -> bool:
        """After a step's hooks: agree on a stop request (any rank), adopt the seed changes that
        rank 0's hooks made (a kernel attached, a germination cancelled) and, when any rank's
        parameters changed (a seed built, a layer widened), take rank 0's; True means stop."""
        if not self.active:
            return stop
        return self._agree(trainer, stop)

    def epoch_end(self, trainer: Any, epoch: int, stop: bool) -> bool:
        """After an epoch's hooks: agree on stop, adopt rank 0's seeds, broadcast the parameters of
        new seeds, then check that every rank holds the same model; True means stop."""
        if not self.active:
            return stop
        stop = self._agree(trainer, stop)
        self.check_replicas(trainer.model, trainer.optimizer, epoch)
        return stop

    def _agree(self, trainer: Any, stop: bool) -> bool:
        model = trainer.model
        layers = seed_layers(model)
        states = [float(layer.state_of(i)) for _, layer in layers for i in range(layer.num_seeds)]
        changed = self._parameter_key(model) != self._broadcast_key
        mine = torch.tensor([float(stop), float(changed), *states], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        stop = any(bool(g[0]) for g in gathered)
        changed = any(bool(g[1]) for g in gathered)
        gathered = [g[2:] for g in gathered]
        reference = gathered[0]
        if not all(torch.equal(g, reference) for g in gathered):
            self._adopt_rank0_seeds(trainer, layers, gathered)
            changed = True
        if changed:
            # New parameters start from rank 0's values everywhere (seeds built from each rank's
            # RNG, widened layers initialised from each rank's gradients).
            self.broadcast_model(model, buffers=False)
        return stop

    def _adopt_rank0_seeds(self, trainer: Any, layers: list, gathered: list[torch.Tensor]) -> None:
        reference = gathered[0]
        # Rank 0's hooks changed seeds between steps: the other ranks take rank 0's layers.
        differing: set[int] = set()
        offset = 0
        for index, (_, layer) in enumerate(layers):
            span = slice(offset, offset + layer.num_seeds)
            if any(not torch.equal(g[span], reference[span]) for g in gathered):
                differing.add(index)
            offset += layer.num_seeds
        payload: list[Any] = [None]
        if self.is_writer:
            payload = [{
                "layers": {layers[i][0]: layer_state(layers[i][1]) for i in sorted(differing)},
                "groups": [g.get("name") for g in trainer.optimizer.param_groups],
                # The governor blames the latest pending adaptation: every rank must know them.
                "adaptations": trainer.morph.state_dict()["adaptations"],
            }]
        dist.broadcast_object_list(payload, src=0)
        if not self.is_writer:
            for name, layer in layers:
                if name in payload[0]["layers"]:
                    adopt_layer(layer, payload[0]["layers"][name])
            match_optimizer_groups(trainer, payload[0]["groups"])
            trainer.morph.load_state_dict(dict(trainer.morph.state_dict(), adaptations=payload[0]["adaptations"]))

    # ------------------------------------------------------------------ replica check

    def check_replicas(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> str:
        """All-gathers a digest of parameters, buffers, seed specs and optimizer groups; raises
        ReplicaMismatchError naming what differs. Returns this rank's digest."""
        parts = replica_digests(model, optimizer)
        whole = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        if not self.active:
            return whole
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, whole)
        self.digests.append((epoch + 1, list(gathered)))
        if all(g == gathered[0] for g in gathered):
            return whole
        tables: list[Any] = [None] * self.world_size
        dist.all_gather_object(tables, parts)
        raise mismatch_error(epoch, tables)

