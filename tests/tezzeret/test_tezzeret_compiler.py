"""The compile pipeline and the artifact loader, in-process (no network)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.kasmina.blueprints import CATALOG, get_blueprint
from esper.tezzeret import compile_blueprint, kernel_id_for, load_kernel_artifact
from esper.v1 import common_pb2

CPU, CUDA = common_pb2.DEVICE_TYPE_CPU, common_pb2.DEVICE_TYPE_CUDA
F32, F64 = common_pb2.D_TYPE_FLOAT32, common_pb2.D_TYPE_FLOAT64
SHAPES = {
    common_pb2.SEED_INPUT_KIND_UNSPECIFIED: [-1, 16],
    common_pb2.SEED_INPUT_KIND_FEATURES: [-1, 16],
    common_pb2.SEED_INPUT_KIND_SEQUENCE: [-1, 16, 12],
    common_pb2.SEED_INPUT_KIND_IMAGE: [-1, 16, 6, 6],
}


@pytest.mark.parametrize("blueprint_id", ["residual_mlp", "conv3x3", "sequence_self_attention"])
def test_compile_and_load_round_trip(blueprint_id):
    spec = CATALOG[blueprint_id]
    shape = SHAPES[spec.input_kind]
    outcome = compile_blueprint(spec.SerializeToString(), shape, CPU, F32, latency_budget_s=0.05)
    assert outcome.valid, outcome.reason
    assert outcome.artifact[:2] == b"PK"  # torch.export.save writes a zip archive
    assert outcome.parameter_count > 0 and outcome.flops_per_sample > 0 and outcome.latency_us > 0
    assert outcome.preservation_error == 0.0
    seed = load_kernel_artifact(outcome.artifact, expected_sha256=outcome.sha256)
    for batch in (1, 5, 33):  # dynamic batch
        x = torch.randn(batch, *shape[1:])
        y = seed(x)
        assert y.shape == x.shape
        assert torch.equal(y, torch.zeros_like(y)), "a fresh seed must not change the host's function"
    # parameters are trainable through the exported graph
    params = [p for p in seed.parameters() if p.requires_grad]
    assert params
    loss = seed(torch.randn(3, *shape[1:])).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # a host model switching train/eval keeps working with the loaded seed inside
    host = nn.Sequential(nn.Identity(), seed)
    host.eval()
    host.train()
    assert seed.training


def test_loader_checks_the_digest():
    outcome = compile_blueprint(CATALOG["lora_adapter"].SerializeToString(), [-1, 8], CPU, F64, latency_budget_s=0.01)
    assert outcome.valid, outcome.reason
    with pytest.raises(ValueError, match="expected"):
        load_kernel_artifact(outcome.artifact, expected_sha256="0" * 64)
    y = load_kernel_artifact(outcome.artifact)(torch.randn(2, 8, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_blueprint_that_does_not_fit_is_invalid_with_reason():
    outcome = compile_blueprint(CATALOG["conv3x3"].SerializeToString(), [-1, 16], CPU, F32)
    assert not outcome.valid and not outcome.artifact
    assert "conv3x3" in outcome.reason and "input_kind" in outcome.reason
    spec = get_blueprint("sequence_self_attention")
    heads = next(layer.num_heads for layer in spec.layers if layer.num_heads)
    outcome = compile_blueprint(spec.SerializeToString(), [-1, heads * 3 + 1, 8], CPU, F32)
    assert not outcome.valid and "num_heads" in outcome.reason


def test_kernel_ids_are_deterministic_and_distinguish_every_input():
    spec = CATALOG["residual_mlp"]
    base = kernel_id_for(spec, [-1, 16], CPU, F32)
    assert base == kernel_id_for(get_blueprint("residual_mlp"), [-1, 16], CPU, F32)
    assert base.startswith("residual_mlp-v1-")
    changed = get_blueprint("residual_mlp")
    changed.description = "same id and version, other content"
    others = {kernel_id_for(spec, [-1, 32], CPU, F32), kernel_id_for(spec, [-1, 16], CUDA, F32),
              kernel_id_for(spec, [-1, 16], CPU, F64), kernel_id_for(changed, [-1, 16], CPU, F32)}
    assert base not in others and len(others) == 4


@pytest.mark.gpu
def test_compile_for_cuda_and_load_on_cuda():
    outcome = compile_blueprint(CATALOG["conv3x3"].SerializeToString(), [-1, 16, 8, 8], CUDA, F32,
                                latency_budget_s=0.05)
    assert outcome.valid, outcome.reason
    seed = load_kernel_artifact(outcome.artifact)
    x = torch.randn(3, 16, 8, 8, device="cuda")
    y = seed(x)
    assert y.device.type == "cuda" and torch.equal(y, torch.zeros_like(y))


def test_warm_up_loader_uses_the_built_artifact_or_imports_only(tmp_path):
    from esper.tezzeret.compiler import WARMUP_ARTIFACT, WARMUP_CHUNK, warm_up_loader, write_warmup_artifact

    path = write_warmup_artifact(tmp_path / "warmup.pt2")
    module = load_kernel_artifact(path.read_bytes())
    x = torch.randn(3, WARMUP_CHUNK)
    assert module(x).shape == x.shape and torch.equal(module(x), torch.zeros_like(x))  # a fresh seed: zero
    assert warm_up_loader(path) is True
    assert warm_up_loader(tmp_path / "missing.pt2") is False
    # `make build` writes the package's own copy (the one esper-train warms up with).
    assert WARMUP_ARTIFACT.exists(), "esper/tezzeret/warmup.pt2 is missing: run make build"
