"""`esper-bench blend-bandwidth`: the achieved memory bandwidth of the seed_blend forward.

The fused blend reads the host output and the seeds' output and writes the blended output: three
tensors of the activation's size, so its bandwidth is 3 x bytes / time. The named baseline,
measured in the same run on the same device, is a plain device copy of a tensor of that size
(`dst.copy_(src)`, 2 x bytes / time): the bandwidth this device actually reaches for a streaming
kernel. The report gives both and their ratio (the fraction of achievable bandwidth the blend
reaches), plus the eager PyTorch blend (slice per seed, `torch.cat`) for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--shape", default="256,256,32,32", help="activation shape N,C,H,W (default 256,256,32,32)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--markdown", help="append the report to this file")
    p.add_argument("--json", help="write the figures here")


def _time(fn, device: torch.device, rounds: int) -> float:
    """Median seconds of one call (CUDA: synchronised around each call)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(device: torch.device, shape: tuple[int, ...], seeds: int, dtype: torch.dtype, rounds: int) -> dict:
    """Seconds and GB/s of the blend, the eager blend and a device copy of the same size."""
    from esper.bench.kernels import eager_seed_blend
    from esper.kasmina import ops
    from esper.lifecycle import SeedLifecycleState as S

    gen = torch.Generator(device=device).manual_seed(0)
    host = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    seed = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    states = [S.GRAFTING] * seeds
    state = torch.tensor([int(s) for s in states], dtype=torch.int64, device=device)
    alphas = [0.5] * seeds
    alpha = torch.tensor(alphas, dtype=torch.float32, device=device)
    dst = torch.empty_like(host)
    nbytes = host.numel() * host.element_size()
    with torch.no_grad():
        blend_s = _time(lambda: ops.seed_blend(host, seed, state, alpha), device, rounds)
        eager_s = _time(lambda: eager_seed_blend(host, seed, states, alphas), device, rounds)
        copy_s = _time(lambda: dst.copy_(host), device, rounds)
    blend_gbs = 3 * nbytes / blend_s / 1e9
    copy_gbs = 2 * nbytes / copy_s / 1e9
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": list(shape), "seeds": seeds, "dtype": str(dtype).replace("torch.", ""),
        "blend_ms": blend_s * 1e3, "eager_blend_ms": eager_s * 1e3, "copy_ms": copy_s * 1e3,
        "blend_gb_per_s": blend_gbs, "copy_gb_per_s": copy_gbs,
        "blend_fraction_of_copy_bandwidth": blend_gbs / copy_gbs, "speedup_vs_eager": eager_s / blend_s,
    }


def markdown(fig: dict) -> str:
    return "\n".join([
        f"### seed_blend bandwidth on {fig['device_name']} ({fig['device']})", "",
        f"Activation {fig['shape']} {fig['dtype']}, {fig['seeds']} seeds in GRAFTING, forward only.", "",
        "| what | ms | GB/s |", "|---|---|---|",
        f"| esper seed_blend (3 x size moved) | {fig['blend_ms']:.3f} | {fig['blend_gb_per_s']:.1f} |",
        f"| eager blend (slices + cat) | {fig['eager_blend_ms']:.3f} | |",
        f"| baseline: device copy (2 x size moved) | {fig['copy_ms']:.3f} | {fig['copy_gb_per_s']:.1f} |", "",
        f"seed_blend reaches **{fig['blend_fraction_of_copy_bandwidth']:.2f}** of the copy's bandwidth and is "
        f"{fig['speedup_vs_eager']:.2f}x the eager blend.", ""])


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("esper-bench blend-bandwidth: --device cuda needs a CUDA device, and none is available", file=sys.stderr)
        return 2
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        print(f"esper-bench blend-bandwidth: --shape {args.shape!r}: expected integers N,C[,H,W]", file=sys.stderr)
        return 2
    if len(shape) < 2 or shape[1] % args.seeds:
        print(f"esper-bench blend-bandwidth: --shape {args.shape}: expected [N, C, *] with C divisible by "
              f"--seeds {args.seeds}", file=sys.stderr)
        return 2
    fig = measure(device, shape, args.seeds, getattr(torch, args.dtype), args.rounds)
    text = markdown(fig)
    print(text)
    if args.markdown:
        with Path(args.markdown).open("a") as fh:
            fh.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="esper-bench blend-bandwidth")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
