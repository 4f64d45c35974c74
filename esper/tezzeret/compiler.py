"""The compile pipeline (run inside a worker process) and the artifact loader.

`compile_blueprint(spec_bytes, input_shape, device, dtype)`:
1. builds the seed module with the Kasmina blueprint builder for chunks of `input_shape`
   (``[-1, chunk, *]``; the batch is dynamic);
2. checks function preservation: a freshly built seed must output exactly zero (within 1e-6 for
   fp32, 1e-12 for fp64), with the output shape of its input, and finite;
3. exports it with `torch.export` with a dynamic batch dimension, in eval mode (dropout off,
   batch norm on running statistics; parameters stay trainable), and serialises it with
   `torch.export.save`;
4. loads the bytes back and checks them at batch 1 and another batch size;
5. measures parameters, FLOPs per sample and the median forward latency.
A blueprint that fails any check gives ``CompileOutcome(valid=False, reason=...)``; only
unexpected internal errors raise.

`load_kernel_artifact(data)` turns stored bytes back into an `nn.Module` with
`torch.export.load` (no pickled code is executed).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from esper.v1 import common_pb2

ARTIFACT_FORMAT = "torch.export/pt2"
# A tiny artifact made by `make build` (write_warmup_artifact) for warm_up_loader.
WARMUP_ARTIFACT = Path(__file__).with_name("warmup.pt2")
WARMUP_CHUNK = 4
EXAMPLE_BATCH = 4
CHECK_BATCH = 7
MAX_BATCH = 1 << 20

TORCH_DTYPES = {
    common_pb2.D_TYPE_FLOAT32: torch.float32,
    common_pb2.D_TYPE_FLOAT64: torch.float64,
    common_pb2.D_TYPE_FLOAT16: torch.float16,
    common_pb2.D_TYPE_BFLOAT16: torch.bfloat16,
}
TORCH_DEVICES = {common_pb2.DEVICE_TYPE_CPU: "cpu", common_pb2.DEVICE_TYPE_CUDA: "cuda"}
# Largest |seed output| accepted at creation (the seed must not change the host's function).
PRESERVATION_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass
class CompileOutcome:
    """What a compile produced: a VALIDATED artifact's bytes and measurements, or the reason it is INVALID."""

    valid: bool
    reason: str = ""
    artifact: bytes = b""
    sha256: str = ""
    parameter_count: int = 0
    flops_per_sample: int = 0
    latency_us: float = 0.0
    preservation_error: float = 0.0


