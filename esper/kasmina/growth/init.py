"""Initialisation of a `WidthSeed`: GradMax, TINY (line-searched scale) or scaled random.

All three work on the *linearised* pair: with the activation's derivative at 0 taken as 1, the norm
of a brand-new channel taken as identity and a max pool linearised as an average pool, the new
units' effect on the consumer output is bilinear in (fan-in weights a, fan-out weights b), and the
first-order loss change is `sum_n <delta_n, fan_out_b(post(fan_in_a(x_n)))> = a^T M b`. `M` is never
formed: `M b` and `M^T a` are each one autograd pass over the captured tensors (for every unit at
once, since units do not interact), and the top singular vectors come from a randomised subspace
iteration. For a Linear->Linear pair `M = X^T Delta`, the classic "gradient of a zero map between
the two layers" (see tests).

- **GradMax** (Evci et al., 2022): fan-in zero, so the function is unchanged; the fan-in gradient
  of unit j is then `M b_j`, and its norm (summed over units, at fixed fan-out norm) is largest for
  the top-k right singular vectors of M. Fan-out columns are those vectors, each scaled to the mean
  norm of the consumer's existing fan-out columns. For units merged straight into a plain host
  (whose ReLU has derivative 0 at 0) the dual is used: fan-out zero, fan-in from the top-k left
  singular vectors, each row signed so that its unit is live on the data (`_live_orientation`).
- **TINY** (Verbockhaven et al., 2024): the new units should best realise the part of the desired
  update `V = -delta` that the existing consumer weights cannot (V projected off the consumer
  input span, for a Linear consumer): minimise `||V_proj - sum_j b_j (a_j . phi)||^2` where phi are
  the fan-in input features (patches for a conv) with covariance S. The solution is the top-k SVD
  of `S^{-1/2} M_V`: `a_j = S^{-1/2} u_j sqrt(l_j)`, `b_j = v_j sqrt(l_j)`; then a line search picks
  the scale gamma (a, b both times sqrt(gamma)) that minimises the loss on the statistics batches.
- **random**: fan-in drawn at the scale of the producer's existing rows, fan-out zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.growth.pair import PairModules
from esper.kasmina.growth.seed import WidthSeed, apply_post
from esper.kasmina.growth.statistics import PairStatistics

GrowthInit = Literal["gradmax", "tiny", "random"]
"""How a width seed's new units are initialised (the one list: `INITS` is derived from it)."""
INITS: tuple[str, ...] = get_args(GrowthInit)
TINY_SCALES = tuple(4.0 ** -i for i in range(0, 10))
"""Line-search grid of TINY's scale gamma."""


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x, weight, None, module.stride, module.padding, module.dilation)


def _linearised_post(z: torch.Tensor, post: str) -> torch.Tensor:
    if post == "maxpool2" and min(z.shape[2:]) >= 2:
        return F.avg_pool1d(z, 2) if z.dim() == 3 else F.avg_pool2d(z, 2)
    return apply_post(z, post)


