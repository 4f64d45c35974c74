"""`esper-bench kernels` end to end, with one round of the quick workloads."""

import json
import math

import pytest

from esper.bench import cli, kernels


def test_kernels_subcommand_is_registered():
    assert "kernels" in cli.subcommand_modules()


def test_kernels_quick_writes_every_figure(tmp_path, monkeypatch, capsys):
    def extra(quick, device):
        assert quick is True and device == "cpu"
        return {"extra_figure": 1.5}

    monkeypatch.setattr(kernels, "FIGURE_SOURCES", [extra])
    monkeypatch.setattr(kernels, "OVERHEAD_MODULE", "esper.bench.no_such_module_for_this_test")
    out_json, out_md = tmp_path / "k.json", tmp_path / "k.md"
    argv = ["kernels", "--quick", "--rounds", "1", "--json", str(out_json), "--markdown", str(out_md)]
    assert cli.main(argv) == 0
    figures = json.loads(out_json.read_text())
    ops = [
        "seed_blend_cnn",
        "seed_blend_mlp",
        "telemetry_accumulate_cnn",
        "grad_telemetry_accumulate_cnn",
        "telemetry_accumulate_mlp",
        "grad_telemetry_accumulate_mlp",
        "lifecycle_advance",
    ]
    for op in ops:
        for suffix in ("_ms", "_eager_ms", "_reference_ms", "_speedup_vs_eager", "_speedup_vs_reference"):
            value = figures[op + suffix]
            assert math.isfinite(value) and value > 0, (op + suffix, value)
        assert figures[op + "_speedup_vs_eager"] == pytest.approx(
            figures[op + "_eager_ms"] / figures[op + "_ms"]
        )
    for key in (
        "kernel_cache_hit_ns",
        "kernel_cache_miss_ns",
        "kernel_cache_put_evict_ns",
        "python_dict_hit_ns",
    ):
        assert 0 < figures[key] < 1e6, key
    assert figures["extra_figure"] == 1.5
    assert "| seed_blend_cnn |" in out_md.read_text() and "esper-bench kernels --quick" in out_md.read_text()
    assert "seed_blend_cnn" in capsys.readouterr().out


def test_kernels_refuses_cuda_without_a_device(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert cli.main(["kernels", "--device", "cuda"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