def _invalid(reason: str, **measured) -> CompileOutcome:
    return CompileOutcome(valid=False, reason=reason, **measured)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_latency_us(module: nn.Module, x: torch.Tensor, *, budget_s: float = 0.5, min_runs: int = 5,
                       max_runs: int = 200) -> float:
    """Median forward latency in microseconds (after two warm-up runs), within a time budget."""
    device = x.device.type
    times: list[float] = []
    with torch.no_grad():
        for _ in range(2):
            module(x)
        _sync(device)
        started = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            module(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def compile_blueprint(spec_bytes: bytes, input_shape: Sequence[int], device: int, dtype: int,
                      *, latency_budget_s: float = 0.5) -> CompileOutcome:
    """Compile one blueprint for chunks of `input_shape` on `device` in `dtype` (see module doc)."""
    from esper.kasmina.blueprints import BlueprintError, BlueprintSpec, blueprint_cost, build_seed_module

    spec = BlueprintSpec.FromString(spec_bytes)
    dims = [int(d) for d in input_shape]
    torch_dtype = TORCH_DTYPES[dtype]
    torch_device = TORCH_DEVICES[device]
    example_shape = (EXAMPLE_BATCH, *dims[1:])
    where = f"blueprint {spec.blueprint_id!r} v{spec.version} for input {dims} {torch_dtype} on {torch_device}"
    try:
        module = build_seed_module(spec, dims[1], example_shape, torch_dtype, torch_device)
    except (BlueprintError, ValueError) as exc:
        return _invalid(f"{where}: does not fit: {exc}")
    except RuntimeError as exc:  # e.g. an op without a kernel for this dtype/device
        return _invalid(f"{where}: building failed: {exc}")
    module.eval()
    parameter_count = sum(p.numel() for p in module.parameters())
    flops = int(blueprint_cost(spec, dims[1], dims).flops_per_sample)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(example_shape, generator=generator).to(device=torch_device, dtype=torch_dtype)
    try:
        with torch.no_grad():
            y = module(x)
    except RuntimeError as exc:
        return _invalid(f"{where}: forward failed: {exc}", parameter_count=parameter_count)
    if tuple(y.shape) != tuple(x.shape):
        return _invalid(f"{where}: output shape {list(y.shape)} differs from input shape {list(x.shape)}",
                        parameter_count=parameter_count)
    if not torch.isfinite(y).all():
        return _invalid(f"{where}: output is not finite at creation", parameter_count=parameter_count)
    preservation_error = float(y.abs().max().item()) if y.numel() else 0.0
    tolerance = PRESERVATION_TOLERANCE[torch_dtype]
    if preservation_error > tolerance:
        return _invalid(f"{where}: function preservation failed: max |seed output| {preservation_error:.3g} "
                        f"> {tolerance:g} at creation", parameter_count=parameter_count,
                        preservation_error=preservation_error)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        exported = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many types; all mean "cannot export"
        return _invalid(f"{where}: torch.export failed: {type(exc).__name__}: {str(exc)[:2000]}",
                        parameter_count=parameter_count, preservation_error=preservation_error)
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    data = buffer.getvalue()
    loaded = load_kernel_artifact(data).to(torch_device)
    with torch.no_grad():
        for n in (1, CHECK_BATCH):
            probe = torch.randn((n, *dims[1:]), generator=generator).to(device=torch_device, dtype=torch_dtype)
            out = loaded(probe)
            expected = module(probe)
            if tuple(out.shape) != tuple(probe.shape) or not torch.allclose(out, expected, atol=tolerance):
                return _invalid(f"{where}: the exported artifact disagrees with the module at batch {n}",
                                parameter_count=parameter_count, preservation_error=preservation_error)
    latency = measure_latency_us(loaded, x, budget_s=latency_budget_s)
    return CompileOutcome(valid=True, artifact=data, sha256=hashlib.sha256(data).hexdigest(),
                          parameter_count=parameter_count, flops_per_sample=flops,
                          latency_us=latency if math.isfinite(latency) else 0.0,
                          preservation_error=preservation_error)


class ExportedSeed(nn.Module):
    """A seed loaded from an artifact: the exported graph, with trainable parameters.

    The graph's train/eval behaviour was fixed at export (eval mode), and exported graphs refuse
    `.train()`/`.eval()`, so this wrapper records the mode without passing it down: a host
    model calling `.eval()` or `.train()` keeps working.
    """

    def __init__(self, graph: nn.Module, kernel_sha256: str = ""):
        super().__init__()
        self.graph = graph
        self.kernel_sha256 = kernel_sha256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> ExportedSeed:
        self.training = mode
        return self


def load_kernel_artifact(data: bytes, *, expected_sha256: str | None = None) -> ExportedSeed:
    """Load artifact bytes (from Urza) as a module mapping a chunk [N, C, *] to its delta.

    Uses `torch.export.load`, which reads a serialised graph and tensors, never pickled code.
    ValueError when `expected_sha256` is given and the bytes do not match it.
    """
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"artifact bytes hash to {digest}, expected {expected_sha256}")
    program = torch.export.load(io.BytesIO(data))
    return ExportedSeed(program.module(), digest)


def warm_up_compiler() -> None:
    """Import and exercise torch.export once so a worker's first real compile is not slowed by it."""
    torch.set_num_threads(1)
    module = nn.Linear(4, 4)
    x = torch.zeros(2, 4)
    torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))


def write_warmup_artifact(path: Path = WARMUP_ARTIFACT) -> Path:
    """Compile a tiny residual MLP seed (chunk 4) and write its artifact to `path` (atomically)."""
    from esper.kasmina.blueprints import get_blueprint

    outcome = compile_blueprint(get_blueprint("residual_mlp").SerializeToString(), [-1, WARMUP_CHUNK],
                                common_pb2.DEVICE_TYPE_CPU, common_pb2.D_TYPE_FLOAT32, latency_budget_s=0.01)
    if not outcome.valid:
        raise RuntimeError(f"the warm-up artifact did not compile: {outcome.reason}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(outcome.artifact)
    os.replace(tmp, path)
    return path


def warm_up_loader(path: Path = WARMUP_ARTIFACT) -> bool:
    """Pay the one-off cost of the first `torch.export.load` in this process now (about 1 s here).

    The first load imports torch's serialisation code and sets up lazily; later loads of other
    artifacts take about 20 ms. A trainer calls this before training, so that a kernel loaded
    while training runs does not hold the GIL for a second. Loads the artifact `make build`
    wrote and runs it forward and backward once; without that file it only imports the modules
    (most of the cost) and returns False.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        import importlib

        for name in ("torch._export.serde.serialize", "torch.export.pt2_archive._package"):
            importlib.import_module(name)
        return False
    module = load_kernel_artifact(data)
    x = torch.zeros((2, WARMUP_CHUNK), requires_grad=True)
    module(x).sum().backward()
    return True
