"""`esper-bench kernels`: the Kasmina ops and kernel cache against eager PyTorch, in one run.

Each op is timed against two baselines measured in the same run, interleaved (the candidates
take turns, in alternating order, round after round, so machine load hits all alike) and
summarised by medians:

- eager: what a layer would write without the extension (a Python loop over the seeds' channel
  slices for the blend, per-seed views and reductions for telemetry, masked updates for the table);
- reference: `esper.kasmina.reference`, the vectorised pure-PyTorch spec the tests check against.

Ratios are speedups: baseline median / op median (> 1 means the op is faster). The kernel cache
is timed per call from Python (ns), next to a plain dict lookup as the named baseline. Extra
figures come from `FIGURE_SOURCES` and, when it exists, `esper.bench.kasmina_overhead.figures`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from esper.kasmina import ops
from esper.kasmina import reference as ref
from esper.kasmina.kernel_cache import KernelCache
from esper.lifecycle import SeedLifecycleState as S

FigureSource = Callable[[bool, str], dict[str, float]]

# Functions (quick, device) -> {figure: value} whose figures are appended to the kernels table.
# Other modules may append to this list; `esper.bench.kasmina_overhead` is picked up by name.
FIGURE_SOURCES: list[FigureSource] = []

OVERHEAD_MODULE = "esper.bench.kasmina_overhead"

BLENDED = (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED)
# A realistic mix: one seed of each kind of forward path (straight-through, blended, dormant).
STATE_MIX = (S.TRAINING, S.GRAFTING, S.FOSSILIZED, S.DORMANT)


def register_figures(source: FigureSource) -> FigureSource:
    """Adds a figure source to `esper-bench kernels` (usable as a decorator)."""
    FIGURE_SOURCES.append(source)
    return source


@dataclass(frozen=True)
class Comparison:
    """Medians (seconds per call) of one op and its baselines."""

    name: str
    workload: str
    op: float
    eager: float
    reference: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], rounds: int, iters: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternating order over `rounds`."""
    for fn in candidates.values():  # warm-up: allocator, lazy init, caches
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = candidates[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def _table(num_seeds: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    states = [STATE_MIX[i % len(STATE_MIX)] for i in range(num_seeds)]
    state = torch.tensor([int(s) for s in states], dtype=torch.int64, device=device)
    alpha = torch.linspace(0.2, 0.9, num_seeds, dtype=torch.float32, device=device)
    return state, alpha


def eager_seed_blend(
    host: torch.Tensor, seed: torch.Tensor, states: list[int], alphas: list[float]
) -> torch.Tensor:
    """Blend written per seed in eager PyTorch (the layer keeps states/alphas as Python lists)."""
    chunk = host.shape[1] // len(states)
    outs = []
    for i, (state, alpha) in enumerate(zip(states, alphas, strict=True)):
        h = host[:, i * chunk : (i + 1) * chunk]
        if state in BLENDED or state == S.TRAINING:
            s = seed[:, i * chunk : (i + 1) * chunk]
            s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
            outs.append(h + alpha * s if state in BLENDED else h + (s - s.detach()))
        else:
            outs.append(h)
    return torch.cat(outs, dim=1)


def eager_telemetry_accumulate_(x: torch.Tensor, telemetry: torch.Tensor, dead_threshold: float) -> None:
    """Telemetry with per-seed views and float64 reductions in eager PyTorch."""
    v = x.reshape(x.shape[0], telemetry.shape[0], -1)
    telemetry[:, ops.TELEMETRY_SUM] += v.sum(dim=(0, 2), dtype=torch.float64)
    telemetry[:, ops.TELEMETRY_SUMSQ] += (v * v).sum(dim=(0, 2), dtype=torch.float64)
    telemetry[:, ops.TELEMETRY_DEAD] += (v <= dead_threshold).sum(dim=(0, 2))
    telemetry[:, ops.TELEMETRY_COUNT] += v.shape[0] * v.shape[2]


def eager_grad_telemetry_accumulate_(grad: torch.Tensor, telemetry: torch.Tensor) -> None:
    """Gradient telemetry with per-seed views in eager PyTorch."""
    v = grad.reshape(grad.shape[0], telemetry.shape[0], -1)
    telemetry[:, ops.TELEMETRY_GRAD_SQ] += (v * v).sum(dim=(0, 2), dtype=torch.float64)
    telemetry[:, ops.TELEMETRY_GRAD_STEPS] += 1


def eager_lifecycle_advance_(
    state: torch.Tensor, alpha: torch.Tensor, steps: torch.Tensor, alpha_step: float
) -> None:
    """The table update with masked in-place ops in eager PyTorch."""
    steps[(state != S.DORMANT) & (state != S.UNSPECIFIED)] += 1
    grafting = state == S.GRAFTING
    alpha[grafting] = (alpha[grafting] + alpha_step).clamp(max=1.0)


def _blend_workloads(quick: bool) -> list[tuple[str, tuple[int, ...], int]]:
    if quick:
        return [("cnn", (16, 64, 16, 16), 4), ("mlp", (256, 512), 4)]
    return [("cnn", (64, 64, 32, 32), 4), ("mlp", (1024, 1024), 8)]


def _blend_comparison(
    label: str, shape: tuple[int, ...], num_seeds: int, quick: bool, device: torch.device, rounds: int
) -> Comparison:
    gen = torch.Generator().manual_seed(0)
    host = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
    seed = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(device)
    state, alpha = _table(num_seeds, device)
    states, alphas = [int(s) for s in state.tolist()], alpha.tolist()

    def step(blend: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            blend().backward(grad)
            host.grad = None
            seed.grad = None

        return run

    medians = interleaved_medians(
        {
            "op": step(lambda: ops.seed_blend(host, seed, state, alpha)),
            "eager": step(lambda: eager_seed_blend(host, seed, states, alphas)),
            "reference": step(lambda: ref.seed_blend(host, seed, state, alpha)),
        },
        rounds,
        iters=2 if quick else 3,
        device=device,
    )
    desc = f"{'x'.join(map(str, shape))}, S={num_seeds}, fwd+bwd"
    return Comparison(f"seed_blend_{label}", desc, medians["op"], medians["eager"], medians["reference"])


def _blend_comparisons(quick: bool, device: torch.device, rounds: int) -> list[Comparison]:
    return [_blend_comparison(*w, quick, device, rounds) for w in _blend_workloads(quick)]


def _telemetry_comparisons(quick: bool, device: torch.device, rounds: int) -> list[Comparison]:
    out = []
    for label, shape, num_seeds in _blend_workloads(quick):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        tables = {
            name: torch.zeros(num_seeds, 6, dtype=torch.float64, device=device) for name in ("a", "b", "c")
        }
        medians = interleaved_medians(
            {
                "op": lambda x=x, t=tables["a"]: ops.telemetry_accumulate_(x, t, 0.0),
                "eager": lambda x=x, t=tables["b"]: eager_telemetry_accumulate_(x, t, 0.0),
                "reference": lambda x=x, t=tables["c"]: ref.telemetry_accumulate_(x, t, 0.0),
            },
            rounds,
            iters=5,
            device=device,
        )
        desc = f"{'x'.join(map(str, shape))}, S={num_seeds}"
        out.append(
            Comparison(
                f"telemetry_accumulate_{label}", desc, medians["op"], medians["eager"], medians["reference"]
            )
        )
        medians = interleaved_medians(
            {
                "op": lambda x=x, t=tables["a"]: ops.grad_telemetry_accumulate_(x, t),
                "eager": lambda x=x, t=tables["b"]: eager_grad_telemetry_accumulate_(x, t),
                "reference": lambda x=x, t=tables["c"]: ref.grad_telemetry_accumulate_(x, t),
            },
            rounds,
            iters=5,
            device=device,
        )
        out.append(
            Comparison(
                f"grad_telemetry_accumulate_{label}",
                desc,
                medians["op"],
                medians["eager"],
                medians["reference"],
            )
        )
    return out


def _lifecycle_comparison(quick: bool, device: torch.device, rounds: int) -> Comparison:
    num_seeds = 64
    state = torch.tensor([int(s) for s in S] * (num_seeds // len(S) + 1), device=device)[:num_seeds]
    tables = {
        name: (
            torch.zeros(num_seeds, device=device),
            torch.zeros(num_seeds, dtype=torch.int64, device=device),
        )
        for name in ("op", "eager", "reference")
    }
    medians = interleaved_medians(
        {
            "op": lambda: ops.lifecycle_advance_(state, *tables["op"], 1e-4),
            "eager": lambda: eager_lifecycle_advance_(state, *tables["eager"], 1e-4),
            "reference": lambda: ref.lifecycle_advance_(state, *tables["reference"], 1e-4),
        },
        rounds,
        iters=100 if quick else 300,
        device=device,
    )
    return Comparison(
        "lifecycle_advance", f"S={num_seeds}, one step", medians["op"], medians["eager"], medians["reference"]
    )


def kernel_cache_figures(quick: bool) -> dict[str, float]:
    """Per-call latency (ns) of KernelCache from Python, and of a dict lookup as the baseline."""
    calls = 20_000 if quick else 100_000
    rounds = 5 if quick else 11
    kernel_id = "residual_mlp-" + "0" * 52  # a blueprint id plus a content hash, like real keys
    cache = KernelCache(1 << 30)
    cache.put(kernel_id, "cpu", "torch.float32", object(), 1 << 20)
    evicting = KernelCache(100)  # 1-byte entries, 200 distinct keys: every put evicts one
    evict_keys = [f"kernel-{i:04d}" for i in range(200)]
    table = {(kernel_id, "cpu", "torch.float32"): object()}
    get, put, dict_get = cache.get, evicting.put, table.get
    value = object()

    def hit() -> None:
        for _ in range(calls):
            get(kernel_id, "cpu", "torch.float32")

    def miss() -> None:
        for _ in range(calls):
            get("missing", "cpu", "torch.float32")

    def put_evict() -> None:
        keys = evict_keys
        for i in range(calls):
            put(keys[i % 200], "cpu", "torch.float32", value, 1)

    def dict_hit() -> None:
        for _ in range(calls):
            dict_get((kernel_id, "cpu", "torch.float32"))

    medians = interleaved_medians(
        {"hit": hit, "miss": miss, "put_evict": put_evict, "dict": dict_hit}, rounds, 1, torch.device("cpu")
    )
    ns = {name: seconds / calls * 1e9 for name, seconds in medians.items()}
    return {
        "kernel_cache_hit_ns": ns["hit"],
        "kernel_cache_miss_ns": ns["miss"],
        "kernel_cache_put_evict_ns": ns["put_evict"],
        "python_dict_hit_ns": ns["dict"],
        "kernel_cache_hit_vs_dict": ns["hit"] / ns["dict"],
    }


def _extra_figures(quick: bool, device: str) -> dict[str, float]:
    sources = list(FIGURE_SOURCES)
    try:
        overhead = importlib.import_module(OVERHEAD_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != OVERHEAD_MODULE:
            raise
    else:
        sources.append(overhead.figures)
    figures: dict[str, float] = {}
    for source in sources:
        figures.update({k: float(v) for k, v in source(quick, device).items()})
    return figures


def comparison_figures(c: Comparison) -> dict[str, float]:
    """The JSON figures of one comparison."""
    return {
        f"{c.name}_ms": c.op * 1e3,
        f"{c.name}_eager_ms": c.eager * 1e3,
        f"{c.name}_reference_ms": c.reference * 1e3,
        f"{c.name}_speedup_vs_eager": c.eager / c.op,
        f"{c.name}_speedup_vs_reference": c.reference / c.op,
    }


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.3f} ms"


def render(
    comparisons: list[Comparison], cache: dict[str, float], extra: dict[str, float], title: str
) -> None:
    """Prints the tables with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped into a file or CI log: do not wrap the table at 80 columns
        console = Console(width=150)
    table = Table(title=title)
    for column in ("op", "workload", "esper op", "eager", "reference", "vs eager", "vs reference"):
        table.add_column(column, justify="left" if column in ("op", "workload") else "right")
    for c in comparisons:
        table.add_row(
            c.name,
            c.workload,
            _fmt_time(c.op),
            _fmt_time(c.eager),
            _fmt_time(c.reference),
            f"{c.eager / c.op:.2f}x",
            f"{c.reference / c.op:.2f}x",
        )
    console.print(table)
    other = Table(title="kernel cache (per call from Python) and other figures")
    other.add_column("figure")
    other.add_column("value", justify="right")
    for key, value in {**cache, **extra}.items():
        other.add_row(key, f"{value:.1f}" if key.endswith("_ns") else f"{value:.3f}")
    console.print(other)


def to_markdown(
    comparisons: list[Comparison], cache: dict[str, float], extra: dict[str, float], meta: dict[str, str]
) -> str:
    """The results as a Markdown document (for benchmarks/results/)."""
    lines = [f"# esper-bench kernels ({meta['device']})", ""]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "Speedup = baseline median / esper op median (> 1: the op is faster). Timings interleaved, medians.",
        "",
        "| op | workload | esper op | eager | reference | vs eager | vs reference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.name} | {c.workload} | {_fmt_time(c.op)} | {_fmt_time(c.eager)} | {_fmt_time(c.reference)} "
            f"| {c.eager / c.op:.2f}x | {c.reference / c.op:.2f}x |"
        )
    lines += ["", "| figure | value |", "|---|---:|"]
    for key, value in {**cache, **extra}.items():
        lines.append(f"| {key} | {value:.1f} |" if key.endswith("_ns") else f"| {key} | {value:.3f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `esper-bench kernels`."""
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds (under a minute)")
    parser.add_argument("--json", type=Path, help="write every figure (one key each) as JSON to this path")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown to this path")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for the ops")
    parser.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds (default: 5 quick, 15 full)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--no-extra",
        action="store_true",
        help=f"skip FIGURE_SOURCES and {OVERHEAD_MODULE} (ops and cache only)",
    )


def run(args: argparse.Namespace) -> int:
    """Measures everything, prints the tables, writes the JSON/Markdown files asked for."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "esper-bench kernels: --device cuda needs a CUDA device, and none is available", file=sys.stderr
        )
        return 2
    for option, value in (("--rounds", args.rounds), ("--threads", args.threads)):
        if value < 0:
            print(f"esper-bench kernels: {option} must be positive, got {value}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    device = torch.device(args.device)
    started = time.perf_counter()
    with torch.inference_mode(False):
        comparisons = _blend_comparisons(args.quick, device, rounds)
        comparisons += _telemetry_comparisons(args.quick, device, rounds)
        comparisons.append(_lifecycle_comparison(args.quick, device, rounds))
    cache = kernel_cache_figures(args.quick)
    own_seconds = time.perf_counter() - started
    extra = {} if args.no_extra else _extra_figures(args.quick, args.device)
    figures: dict[str, float] = {}
    for c in comparisons:
        figures.update(comparison_figures(c))
    figures.update(cache)
    figures.update(extra)
    argv = getattr(args, "argv", None)
    meta = {
        "command": "esper-bench kernels " + shlex.join(argv) if argv is not None else "esper-bench kernels",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu kernel build": ops._C.cpu_kernel_isa(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        "rounds": str(rounds),
        "wall time": f"{time.perf_counter() - started:.1f} s (ops and cache {own_seconds:.1f} s)",
    }
    title = (
        f"esper-bench kernels on {meta['device']} ({rounds} interleaved rounds, medians; {meta['wall time']})"
    )
    render(comparisons, cache, extra, title)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(to_markdown(comparisons, cache, extra, meta))
        print(f"wrote {args.markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m esper.bench.kernels [options]`."""
    parser = argparse.ArgumentParser(prog="esper-bench kernels", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