class _Bilinear:
    """`f(A, B) = sum <delta, fan_out_B(post(fan_in_A(x)))>` over captured tensors, r units at once."""

    def __init__(self, seed: WidthSeed, x: torch.Tensor, delta: torch.Tensor) -> None:
        self.seed, self.x, self.delta = seed, x, delta
        self.a_shape = tuple(seed.fan_in.weight.shape[1:])   # per unit fan-in
        w = seed.fan_out.weight
        self.b_shape = (w.shape[0], *w.shape[2:])            # per unit fan-out
        self.dim_a = math.prod(self.a_shape)
        self.dim_b = math.prod(self.b_shape)

    def _value(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r = a.shape[0]
        A = a.reshape(r, *self.a_shape)
        B = b.reshape(r, *self.b_shape).movedim(0, 1)   # [out, r, *k]
        z = _linearised_post(_apply(self.seed.fan_in, self.x, A), self.seed.pair.post)
        return (_apply(self.seed.fan_out, z, B) * self.delta).sum()

    def matvec(self, b: torch.Tensor) -> torch.Tensor:
        """Rows `M b_j` (r, dim_a) for rows b_j (r, dim_b)."""
        a = torch.zeros(b.shape[0], self.dim_a, dtype=b.dtype, device=b.device, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._value(a, b.detach()), a)
        return g

    def rmatvec(self, a: torch.Tensor) -> torch.Tensor:
        """Rows `M^T a_j` (r, dim_b) for rows a_j (r, dim_a)."""
        b = torch.zeros(a.shape[0], self.dim_b, dtype=a.dtype, device=a.device, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._value(a.detach(), b), b)
        return g


def _orth_rows(m: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(m.T)
    return q.T


def top_singular(matvec: Callable[[torch.Tensor], torch.Tensor], rmatvec: Callable[[torch.Tensor], torch.Tensor],
                 dim_b: int, k: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device,
                 iterations: int = 4, oversample: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (u rows, singular values, v rows) of an operator given only `M b` and `M^T a` products.

    Randomised subspace iteration: r = k + oversample random b-vectors, `iterations` rounds of
    b -> M b -> M^T (M b) with re-orthonormalisation, then an exact SVD in the r-dim subspace.
    """
    r = min(dim_b, k + oversample)
    b = torch.randn(r, dim_b, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    b = _orth_rows(b)
    for _ in range(iterations):
        a = _orth_rows(matvec(b))
        b = _orth_rows(rmatvec(a))
    c = matvec(b).T                           # (dim_a, r) = M b^T
    u, s, wt = torch.linalg.svd(c, full_matrices=False)
    v = wt @ b                                 # right singular vectors in b-space, rows
    k = min(k, s.shape[0])
    return u.T[:k], s[:k], v[:k]


def _per_unit_fan_out(w: torch.Tensor) -> torch.Tensor:
    """Fan-out weight [out, units, *k] as rows per unit (units, out * prod(k))."""
    return w.movedim(1, 0).reshape(w.shape[1], -1)


def _set_fan_out(seed: WidthSeed, rows: torch.Tensor) -> None:
    w = seed.fan_out.weight
    shaped = rows.reshape(w.shape[1], w.shape[0], *w.shape[2:]).movedim(0, 1)
    with torch.no_grad():
        w.copy_(shaped)


def _set_fan_in(seed: WidthSeed, rows: torch.Tensor) -> None:
    w = seed.fan_in.weight
    with torch.no_grad():
        w.copy_(rows.reshape(w.shape))
        if seed.fan_in.bias is not None:
            seed.fan_in.bias.zero_()


def _mean_row_norm(rows: torch.Tensor) -> float:
    value = float(rows.norm(dim=1).mean())
    return value if value > 0 else 1.0


def _producer_row_norm(host: PairModules) -> float:
    """Mean norm of the producer's existing fan-in rows: the scale new fan-in rows are drawn at."""
    return _mean_row_norm(host.producer.weight.detach().reshape(host.units, -1))


def _relu_hidden(seed: WidthSeed, x: torch.Tensor) -> torch.Tensor:
    """The new units as the merged host computes them (torch.relu; a norm with batch statistics,
    its running statistics left alone)."""
    z = seed.fan_in(x)
    n = seed.norm
    if n is not None:
        z = F.batch_norm(z, None, None, n.weight, n.bias, training=True, eps=n.eps)
    return apply_post(torch.relu(z), seed.pair.post)


def _fill_missing(rows: torch.Tensor, found: int, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """`rows` with rows `found:` replaced by random directions of norm `scale`.

    A pair's operator has rank at most min(dim_a, dim_b): a first conv over one input channel with
    kernel 3 has dim_a = 3, so at most 3 singular vectors exist for 8 new units. Left at zero, the
    other units would have zero fan-in *and* zero fan-out: no gradient ever reaches them, they are
    dead forever and still count as width (measured on the MNIST-1D CNN: 5 of every 8 units added
    to convs.0 were dead from birth). Random directions are what the scaled-random baseline uses;
    with a norm layer after the fan-in (or a ReLU) distinct directions are distinct features.
    """
    missing = rows.shape[0] - found
    if missing <= 0:
        return rows
    extra = torch.randn(missing, rows.shape[1], generator=generator, dtype=torch.float64).to(rows)
    extra = extra / extra.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
    return torch.cat([rows[:found], extra])


def _found(s: torch.Tensor) -> int:
    """Singular vectors worth using: those with a value above 1e-6 of the largest."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > 1e-6 * s[0]).sum())


def _live_orientation(seed: WidthSeed, op: _Bilinear, rows: torch.Tensor) -> torch.Tensor:
    """Each fan-in row or its negation, whichever gives the larger real fan-out gradient.

    A singular vector's sign is arbitrary, and the linearised M cannot tell u from -u, but a ReLU
    can: on non-negative inputs (a layer after a ReLU) a row pointing the wrong way leaves its unit
    at 0 for every sample, and with the fan-out zero such a unit never trains (measured on the
    MNIST-1D MLP: units merged at once made the layer 46% -> 84% dead over four growths). The
    fan-out gradient of unit j, `sum_n delta_n relu(a_j . x_n)`, is what the unit can learn from
    its first step, so each unit keeps the sign with the larger one.
    """
    norms = []
    for sign in (1.0, -1.0):
        _set_fan_in(seed, rows * sign)
        b = torch.zeros_like(seed.fan_out.weight, requires_grad=True)
        with torch.enable_grad():
            value = (_apply(seed.fan_out, _relu_hidden(seed, op.x), b) * op.delta).sum()
            (grad,) = torch.autograd.grad(value, b)
        norms.append(_per_unit_fan_out(grad).norm(dim=1))
    flip = (norms[1] > norms[0]).to(rows.dtype).unsqueeze(1)
    return rows * (1.0 - 2.0 * flip)


def gradmax_init(seed: WidthSeed, host: PairModules, stats: PairStatistics, generator: torch.Generator | None = None,
                 iterations: int = 4, zero: str = "fan_in") -> torch.Tensor:
    """GradMax; returns the singular values found (largest first).

    zero="fan_in" (the paper's choice): fan-in zero, fan-out = the top-k right singular vectors of
    M scaled to the host's fan-out norm, which maximises the fan-in gradient. It needs an activation
    whose derivative at 0 is non-zero: the seed's ReLU has subgradient 1 there, a plain host ReLU
    does not. zero="fan_out" (for units merged into a plain host at once): fan-out zero, fan-in = the
    top-k left singular vectors scaled to the producer's row norm, which maximises the (linearised)
    fan-out gradient `M^T a`; the units are live from the first step.
    """
    if zero not in ("fan_in", "fan_out"):
        raise ValueError(f"gradmax zero={zero!r}; expected 'fan_in' or 'fan_out'")
    op = _Bilinear(seed, stats.x.to(seed.fan_in.weight.dtype), stats.delta.to(seed.fan_in.weight.dtype))
    w = seed.fan_in.weight
    u, s, v = top_singular(op.matvec, op.rmatvec, op.dim_b, seed.units, generator, w.dtype, w.device, iterations)
    if zero == "fan_in":
        scale = _mean_row_norm(_per_unit_fan_out(host.consumer.weight.detach()))
        rows = torch.zeros(seed.units, op.dim_b, dtype=w.dtype, device=w.device)
        rows[: v.shape[0]] = v * scale
        _set_fan_out(seed, _fill_missing(rows, _found(s), scale, generator))
        _set_fan_in(seed, torch.zeros_like(w).reshape(seed.units, -1))
    else:
        scale = _producer_row_norm(host)
        rows = torch.zeros(seed.units, op.dim_a, dtype=w.dtype, device=w.device)
        rows[: u.shape[0]] = u * scale
        rows = _fill_missing(rows, _found(s), scale, generator)
        _set_fan_in(seed, _live_orientation(seed, op, rows))
        _set_fan_out(seed, torch.zeros(seed.units, op.dim_b, dtype=w.dtype, device=w.device))
    return s


def _fan_in_features(seed: WidthSeed, x: torch.Tensor) -> torch.Tensor:
    """Inputs of one fan-in unit as rows (samples or patches x dim_a)."""
    m = seed.fan_in
    if isinstance(m, nn.Linear):
        return x.reshape(x.shape[0], -1)
    if isinstance(m, nn.Conv1d):
        x4, k, s, p, d = x.unsqueeze(2), (1, m.kernel_size[0]), (1, m.stride[0]), (0, m.padding[0]), (1, m.dilation[0])
    else:
        x4, k, s, p, d = x, m.kernel_size, m.stride, m.padding, m.dilation
    cols = F.unfold(x4, k, dilation=d, padding=p, stride=s)   # [N, C*k, P]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _projected_update(host: PairModules, stats: PairStatistics, ridge: float) -> torch.Tensor:
    """V = -delta with the part the consumer's existing weights could realise removed (Linear consumer)."""
    v = -stats.delta
    if not isinstance(host.consumer, nn.Linear):
        return v
    z = stats.z.reshape(stats.z.shape[0], -1).to(v.dtype)
    gram = z.T @ z
    gram = gram + ridge * (gram.diagonal().mean() + 1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    best = torch.linalg.solve(gram, z.T @ v)            # (C, out): least-squares update of W^T
    return v - z @ best


def tiny_init(seed: WidthSeed, host: PairModules, stats: PairStatistics, loss_of: Callable[[WidthSeed], float],
              generator: torch.Generator | None = None, iterations: int = 4, ridge: float = 1e-3,
              scales: tuple[float, ...] = TINY_SCALES) -> float:
    """TINY with a line-searched scale; returns the chosen scale gamma.

    `loss_of(seed)` is the loss on the statistics batches with the seed's output added to the
    consumer at full strength; gamma is the grid value with the lowest loss.
    """
    dtype = seed.fan_in.weight.dtype
    x = stats.x.to(dtype)
    phi = _fan_in_features(seed, x)
    cov = phi.T @ phi / max(1, phi.shape[0])
    cov = cov + ridge * (cov.diagonal().mean() + 1e-12) * torch.eye(cov.shape[0], dtype=dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    inv_sqrt = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    op = _Bilinear(seed, x, _projected_update(host, stats, ridge).to(dtype))
    u, s, v = top_singular(lambda b: op.matvec(b) @ inv_sqrt, lambda a: op.rmatvec(a @ inv_sqrt),
                           op.dim_b, seed.units, generator, dtype, x.device, iterations)
    root = s.clamp_min(0).sqrt().unsqueeze(1)
    a_rows = torch.zeros(seed.units, op.dim_a, dtype=dtype, device=x.device)
    b_rows = torch.zeros(seed.units, op.dim_b, dtype=dtype, device=x.device)
    a_rows[: u.shape[0]] = (u @ inv_sqrt) * root
    b_rows[: v.shape[0]] = v * root
    best_gamma, best_loss = scales[-1], math.inf
    for gamma in scales:
        g = math.sqrt(gamma)
        _set_fan_in(seed, a_rows * g)
        _set_fan_out(seed, b_rows * g)
        loss = float(loss_of(seed))
        if loss < best_loss:
            best_gamma, best_loss = gamma, loss
    g = math.sqrt(best_gamma)
    # Units beyond the operator's rank: random fan-in, zero fan-out (function-preserving, trainable).
    found = _found(s)
    _set_fan_in(seed, _fill_missing(a_rows * g, found, _producer_row_norm(host), generator))
    b_rows[found:] = 0
    _set_fan_out(seed, b_rows * g)
    return best_gamma


def random_init(seed: WidthSeed, host: PairModules, generator: torch.Generator | None = None) -> None:
    """Fan-in at the scale of the producer's rows (random directions), fan-out zero."""
    w = seed.fan_in.weight
    rows = torch.randn(seed.units, w[0].numel(), generator=generator, dtype=torch.float64).to(w)
    target = _producer_row_norm(host)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * target
    _set_fan_in(seed, rows)
    _set_fan_out(seed, torch.zeros(seed.units, _per_unit_fan_out(seed.fan_out.weight).shape[1], dtype=w.dtype, device=w.device))
