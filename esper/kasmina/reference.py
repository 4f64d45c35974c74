"""TEMPORARY pure-PyTorch reference of the Kasmina ops (the ops helper owns this file; replaced on merge)."""

from __future__ import annotations

import torch

TELEMETRY_SUM, TELEMETRY_SUMSQ, TELEMETRY_DEAD, TELEMETRY_COUNT, TELEMETRY_GRAD_SQ, TELEMETRY_GRAD_STEPS = range(6)
TRAINING = 3
BLENDED = (4, 5, 6, 7, 8)


def _weights(state: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blended = torch.zeros_like(state, dtype=torch.bool)
    for s in BLENDED:
        blended |= state == s
    a = alpha.to(torch.float32)
    w_fwd = torch.where(blended, a, torch.zeros_like(a))
    w_bwd = torch.where(state == TRAINING, torch.ones_like(a), w_fwd)
    return w_fwd, w_bwd


def _per_channel(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    chunk = x.shape[1] // w.shape[0]
    w = w.to(x.dtype).repeat_interleave(chunk)
    return w.reshape((1, -1) + (1,) * (x.dim() - 2))


class _Blend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, host, seed, state, alpha):
        w_fwd, w_bwd = _weights(state, alpha)
        finite = torch.isfinite(seed)
        ctx.save_for_backward(finite, w_bwd)
        ctx.shape = seed.shape
        return host + _per_channel(w_fwd, seed) * torch.where(finite, seed, torch.zeros_like(seed))

    @staticmethod
    def backward(ctx, grad):
        finite, w_bwd = ctx.saved_tensors
        return grad, _per_channel(w_bwd, grad) * grad * finite, None, None


def seed_blend(host, seed, state, alpha):
    return _Blend.apply(host, seed, state, alpha)


def _chunks(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.detach().reshape(x.shape[0], s, x.shape[1] // s, -1).transpose(0, 1).reshape(s, -1).double()


def telemetry_accumulate_(x, telemetry, dead_threshold):
    c = _chunks(x, telemetry.shape[0])
    telemetry[:, TELEMETRY_SUM] += c.sum(1)
    telemetry[:, TELEMETRY_SUMSQ] += (c * c).sum(1)
    telemetry[:, TELEMETRY_DEAD] += (c <= dead_threshold).double().sum(1)
    telemetry[:, TELEMETRY_COUNT] += c.shape[1]


def grad_telemetry_accumulate_(grad, telemetry):
    c = _chunks(grad, telemetry.shape[0])
    telemetry[:, TELEMETRY_GRAD_SQ] += (c * c).sum(1)
    telemetry[:, TELEMETRY_GRAD_STEPS] += 1


def lifecycle_advance_(state, alpha, steps_in_state, alpha_step):
    live = (state != 0) & (state != 1)
    steps_in_state += live.long()
    grafting = state == 4
    alpha.copy_(torch.where(grafting, (alpha + alpha_step).clamp(max=1.0), alpha))


def telemetry_readout(telemetry):
    t = telemetry.detach()
    count = t[:, TELEMETRY_COUNT].clamp(min=1)
    mean = t[:, TELEMETRY_SUM] / count
    var = (t[:, TELEMETRY_SUMSQ] / count - mean * mean).clamp(min=0)
    return {
        "mean": mean,
        "variance": var,
        "dead_fraction": t[:, TELEMETRY_DEAD] / count,
        "gradient_norm": torch.sqrt(t[:, TELEMETRY_GRAD_SQ] / t[:, TELEMETRY_GRAD_STEPS].clamp(min=1)),
        "samples": t[:, TELEMETRY_COUNT],
    }


def telemetry_reset_(telemetry):
    telemetry.zero_()
