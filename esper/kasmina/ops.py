"""Python side of the `torch.ops.esper` operators: fake (meta) kernels, autograd and wrappers.

Importing this module loads `esper._C` (which registers the C++/CUDA kernels). The contract of
every op (shapes, dtypes, lifecycle weights) is in the wrapper docstrings below; the pure-PyTorch
`esper.kasmina.reference` implements the same contract and the tests hold the two to it.

Layout shared by the seed ops: an activation `x` of shape [N, C, *] belongs to a layer with S seeds,
seed i owning channels [i*C/S, (i+1)*C/S) of dim 1 (C % S == 0 is required).
"""

from __future__ import annotations

import torch

from esper._extension import load
from esper.kasmina.reference import (  # noqa: F401  (re-exported)
    TELEMETRY_COUNT,
    TELEMETRY_DEAD,
    TELEMETRY_GRAD_SQ,
    TELEMETRY_GRAD_STEPS,
    TELEMETRY_SUM,
    TELEMETRY_SUMSQ,
)
from esper.lifecycle import SeedLifecycleState

_C = load()

NUM_LIFECYCLE_STATES = 12

# Columns of the float64[S, 6] telemetry table (mirrored in csrc/include/esper/seed_ops.h); the
# pure-PyTorch reference defines them so it stays importable without the extension.
TELEMETRY_COLUMNS = 6


@torch.library.register_fake("esper::count_states")
def _count_states_fake(state: torch.Tensor) -> torch.Tensor:
    return state.new_empty((NUM_LIFECYCLE_STATES,))


def count_states(state: torch.Tensor) -> torch.Tensor:
    """Histogram of lifecycle states in a state table (int64 tensor of length 12)."""
    return torch.ops.esper.count_states(state)


def _check_layout_fake(op: str, x: torch.Tensor, num_seeds: int) -> None:
    # Fake kernels repeat the shape checks of the C++ kernels so that tracing fails as early and
    # with the same message as eager execution would.
    torch._check(
        x.dim() >= 2, lambda: f"{op}: expected an activation of shape [N, C, *], got {tuple(x.shape)}"
    )
    torch._check(num_seeds >= 1, lambda: f"{op}: expected at least one seed, got {num_seeds}")
    torch._check(
        x.shape[1] % num_seeds == 0,
        lambda: (
            f"{op}: the channel dim C = {x.shape[1]} must be divisible by the number of seeds S = {num_seeds}"
        ),
    )


@torch.library.register_fake("esper::seed_blend")
def _seed_blend_fake(host, seed, state, alpha):
    torch._check(
        host.shape == seed.shape, lambda: "seed_blend: expected `seed` with the same shape as `host`"
    )
    _check_layout_fake("seed_blend", host, state.shape[0])
    return torch.empty_like(host, memory_format=torch.contiguous_format)


@torch.library.register_fake("esper::seed_blend_backward")
def _seed_blend_backward_fake(grad_out, seed, state, alpha):
    torch._check(
        grad_out.shape == seed.shape,
        lambda: "seed_blend_backward: expected `seed` with the same shape as `grad_out`",
    )
    _check_layout_fake("seed_blend_backward", grad_out, state.shape[0])
    return torch.empty_like(seed, memory_format=torch.contiguous_format)


@torch.library.register_fake("esper::telemetry_accumulate_")
def _telemetry_accumulate_fake(x, telemetry, dead_threshold):
    _check_layout_fake("telemetry_accumulate_", x, telemetry.shape[0])


@torch.library.register_fake("esper::grad_telemetry_accumulate_")
def _grad_telemetry_accumulate_fake(grad, telemetry):
    _check_layout_fake("grad_telemetry_accumulate_", grad, telemetry.shape[0])


@torch.library.register_fake("esper::lifecycle_advance_")
def _lifecycle_advance_fake(state, alpha, steps_in_state, alpha_step):
    return None


def _seed_blend_setup_context(ctx, inputs, output):
    _, seed, state, alpha = inputs
    ctx.save_for_backward(seed, state, alpha)


