"""Pure-PyTorch reference implementations of the Kasmina seed ops.

Same names, signatures and contract as `esper.kasmina.ops` (read the docstrings there), written
for clarity rather than speed: the tests check the C++/CUDA kernels against these, and the
benchmark reports the kernels' speed relative to them.
"""

from __future__ import annotations

import torch

from esper.lifecycle import SeedLifecycleState

TELEMETRY_SUM = 0
TELEMETRY_SUMSQ = 1
TELEMETRY_DEAD = 2
TELEMETRY_COUNT = 3
TELEMETRY_GRAD_SQ = 4
TELEMETRY_GRAD_STEPS = 5

# States whose seed output is blended into the host with weight alpha.
BLENDED_STATES = (
    SeedLifecycleState.GRAFTING,
    SeedLifecycleState.STABILIZATION,
    SeedLifecycleState.EVALUATING,
    SeedLifecycleState.FINE_TUNING,
    SeedLifecycleState.FOSSILIZED,
)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    # Reduced-precision inputs are computed in float32, like the kernels.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def blend_weights(state: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward blend weights (float32[S]) for each seed's lifecycle state."""
    blended = torch.zeros_like(state, dtype=torch.bool)
    for s in BLENDED_STATES:
        blended |= state == int(s)
    zero = torch.zeros_like(alpha)
    w_fwd = torch.where(blended, alpha, zero)
    w_bwd = torch.where(state == int(SeedLifecycleState.TRAINING), torch.ones_like(alpha), w_fwd)
    return w_fwd, w_bwd


def _per_channel(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcasts per-seed weights [S] to x's channel chunks: shape [1, C, 1, ...]."""
    num_seeds = weights.shape[0]
    channels = x.shape[1]
    if channels % num_seeds != 0:
        raise ValueError(
            f"channel dim C = {channels} must be divisible by the number of seeds S = {num_seeds}"
        )
    per_channel = weights.repeat_interleave(channels // num_seeds)
    return per_channel.view(1, channels, *([1] * (x.dim() - 2)))


def seed_blend(
    host: torch.Tensor, seed: torch.Tensor, state: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Reference seed_blend, differentiable through ordinary autograd."""
    dtype = _opmath(host.dtype)
    w_fwd, w_bwd = blend_weights(state, alpha)
    w_fwd = _per_channel(w_fwd, host).to(dtype)
    w_bwd = _per_channel(w_bwd, host).to(dtype)
    s = seed.to(dtype)
    finite = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    # (finite - finite.detach()) is exactly zero in value but carries the gradient, so the
    # forward uses w_fwd and the backward sees w_fwd + (w_bwd - w_fwd) = w_bwd.
    out = host.to(dtype) + w_fwd * finite + (w_bwd - w_fwd) * (finite - finite.detach())
    return out.to(host.dtype)


def seed_blend_backward(
    grad_out: torch.Tensor, seed: torch.Tensor, state: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Reference gradient of seed_blend w.r.t. seed: isfinite(seed) ? w_bwd * grad_out : 0."""
    dtype = _opmath(grad_out.dtype)
    _, w_bwd = blend_weights(state, alpha)
    g = _per_channel(w_bwd, grad_out).to(dtype) * grad_out.to(dtype)
    return torch.where(torch.isfinite(seed), g, torch.zeros_like(g)).to(grad_out.dtype)


def _chunks(x: torch.Tensor, num_seeds: int) -> torch.Tensor:
    """x [N, C, *] as float64 [S, N * C/S * prod(*)]: row i holds every element of seed i's chunk."""
    if x.dim() < 2 or x.shape[1] % num_seeds != 0:
        raise ValueError(f"expected [N, C, *] with C divisible by S = {num_seeds}, got {tuple(x.shape)}")
    per_seed = x[0].numel() // num_seeds if x.shape[0] > 0 else 0
    return (
        x.detach()
        .to(torch.float64)
        .reshape(x.shape[0], num_seeds, per_seed)
        .transpose(0, 1)
        .reshape(num_seeds, -1)
    )


def telemetry_accumulate_(x: torch.Tensor, telemetry: torch.Tensor, dead_threshold: float = 0.0) -> None:
    """Reference telemetry_accumulate_ (in place on telemetry)."""
    chunks = _chunks(x, telemetry.shape[0])
    telemetry[:, TELEMETRY_SUM] += chunks.sum(dim=1)
    telemetry[:, TELEMETRY_SUMSQ] += (chunks * chunks).sum(dim=1)
    telemetry[:, TELEMETRY_DEAD] += (chunks <= dead_threshold).sum(dim=1).to(torch.float64)
    telemetry[:, TELEMETRY_COUNT] += chunks.shape[1]


def grad_telemetry_accumulate_(grad: torch.Tensor, telemetry: torch.Tensor) -> None:
    """Reference grad_telemetry_accumulate_ (in place on telemetry)."""
    chunks = _chunks(grad, telemetry.shape[0])
    telemetry[:, TELEMETRY_GRAD_SQ] += (chunks * chunks).sum(dim=1)
    telemetry[:, TELEMETRY_GRAD_STEPS] += 1


def lifecycle_advance_(
    state: torch.Tensor, alpha: torch.Tensor, steps_in_state: torch.Tensor, alpha_step: float
) -> None:
    """Reference lifecycle_advance_ (in place on alpha and steps_in_state)."""
    live = (state != int(SeedLifecycleState.DORMANT)) & (state != int(SeedLifecycleState.UNSPECIFIED))
    steps_in_state += live.to(steps_in_state.dtype)
    grafting = state == int(SeedLifecycleState.GRAFTING)
    alpha.copy_(torch.where(grafting, torch.clamp(alpha + alpha_step, max=1.0), alpha))


def telemetry_readout(telemetry: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference telemetry_readout (float64 CPU tensors of shape [S])."""
    t = telemetry.detach().to("cpu", torch.float64)
    count = t[:, TELEMETRY_COUNT]
    mean = torch.where(count > 0, t[:, TELEMETRY_SUM] / count, torch.zeros_like(count))
    mean_sq = torch.where(count > 0, t[:, TELEMETRY_SUMSQ] / count, torch.zeros_like(count))
    steps = t[:, TELEMETRY_GRAD_STEPS]
    return {
        "mean": mean,
        "variance": torch.clamp(mean_sq - mean * mean, min=0.0),
        "dead_fraction": torch.where(count > 0, t[:, TELEMETRY_DEAD] / count, torch.zeros_like(count)),
        "gradient_norm": torch.sqrt(
            torch.where(steps > 0, t[:, TELEMETRY_GRAD_SQ] / steps, torch.zeros_like(steps))
        ),
        "samples": count.to(torch.int64),
    }


def telemetry_reset_(telemetry: torch.Tensor) -> None:
    """Reference telemetry_reset_."""
    telemetry.zero_()
