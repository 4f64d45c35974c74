"""esper-train grows a narrow MLP in width: the seed fossilizes, is merged, resumes and exports plain."""

from __future__ import annotations

import json

import pytest
import torch

from esper.models import MLP
from esper.tolaria.cli import main
from esper.tolaria.export import export_run
from esper.tolaria.hosts import count_parameters, forward_flops_per_sample

NARROW = [
    "data.name=teacher_student", "data.synthetic_samples=1200", "data.batch_size=64",
    "model.name=mlp", "model.width=4", "model.depth=1",
    "optim.name=adamw", "optim.lr=0.003", "train.epochs=6", "train.torch_threads=1",
    "lifecycle.training_min_steps=10", "lifecycle.gate_interval_steps=5", "lifecycle.min_alignment=0.0",
    "lifecycle.grafting_steps=10", "lifecycle.stabilization_steps=2", "lifecycle.evaluation_epochs=1",
    "lifecycle.fine_tuning_epochs=1", "lifecycle.min_contribution=-1.0",
    "controller.grow_without_plateau=true", "controller.cooldown_epochs=0", "controller.max_adaptations=1",
    "growth.modes=[width]", "growth.width_units=4", "growth.width_lifecycle=full", "services.mode=off",
    "logging.tensorboard=false", "logging.timeline_plot=false", "checkpoint.keep_last=10",
]


@pytest.mark.integration
def test_width_seed_fossilizes_merges_resumes_and_exports_plain(tmp_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), "--progress", "none", *NARROW]) == 0
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    path = [(e["to"], e["reason"]) for e in events if e["layer"] == "hidden.0"]
    assert [to for to, _ in path] == ["GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING",
                                      "FINE_TUNING", "FOSSILIZED", "DORMANT"]
    assert "merged into the host" in path[-1][1] and "8 units wide" in path[-1][1]
    (adaptation,) = summary["adaptations"]
    assert adaptation["mode"] == "width" and adaptation["outcome"] == "fossilized"
    # The grown model is a static MLP of width 8: same parameters and forward FLOPs per sample.
    features, classes = 32, 10
    static = MLP(features, hidden=8, num_classes=classes, depth=1)
    assert summary["params_final"] == count_parameters(static)
    static_flops = forward_flops_per_sample(static, (features,), torch.device("cpu"))
    assert summary["flops"]["forward_per_sample_final"] == static_flops
    assert summary["flops"]["growth_overhead"] > 0  # the GradMax statistics pass is counted

    # Resume from the first checkpoint after the merge: the same run to the last bit.
    merged_epoch = next(int(e["epoch"]) + 1 for e in events if e["to"] == "DORMANT" and e["layer"] == "hidden.0")
    merged_epoch = max(merged_epoch, 1)
    resumed = tmp_path / "resumed"
    checkpoint = out / "checkpoints" / f"epoch_{merged_epoch:04d}"
    assert checkpoint.exists(), sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(["--output-dir", str(resumed), "--progress", "none", "--resume", str(checkpoint), *NARROW]) == 0
    again = json.loads((resumed / "summary.json").read_text())
    assert again["final_val_loss"] == summary["final_val_loss"]
    assert again["test_acc"] == summary["test_acc"]

    manifest = export_run(out)
    assert manifest["plain"] is True and manifest["width_growth"] == [{"pair": "hidden.0>head", "units": 4}]
    program = torch.export.load(str(out / "export" / "program.pt2")).module()
    shapes = {k: list(v.shape) for k, v in program.state_dict().items()}
    assert shapes == {k: list(v.shape) for k, v in static.state_dict().items()}
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        program(torch.zeros(2, features))
    assert counter.get_total_flops() / 2 == static_flops


def test_width_mode_names_the_config_key(tmp_path):
    code = main(["--output-dir", str(tmp_path / "bad"), "--progress", "none", *NARROW, "growth.modes=[sideways]"])
    assert code == 2


@pytest.mark.integration
def test_depth_seed_merges_and_resumes(tmp_path):
    depth = [o for o in NARROW if not o.startswith(("growth.", "model.width"))] + [
        "model.width=8", "growth.modes=[depth]"]
    out = tmp_path / "deep"
    assert main(["--output-dir", str(out), "--progress", "none", *depth]) == 0
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    merges = [e for e in events if e["to"] == "DORMANT" and "merged into the host" in e["reason"]]
    assert len(merges) == 1 and "deepen.0 now has 1 block" in merges[0]["reason"]
    # One more 8 -> 8 hidden layer: the parameters of a static MLP of depth 2.
    assert summary["params_final"] == count_parameters(MLP(32, hidden=8, num_classes=10, depth=2))
    merged_epoch = int(merges[0]["epoch"]) + 1
    resumed = tmp_path / "deep_resumed"
    checkpoint = out / "checkpoints" / f"epoch_{merged_epoch:04d}"
    assert main(["--output-dir", str(resumed), "--progress", "none", "--resume", str(checkpoint), *depth]) == 0
    assert json.loads((resumed / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]
    manifest = export_run(out)
    assert manifest["plain"] is True and manifest["depth_growth"] == [{"stack": "deepen.0", "init": "identity"}]


@pytest.mark.integration
def test_direct_width_growth_merges_at_once_and_resumes(tmp_path):
    direct = [*NARROW, "growth.width_lifecycle=direct", "controller.max_adaptations=2", "train.epochs=4",
              "controller.parameter_budget=3.0", "controller.compute_budget=3.0"]
    out = tmp_path / "direct"
    assert main(["--output-dir", str(out), "--progress", "none", *direct]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(a["mode"], a["outcome"]) for a in summary["adaptations"]] == [("width", "fossilized")] * 2
    assert summary["params_final"] == count_parameters(MLP(32, hidden=12, num_classes=10, depth=1))  # 4+4+4
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["to"] for e in events] == ["MERGED", "MERGED"]   # no seed lifecycle
    resumed = tmp_path / "direct_resumed"
    assert main(["--output-dir", str(resumed), "--progress", "none", "--resume",
                 str(out / "checkpoints" / "epoch_0003"), *direct]) == 0
    assert json.loads((resumed / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]