def _seed_blend_backward(ctx, grad):
    seed, state, alpha = ctx.saved_tensors
    grad_host = grad if ctx.needs_input_grad[0] else None
    grad_seed = (
        torch.ops.esper.seed_blend_backward(grad, seed, state, alpha) if ctx.needs_input_grad[1] else None
    )
    return grad_host, grad_seed, None, None


torch.library.register_autograd(
    "esper::seed_blend", _seed_blend_backward, setup_context=_seed_blend_setup_context
)


def _seed_blend_backward_setup_context(ctx, inputs, output):
    _, seed, state, alpha = inputs
    ctx.save_for_backward(seed, state, alpha)


def _seed_blend_double_backward(ctx, grad):
    # seed_blend_backward is linear in grad_out with a piecewise-constant mask in seed, so its own
    # gradient w.r.t. grad_out is itself and w.r.t. seed is zero (almost everywhere).
    seed, state, alpha = ctx.saved_tensors
    grad_grad_out = (
        torch.ops.esper.seed_blend_backward(grad, seed, state, alpha) if ctx.needs_input_grad[0] else None
    )
    grad_seed = torch.zeros_like(seed) if ctx.needs_input_grad[1] else None
    return grad_grad_out, grad_seed, None, None


torch.library.register_autograd(
    "esper::seed_blend_backward",
    _seed_blend_double_backward,
    setup_context=_seed_blend_backward_setup_context,
)


