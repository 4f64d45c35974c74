"""Pieces of data-parallel training that need no torchrun job: sharding, the replica check on a real
two-process gloo group, DDP's treatment of frozen seeds, and the command line's refusals."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from esper.kasmina import wrap
from esper.models.mlp import MLP
from esper.tolaria.cli import main
from esper.tolaria.config import DataConfig
from esper.tolaria.data import Dataset, Split, load_dataset, train_batches
from esper.tolaria.distributed import RankGroup
from esper.tolaria.replicas import ReplicaMismatchError, replica_digests

REPO = Path(__file__).resolve().parents[2]
DEV = str(REPO / "configs" / "development.yaml")


def test_shards_of_a_global_batch_are_the_batch_one_process_trains_on():
    ds = load_dataset(DataConfig(name="digits"), seed=0)
    whole = list(train_batches(ds, 32, seed=0, epoch=3))
    parts = [list(train_batches(ds, 32, seed=0, epoch=3, shard=(r, 4))) for r in range(4)]
    assert len(whole) == len(parts[0]) == len(parts[3])
    for b, (_, x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[b][1] for p in parts]), x)
        assert torch.equal(torch.cat([p[b][2] for p in parts]), y)
    # a mid-epoch resume starts every shard at the same global batch
    assert [b for b, _, _ in train_batches(ds, 32, seed=0, epoch=3, start=5, shard=(1, 2))][0] == 5


def test_augmented_shards_draw_the_crops_of_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (200, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (200,), generator=gen)
    split = Split(x, y)
    ds = Dataset("cifar10", split, split, split, 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    whole = [x for _, x, _ in train_batches(ds, 64, seed=1, epoch=0, augment=True)]
    halves = [[x for _, x, _ in train_batches(ds, 64, seed=1, epoch=0, augment=True, shard=(r, 2))] for r in (0, 1)]
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][b], halves[1][b]]), batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, worker, *args) -> None:
    """Runs a test worker, then ends its process at once once it succeeded.

    A spawned gloo worker that returns normally sometimes aborts in teardown ("terminate called
    without an active exception", SIGABRT) even after a barrier and destroy_process_group: a C++
    thread of the group outlives it at interpreter exit. The workers' results are written to
    files before this point, so skipping the teardown loses nothing; a worker that raises exits
    normally with its traceback.
    """
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _replica_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = wrap(MLP(8, hidden=16, num_classes=3), ["hidden.0", "hidden.1"])
        model.hidden[1].germinate(0, "residual_mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        group = RankGroup(rank, 2, rank, "gloo")
        group.broadcast_model(model)  # the seeds were built from each rank's RNG: rank 0's win
        first = group.check_replicas(model, opt, epoch=0)
        if rank == 1:
            with torch.no_grad():
                model.hidden[0].host.weight[0, 0] += 1e-6
        try:
            group.check_replicas(model, opt, epoch=1)
            outcome = "no error"
        except ReplicaMismatchError as exc:
            outcome = str(exc)
        Path(out, f"rank{rank}.txt").write_text(f"{first}\n{outcome}")
    finally:
        dist.barrier()  # both ranks are done with the group; _spawned ends the process


def test_replica_check_names_the_tensor_that_differs_on_every_rank(tmp_path):
    mp.spawn(_spawned, args=(_replica_worker, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in (0, 1)]
    assert results[0][0] == results[1][0]  # equal digests after the broadcast
    for _, message in results:
        assert "after epoch 2" in message and "rank 1 differs from rank 0" in message
        assert "hidden.0.host.weight" in message and "hidden.1" not in message


def _unused_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        from esper.lifecycle import SeedLifecycleState as S

        torch.manual_seed(0)
        model = wrap(MLP(8, hidden=16, num_classes=3), ["hidden.0"])
        layer = model.hidden[0]
        layer.germinate(0, "residual_mlp")
        for state in (S.GRAFTING, S.STABILIZATION):  # a frozen seed: runs under no_grad
            layer.transition(0, state, "test")
        group = RankGroup(rank, 2, rank, "gloo")
        group.broadcast_model(model)
        ddp = group.training_model(model)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
        ddp(x).sum().backward()
        seed_grads = [p.grad is None for p in layer.seed_parameters(0)]
        host = layer.host.weight.grad.clone()
        gathered = [torch.zeros_like(host) for _ in range(2)]
        dist.all_gather(gathered, host)
        Path(out, f"rank{rank}.txt").write_text(f"{all(seed_grads)} {torch.equal(gathered[0], gathered[1])} "
                                                 f"{ddp.find_unused_parameters}")
    finally:
        dist.barrier()  # both ranks are done with the group; _spawned ends the process


def test_frozen_seed_parameters_get_no_gradient_under_ddp(tmp_path):
    # One process would leave .grad None for a seed frozen in STABILIZATION (so SGD's weight decay
    # does not move it); DDP must do the same, and still average the host's gradients.
    mp.spawn(_spawned, args=(_unused_worker, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == "True True True"


def _mirror_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        from esper.tolaria.config import load_config
        from esper.tolaria.replicas import match_optimizer_groups
        from esper.tolaria.trainer import Trainer

        config = load_config(DEV, ["services.mode=off", "train.torch_threads=1"])
        trainer = Trainer(config, Path(out) / "run", progress="none", ranks=RankGroup(rank, 2, rank, "gloo"))
        trainer.prepare()
        layer = trainer.morph.driver.site("hidden.1")
        lines = []
        if rank == 0:  # what rank 0's remote controller does between steps: a kernel arrives
            layer.germinate(0, "residual_mlp", await_kernel=True)
            layer.attach_kernel(0)
            match_optimizer_groups(trainer, ["host", "seed:hidden.1:0"])
        stop = trainer.ranks.step_end(trainer, stop=rank == 1)  # rank 1's hooks asked to stop
        lines.append(f"{stop} {layer.state_of(0).name} {[g['name'] for g in trainer.optimizer.param_groups]}")
        trainer.ranks.check_replicas(trainer.model, trainer.optimizer, epoch=0)  # raises if they differ
        if rank == 0:  # then its compile job for another slot fails: the germination is cancelled
            other = trainer.morph.driver.site("hidden.0")
            other.germinate(0, "residual_mlp", await_kernel=True)
        trainer.ranks.step_end(trainer, stop=False)
        if rank == 0:
            other.cancel(0, "compile failed")
        trainer.ranks.step_end(trainer, stop=False)
        lines.append(trainer.morph.driver.site("hidden.0").state_of(0).name)
        trainer.ranks.check_replicas(trainer.model, trainer.optimizer, epoch=1)
        Path(out, f"rank{rank}.txt").write_text("\n".join(lines))
    finally:
        dist.barrier()  # both ranks are done with the group; _spawned ends the process


def test_ranks_adopt_the_seeds_rank_0_changed_between_steps(tmp_path):
    mp.spawn(_spawned, args=(_mirror_worker, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().splitlines() == [
            "True TRAINING ['host', 'seed:hidden.1:0']", "DORMANT"]


def test_replica_digests_cover_parameters_seed_tables_specs_and_groups():
    torch.manual_seed(0)
    model = wrap(MLP(8, hidden=16, num_classes=3), ["hidden.0"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = replica_digests(model, opt)
    assert "hidden.0.table.state" in before and "seeds:hidden.0" in before
    model.hidden[0].germinate(0, "residual_mlp")
    after = replica_digests(model, opt)
    changed = {k for k in before if before[k] != after.get(k)}
    assert {"hidden.0.table.state", "seeds:hidden.0"} <= changed
    assert any(k.startswith("hidden.0.seeds.0") for k in after)


def test_mixed_precision_is_refused_on_the_cpu(capsys):
    code = main(["--config", DEV, "--device", "cpu", "--mixed-precision", "bf16", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--mixed-precision bf16 needs a CUDA device" in err and "train.device=cpu" in err


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(capsys, tmp_path):
    code = main(["--config", DEV, "--nproc", "3", "--output-dir", str(tmp_path / "r"), "data.batch_size=32"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.batch_size" in err and "does not split over 3 ranks" in err
    assert not (tmp_path / "r").exists()


def test_nproc_inside_torchrun_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--config", DEV, "--nproc", "2", "--output-dir", str(tmp_path / "r")]) == 2
    assert "either --nproc N or torchrun" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