def seed_blend(
    host: torch.Tensor, seed: torch.Tensor, state: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Blends every seed's output into its chunk of the host output in one fused op.

    host, seed: same shape [N, C, *], same floating dtype and device; state: int64[S] lifecycle
    states; alpha: float32[S]. Per seed i, on its chunk: ``out = host + w_fwd[i] * finite(seed)``
    where ``finite`` replaces NaN/Inf by 0 (a broken seed never reaches the host output) and

    - TRAINING: w_fwd = 0, w_bwd = 1 (straight-through: the value is the host's exactly, the seed
      still receives the task gradient);
    - GRAFTING, STABILIZATION, EVALUATING, FINE_TUNING, FOSSILIZED: w_fwd = w_bwd = alpha[i];
    - every other state (or an unknown value): w_fwd = w_bwd = 0.

    Backward: grad_host = grad_out, grad_seed = isfinite(seed) ? w_bwd * grad_out : 0; state and
    alpha get no gradient. Computation is in float32 for float16/bfloat16 inputs.
    """
    return torch.ops.esper.seed_blend(host, seed, state, alpha)


# States whose seed output is added with weight alpha (forward and backward).
_ALPHA_BLENDED = frozenset({SeedLifecycleState.GRAFTING, SeedLifecycleState.STABILIZATION,
                            SeedLifecycleState.EVALUATING, SeedLifecycleState.FINE_TUNING,
                            SeedLifecycleState.FOSSILIZED})


def seed_blend_whole(host: torch.Tensor, seed: torch.Tensor, state: SeedLifecycleState,
                     state_row: torch.Tensor, alpha_row: torch.Tensor) -> torch.Tensor:
    """`seed_blend` for one seed that owns every channel of `host`, its `state` known on the host side.

    state_row, alpha_row: that seed's rows of the state table (int64[1], float32[1]). For
    float32/float64 it runs as native ops, without the Python autograd wrapper a custom op goes
    through (on small layers that wrapper cost more than the blend itself: ~60 us forward and
    ~40 us backward per call). With f = nan_to_num(seed), whose gradient is zero where the seed
    is not finite (exactly `seed_blend_backward`'s mask):

    - GRAFTING .. FOSSILIZED: `host + alpha * f`, the fused op's values and gradients bit for bit
      on CPU (tested; a CUDA kernel that contracts to FMA may differ in the last bit);
    - TRAINING: `host + (f - f.detach())`: the value is `host` (a -0.0 may come out as +0.0),
      the seed gets the task gradient (straight-through).

    Reduced precision and every other state call `seed_blend`.
    """
    if host.dtype == seed.dtype and host.dtype in (torch.float32, torch.float64):
        if state in _ALPHA_BLENDED:
            return host + alpha_row * torch.nan_to_num(seed, nan=0.0, posinf=0.0, neginf=0.0)
        if state == SeedLifecycleState.TRAINING:
            finite = torch.nan_to_num(seed, nan=0.0, posinf=0.0, neginf=0.0)
            return host + (finite - finite.detach())
    return seed_blend(host, seed, state_row, alpha_row)


def telemetry_accumulate_(x: torch.Tensor, telemetry: torch.Tensor, dead_threshold: float = 0.0) -> None:
    """Adds the per-seed statistics of activation ``x`` [N, C, *] to ``telemetry`` float64[S, 6] in place.

    Per chunk i: SUM += sum(x), SUMSQ += sum(x*x), DEAD += count(x <= dead_threshold) (compared in
    float64), COUNT += numel(chunk). No host-device synchronisation; not differentiable (pass a
    detached tensor or call under no_grad).
    """
    torch.ops.esper.telemetry_accumulate_(x, telemetry, float(dead_threshold))


def grad_telemetry_accumulate_(grad: torch.Tensor, telemetry: torch.Tensor) -> None:
    """Adds the per-seed squared gradient norm of ``grad`` [N, C, *] to ``telemetry`` in place.

    Per chunk i: GRAD_SQ += sum(grad*grad), GRAD_STEPS += 1. Meant for a tensor hook on the layer
    output, so it runs once per backward pass.
    """
    torch.ops.esper.grad_telemetry_accumulate_(grad, telemetry)


def lifecycle_advance_(
    state: torch.Tensor, alpha: torch.Tensor, steps_in_state: torch.Tensor, alpha_step: float
) -> None:
    """Advances the whole state table by one training step, in place.

    steps_in_state += 1 for every seed not DORMANT/UNSPECIFIED; for GRAFTING seeds
    alpha = min(1, alpha + alpha_step) (in float32). Never changes ``state``: transitions are made
    by the lifecycle code at gate checks, so each one is recorded as an event.
    """
    torch.ops.esper.lifecycle_advance_(state, alpha, steps_in_state, float(alpha_step))


def telemetry_readout(telemetry: torch.Tensor) -> dict[str, torch.Tensor]:
    """Turns the accumulators into per-seed statistics, as float64 CPU tensors of shape [S].

    Keys: ``mean``, ``variance`` (population variance, clamped at 0 against cancellation),
    ``dead_fraction``, ``gradient_norm`` (= sqrt(GRAD_SQ / max(GRAD_STEPS, 1)), the RMS over
    backward passes of the chunk's gradient norm) and ``samples`` (int64 element count). A seed
    with no samples reads 0 everywhere. Costs one device-to-host copy (one sync) for the table.
    """
    if telemetry.dtype != torch.float64 or telemetry.dim() != 2 or telemetry.shape[1] != TELEMETRY_COLUMNS:
        raise ValueError(
            f"telemetry_readout: expected a float64 [S, {TELEMETRY_COLUMNS}] telemetry table, "
            f"got {telemetry.dtype} of shape {tuple(telemetry.shape)}"
        )
    t = telemetry.detach().to("cpu", copy=True)
    count = t[:, TELEMETRY_COUNT]
    denom = count.clamp(min=1.0)
    mean = t[:, TELEMETRY_SUM] / denom
    variance = (t[:, TELEMETRY_SUMSQ] / denom - mean * mean).clamp(min=0.0)
    grad_norm = torch.sqrt(t[:, TELEMETRY_GRAD_SQ] / t[:, TELEMETRY_GRAD_STEPS].clamp(min=1.0))
    return {
        "mean": mean,
        "variance": variance,
        "dead_fraction": t[:, TELEMETRY_DEAD] / denom,
        "gradient_norm": grad_norm,
        "samples": count.to(torch.int64),
    }


def telemetry_reset_(telemetry: torch.Tensor) -> None:
    """Zeroes every accumulator of the telemetry table in place (start of an epoch)."""
    telemetry.zero_()
