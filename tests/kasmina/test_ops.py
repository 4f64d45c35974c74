"""The Kasmina seed ops (C++ kernels) against their contract and the pure-PyTorch reference."""

import itertools
import math

import pytest
import torch

from esper.kasmina import ops
from esper.kasmina import reference as ref
from esper.lifecycle import SeedLifecycleState as S

ALL_STATES = [int(s) for s in S]
BLENDED = [S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]

# (shape, num_seeds): 2-D MLP activations, 3-D sequences, 4-D conv maps, one big enough to be
# split across threads by the CPU kernels, and an empty batch.
LAYOUTS = [
    ((4, 8), 1),
    ((4, 8), 4),
    ((3, 12, 5), 3),
    ((2, 6, 4, 4), 2),
    ((5, 16, 7, 3), 8),
    ((8, 32, 32, 32), 4),
    ((0, 6, 3), 3),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def make_table(num_seeds, generator, states=None):
    if states is None:
        states = torch.tensor(ALL_STATES)[torch.randint(len(ALL_STATES), (num_seeds,), generator=generator)]
    state = torch.as_tensor(states, dtype=torch.int64)
    alpha = torch.rand(num_seeds, generator=generator, dtype=torch.float32)
    return state, alpha


def with_non_finite(x, generator):
    """Sprinkles NaN, +Inf and -Inf into x (when it has room)."""
    x = x.clone()
    flat = x.view(-1)
    if flat.numel() >= 3:
        idx = torch.randperm(flat.numel(), generator=generator)[:3]
        flat[idx[0]] = float("nan")
        flat[idx[1]] = float("inf")
        flat[idx[2]] = float("-inf")
    return x


def chunk_of(x, num_seeds, i):
    c = x.shape[1] // num_seeds
    return x[:, i * c : (i + 1) * c]


# ---------------------------------------------------------------- seed_blend


@pytest.mark.parametrize("shape,num_seeds", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("non_finite", [False, True])
def test_seed_blend_matches_reference(shape, num_seeds, dtype, non_finite):
    g = torch.Generator().manual_seed(hash((shape, num_seeds, str(dtype), non_finite)) % 2**31)
    host = torch.randn(shape, generator=g).to(dtype)
    seed = torch.randn(shape, generator=g).to(dtype)
    if non_finite:
        seed = with_non_finite(seed, g)
    state, alpha = make_table(num_seeds, g)
    out = ops.seed_blend(host, seed, state, alpha)
    expected = ref.seed_blend(host, seed, state, alpha)
    assert out.dtype == dtype and out.shape == host.shape
    assert torch.isfinite(out).all(), "a non-finite seed leaked into the host output"
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("state", ALL_STATES + [42, -1])
def test_seed_blend_weight_per_state(state):
    # One seed in `state` next to a FOSSILIZED one: checks each state's forward weight exactly.
    g = torch.Generator().manual_seed(state + 100)
    host = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    seed = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.375, 0.75])
    out = ops.seed_blend(host, seed, torch.tensor([state, S.FOSSILIZED]), alpha)
    blended = state in [int(s) for s in BLENDED]
    expected0 = host[:, :2] + 0.375 * seed[:, :2] if blended else host[:, :2]
    assert torch.equal(out[:, :2], expected0)
    assert torch.equal(out[:, 2:], host[:, 2:] + 0.75 * seed[:, 2:])


def test_seed_blend_training_is_straight_through():
    host = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    state = torch.tensor([S.TRAINING, S.GRAFTING, S.DORMANT])
    alpha = torch.tensor([0.5, 0.25, 0.9])
    out = ops.seed_blend(host, seed, state, alpha)
    assert torch.equal(out[:, :2], host[:, :2])  # value is the host's exactly
    grad_out = torch.randn(4, 6, dtype=torch.float64)
    out.backward(grad_out)
    assert torch.equal(host.grad, grad_out)
    assert torch.equal(seed.grad[:, :2], grad_out[:, :2])  # w_bwd = 1 in TRAINING
    assert torch.equal(seed.grad[:, 2:4], 0.25 * grad_out[:, 2:4])
    assert torch.equal(seed.grad[:, 4:], torch.zeros(4, 2, dtype=torch.float64))


def test_seed_blend_non_finite_seed_gets_zero_gradient():
    host = torch.randn(2, 4, requires_grad=True)
    seed = torch.randn(2, 4)
    seed[0, 1] = float("nan")
    seed[1, 3] = float("inf")
    seed.requires_grad_(True)
    out = ops.seed_blend(host, seed, torch.tensor([S.FOSSILIZED, S.TRAINING]), torch.tensor([1.0, 0.0]))
    assert torch.equal(out[0, 1], host[0, 1]) and torch.equal(out[1, 3], host[1, 3])
    out.sum().backward()
    assert seed.grad[0, 1] == 0 and seed.grad[1, 3] == 0
    assert seed.grad[0, 0] == 1 and seed.grad[1, 2] == 1


@pytest.mark.parametrize(
    "shape,num_seeds", [((4, 8), 4), ((3, 12, 5), 3), ((2, 6, 4, 4), 2), ((64, 16, 64), 4)]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_seed_blend_backward_matches_reference(shape, num_seeds, dtype):
    g = torch.Generator().manual_seed(7 + num_seeds)
    state, alpha = make_table(num_seeds, g)
    h0 = torch.randn(shape, generator=g).to(dtype)
    s0 = with_non_finite(torch.randn(shape, generator=g).to(dtype), g)
    grad_out = torch.randn(shape, generator=g).to(dtype)
    grads = []
    for impl in (ops.seed_blend, ref.seed_blend):
        host, seed = h0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        impl(host, seed, state, alpha).backward(grad_out)
        grads.append((host.grad, seed.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL[dtype])
    torch.testing.assert_close(grads[0][1], grads[1][1], **TOL[dtype])
    direct = torch.ops.esper.seed_blend_backward(grad_out, s0, state, alpha)
    torch.testing.assert_close(direct, ref.seed_blend_backward(grad_out, s0, state, alpha), **TOL[dtype])


# TRAINING is left out on purpose: its straight-through gradient (w_bwd = 1 while w_fwd = 0) is not
# the derivative of its forward, which test_seed_blend_training_is_straight_through checks instead.
@pytest.mark.parametrize(
    "num_seeds,states", [(1, [S.GRAFTING]), (3, [S.EVALUATING, S.FINE_TUNING, S.CULLED])]
)
def test_seed_blend_gradcheck(num_seeds, states):
    g = torch.Generator().manual_seed(3)
    host = torch.randn(3, 3 * num_seeds, 2, generator=g, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(3, 3 * num_seeds, 2, generator=g, dtype=torch.float64, requires_grad=True)
    state, alpha = make_table(num_seeds, g, states)
    assert torch.autograd.gradcheck(ops.seed_blend, (host, seed, state, alpha))
    assert torch.autograd.gradgradcheck(ops.seed_blend, (host, seed, state, alpha))


def test_seed_blend_handles_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    host = torch.randn(4, 6, 5, 5, generator=g).to(memory_format=torch.channels_last)
    seed = torch.randn(4, 5, 6, 5, generator=g).transpose(1, 2)
    state, alpha = make_table(3, g, [S.GRAFTING, S.EVALUATING, S.TRAINING])
    out = ops.seed_blend(host, seed, state, alpha)
    torch.testing.assert_close(out, ref.seed_blend(host, seed, state, alpha), rtol=0, atol=0)
    assert torch.equal(host, host.clone()) and out.data_ptr() != host.data_ptr()


def test_seed_blend_does_not_modify_inputs():
    host, seed = torch.randn(2, 4), torch.randn(2, 4)
    state, alpha = torch.tensor([S.GRAFTING, S.FOSSILIZED]), torch.tensor([0.5, 1.0])
    copies = [t.clone() for t in (host, seed, state, alpha)]
    ops.seed_blend(host, seed, state, alpha)
    for before, after in zip(copies, (host, seed, state, alpha), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 4), torch.randn(2, 5), torch.tensor([4]), torch.tensor([1.0])), "same shape"),
        ((torch.randn(2, 6), torch.randn(2, 6), torch.tensor([4] * 4), torch.ones(4)), r"C % S == 0"),
        ((torch.randn(6), torch.randn(6), torch.tensor([4]), torch.ones(1)), r"\[N, C, \*\]"),
        ((torch.randn(2, 4), torch.randn(2, 4).double(), torch.tensor([4]), torch.ones(1)), "same dtype"),
        ((torch.ones(2, 4, dtype=torch.int64),) * 2 + (torch.tensor([4]), torch.ones(1)), "floating-point"),
        ((torch.randn(2, 4), torch.randn(2, 4), torch.tensor([4.0]), torch.ones(1)), "`state` of dtype Long"),
        (
            (torch.randn(2, 4), torch.randn(2, 4), torch.tensor([4]), torch.ones(1).double()),
            "`alpha` of dtype Float",
        ),
        ((torch.randn(2, 4), torch.randn(2, 4), torch.tensor([4, 4]), torch.ones(3)), "length S = 2"),
        ((torch.randn(2, 4), torch.randn(2, 4), torch.tensor([[4]]), torch.ones(1)), "1-D"),
        (
            (torch.randn(2, 4), torch.randn(2, 4), torch.tensor([], dtype=torch.int64), torch.ones(0)),
            "at least one seed",
        ),
    ],
)
def test_seed_blend_rejects_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.seed_blend(*args)


def test_seed_blend_backward_rejects_bad_input():
    with pytest.raises(RuntimeError, match="seed_blend_backward: expected `seed` with the same shape"):
        torch.ops.esper.seed_blend_backward(
            torch.randn(2, 4), torch.randn(2, 2), torch.tensor([4]), torch.ones(1)
        )


# ---------------------------------------------------------------- telemetry


@pytest.mark.parametrize("shape,num_seeds", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_telemetry_accumulate_matches_reference(shape, num_seeds, dtype):
    g = torch.Generator().manual_seed(hash((shape, num_seeds, str(dtype))) % 2**31)
    start = torch.rand(num_seeds, 6, generator=g, dtype=torch.float64)
    got, expected = start.clone(), start.clone()
    for threshold in (0.0, 0.25):  # two calls: accumulation, not overwrite
        x = torch.randn(shape, generator=g).to(dtype)
        ops.telemetry_accumulate_(x, got, threshold)
        ref.telemetry_accumulate_(x, expected, threshold)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)
    # Counts are exact.
    assert torch.equal(got[:, ops.TELEMETRY_DEAD], expected[:, ops.TELEMETRY_DEAD])
    assert torch.equal(got[:, ops.TELEMETRY_COUNT], expected[:, ops.TELEMETRY_COUNT])
    assert torch.equal(got[:, 4:], start[:, 4:])  # gradient columns untouched


def test_telemetry_accumulate_counts_per_chunk():
    x = torch.tensor(
        [[1.0, -2.0, 0.0, 3.0], [0.5, 0.5, -1.0, -1.0]]
    )  # S = 2: chunks are columns {0,1}, {2,3}
    t = torch.zeros(2, 6, dtype=torch.float64)
    ops.telemetry_accumulate_(x, t, 0.0)
    assert t[0].tolist() == [0.0, 1.0 + 4.0 + 0.25 + 0.25, 1.0, 4.0, 0.0, 0.0]
    assert t[1].tolist() == [1.0, 0.0 + 9.0 + 1.0 + 1.0, 3.0, 4.0, 0.0, 0.0]


def test_telemetry_accumulate_mutates_in_place_only():
    x = torch.randn(4, 6, 3)
    x_before = x.clone()
    t = torch.zeros(3, 6, dtype=torch.float64)
    ptr = t.data_ptr()
    assert ops.telemetry_accumulate_(x, t, 0.0) is None
    assert t.data_ptr() == ptr and torch.equal(x, x_before)
    assert (t[:, ops.TELEMETRY_COUNT] == 4 * 2 * 3).all()


def test_telemetry_accumulate_into_strided_table():
    x = torch.randn(5, 4, 3)
    strided = torch.zeros(6, 2, dtype=torch.float64).t()  # [2, 6] view with column-major strides
    dense = torch.zeros(2, 6, dtype=torch.float64)
    ops.telemetry_accumulate_(x, strided, 0.0)
    ops.grad_telemetry_accumulate_(x, strided)
    ref.telemetry_accumulate_(x, dense, 0.0)
    ref.grad_telemetry_accumulate_(x, dense)
    torch.testing.assert_close(strided, dense, rtol=1e-12, atol=1e-12)


def test_telemetry_accumulate_non_finite_activation():
    x = torch.tensor([[float("nan"), 1.0, -float("inf"), 2.0]])
    t = torch.zeros(2, 6, dtype=torch.float64)
    ops.telemetry_accumulate_(x, t, 0.0)
    expected = torch.zeros(2, 6, dtype=torch.float64)
    ref.telemetry_accumulate_(x, expected, 0.0)
    torch.testing.assert_close(t, expected, equal_nan=True)
    assert math.isnan(t[0, ops.TELEMETRY_SUM]) and t[0, ops.TELEMETRY_DEAD] == 0  # NaN is not "dead"
    assert t[1, ops.TELEMETRY_DEAD] == 1 and t[1, ops.TELEMETRY_COUNT] == 2


@pytest.mark.parametrize("shape,num_seeds", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grad_telemetry_accumulate_matches_reference(shape, num_seeds, dtype):
    g = torch.Generator().manual_seed(5)
    got = torch.rand(num_seeds, 6, generator=g, dtype=torch.float64)
    expected = got.clone()
    for _ in range(3):
        grad = torch.randn(shape, generator=g).to(dtype)
        ops.grad_telemetry_accumulate_(grad, got)
        ref.grad_telemetry_accumulate_(grad, expected)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)
    assert torch.equal(got[:, :4], expected[:, :4])  # activation columns untouched


def test_grad_telemetry_from_a_backward_hook():
    # The way the layer uses it: a tensor hook on the output accumulates during backward.
    t = torch.zeros(2, 6, dtype=torch.float64)
    x = torch.randn(3, 4, requires_grad=True)
    y = x * 2.0
    y.register_hook(lambda grad: ops.grad_telemetry_accumulate_(grad, t))
    (y * torch.arange(4.0)).sum().backward()
    # grad of y is arange(4) on every row: chunk 0 has 0,1 -> 3 * (0 + 1); chunk 1 has 2,3 -> 3 * (4 + 9)
    assert t[:, ops.TELEMETRY_GRAD_SQ].tolist() == [3.0, 39.0]
    assert t[:, ops.TELEMETRY_GRAD_STEPS].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "fn,args,match",
    [
        (
            ops.telemetry_accumulate_,
            (torch.randn(2, 6), torch.zeros(4, 6, dtype=torch.float64), 0.0),
            r"C % S == 0",
        ),
        (ops.telemetry_accumulate_, (torch.randn(2, 6), torch.zeros(3, 6), 0.0), "float64"),
        (
            ops.telemetry_accumulate_,
            (torch.randn(2, 6), torch.zeros(3, 5, dtype=torch.float64), 0.0),
            r"\[S, 6\]",
        ),
        (
            ops.telemetry_accumulate_,
            (torch.arange(12).view(2, 6), torch.zeros(3, 6, dtype=torch.float64), 0.0),
            "floating-point",
        ),
        (
            ops.telemetry_accumulate_,
            (torch.randn(6), torch.zeros(3, 6, dtype=torch.float64), 0.0),
            r"\[N, C, \*\]",
        ),
        (
            ops.grad_telemetry_accumulate_,
            (torch.randn(2, 6), torch.zeros(4, 6, dtype=torch.float64)),
            r"C % S == 0",
        ),
        (
            ops.grad_telemetry_accumulate_,
            (torch.randn(2, 6), torch.zeros(0, 6, dtype=torch.float64)),
            "at least one",
        ),
    ],
)
def test_telemetry_rejects_bad_input(fn, args, match):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_telemetry_readout_statistics():
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 6, 4, generator=g), torch.randn(8, 6, 4, generator=g)
    grads = [torch.randn(8, 6, 4, generator=g) for _ in range(3)]
    t = torch.zeros(3, 6, dtype=torch.float64)
    for x in (x1, x2):
        ops.telemetry_accumulate_(x, t, 0.1)
    for grad in grads:
        ops.grad_telemetry_accumulate_(grad, t)
    stats = ops.telemetry_readout(t)
    for i in range(3):
        values = torch.cat([chunk_of(x1, 3, i).reshape(-1), chunk_of(x2, 3, i).reshape(-1)]).double()
        assert stats["mean"][i].item() == pytest.approx(values.mean().item(), rel=1e-12, abs=1e-12)
        assert stats["variance"][i].item() == pytest.approx(values.var(unbiased=False).item(), rel=1e-10)
        assert stats["dead_fraction"][i].item() == pytest.approx((values <= 0.1).double().mean().item())
        norms_sq = [chunk_of(gr, 3, i).double().pow(2).sum().item() for gr in grads]
        assert stats["gradient_norm"][i].item() == pytest.approx(math.sqrt(sum(norms_sq) / 3), rel=1e-12)
        assert stats["samples"][i].item() == values.numel()
    assert stats["samples"].dtype == torch.int64
    for key, value in ref.telemetry_readout(t).items():
        torch.testing.assert_close(stats[key], value, rtol=1e-12, atol=1e-12)


def test_telemetry_readout_of_empty_table_is_zero_and_reset_clears():
    t = torch.zeros(2, 6, dtype=torch.float64)
    stats = ops.telemetry_readout(t)
    for key in ("mean", "variance", "dead_fraction", "gradient_norm"):
        assert torch.equal(stats[key], torch.zeros(2, dtype=torch.float64)), key
    ops.telemetry_accumulate_(torch.randn(2, 4), t, 0.0)
    assert t.abs().sum() > 0
    ops.telemetry_reset_(t)
    assert torch.equal(t, torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        ops.telemetry_readout(torch.zeros(2, 6))


def test_telemetry_readout_variance_never_negative():
    # A constant activation: SUMSQ/COUNT - mean^2 can round below zero; the readout clamps it.
    t = torch.zeros(1, 6, dtype=torch.float64)
    for _ in range(7):
        ops.telemetry_accumulate_(torch.full((3, 5), 0.1), t, 0.0)
    assert ops.telemetry_readout(t)["variance"].item() >= 0.0


# ---------------------------------------------------------------- lifecycle_advance_


@pytest.mark.parametrize("num_seeds", [1, 12, 100])
@pytest.mark.parametrize("alpha_step", [0.0, 0.01, 0.3])
def test_lifecycle_advance_matches_reference(num_seeds, alpha_step):
    g = torch.Generator().manual_seed(num_seeds)
    state = torch.tensor(ALL_STATES * (num_seeds // 12 + 1))[:num_seeds]
    alpha = torch.rand(num_seeds, generator=g)
    steps = torch.randint(0, 50, (num_seeds,), generator=g)
    tables = [(state.clone(), alpha.clone(), steps.clone()) for _ in range(2)]
    for _ in range(5):
        ops.lifecycle_advance_(*tables[0], alpha_step)
        ref.lifecycle_advance_(*tables[1], alpha_step)
    for got, expected in zip(tables[0], tables[1], strict=True):
        assert torch.equal(got, expected)


def test_lifecycle_advance_semantics():
    state = torch.tensor(
        [S.UNSPECIFIED, S.DORMANT, S.GERMINATED, S.TRAINING, S.GRAFTING, S.GRAFTING, S.CULLED]
    )
    alpha = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.25, 0.95, 0.5])
    steps = torch.tensor([0, 3, 0, 10, 2, 2, 1])
    state_before = state.clone()
    ptrs = (alpha.data_ptr(), steps.data_ptr())
    assert ops.lifecycle_advance_(state, alpha, steps, 0.1) is None
    assert torch.equal(state, state_before), "lifecycle_advance_ must never make transitions"
    assert steps.tolist() == [0, 3, 1, 11, 3, 3, 2]
    assert alpha.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.35, 1.0, 0.5])
    assert alpha[5].item() == 1.0  # clamped at exactly 1
    assert (alpha.data_ptr(), steps.data_ptr()) == ptrs


def test_lifecycle_advance_strided_views():
    table = torch.zeros(4, 2)
    alpha = table[:, 0]  # stride 2
    state = torch.tensor([S.GRAFTING, S.DORMANT, S.GRAFTING, S.TRAINING])
    steps = torch.zeros(4, 3, dtype=torch.int64)[:, 1]
    ops.lifecycle_advance_(state, alpha, steps, 0.5)
    assert table[:, 0].tolist() == [0.5, 0.0, 0.5, 0.0] and table[:, 1].tolist() == [0.0] * 4
    assert steps.tolist() == [1, 0, 1, 1]


@pytest.mark.parametrize(
    "args,match",
    [
        (
            (torch.tensor([4]), torch.ones(1), torch.zeros(1, dtype=torch.int64), -0.1),
            "non-negative alpha_step",
        ),
        ((torch.tensor([4]), torch.ones(1), torch.zeros(1, dtype=torch.int64), float("nan")), "finite"),
        ((torch.tensor([4]), torch.ones(2), torch.zeros(1, dtype=torch.int64), 0.1), "length S = 1"),
        ((torch.tensor([4]), torch.ones(1), torch.zeros(1), 0.1), "`steps_in_state` of dtype Long"),
        ((torch.tensor([4.0]), torch.ones(1), torch.zeros(1, dtype=torch.int64), 0.1), "int64"),
        (
            (torch.tensor([4]), torch.ones(1).half(), torch.zeros(1, dtype=torch.int64), 0.1),
            "`alpha` of dtype Float",
        ),
    ],
)
def test_lifecycle_advance_rejects_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.lifecycle_advance_(*args)


# ---------------------------------------------------------------- opcheck


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    state = torch.tensor([S.TRAINING, S.GRAFTING, S.DORMANT, S.FOSSILIZED])
    alpha = torch.rand(4, generator=g)
    for shape, dtype in itertools.product([(3, 8), (2, 8, 3, 3)], [torch.float32, torch.float64]):
        host = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
        seed = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
        grad = torch.randn(shape, generator=g, dtype=dtype)
        yield torch.ops.esper.seed_blend.default, (host, seed, state, alpha)
        yield torch.ops.esper.seed_blend.default, (host.detach(), seed.detach(), state, alpha)
        yield torch.ops.esper.seed_blend_backward.default, (grad, seed.detach(), state, alpha)
        telemetry = torch.zeros(4, 6, dtype=torch.float64)
        yield torch.ops.esper.telemetry_accumulate_.default, (host.detach(), telemetry, 0.0)
        yield torch.ops.esper.grad_telemetry_accumulate_.default, (grad, telemetry)
    yield (
        torch.ops.esper.lifecycle_advance_.default,
        (
            torch.tensor(ALL_STATES),
            torch.rand(12, generator=g),
            torch.zeros(12, dtype=torch.int64),
            0.05,
        ),
    )


@pytest.mark.parametrize("sample", list(range(21)))
def test_opcheck(sample):
    op, args = list(_opcheck_samples())[sample]
    # All of opcheck's checks: schema (incl. declared mutation), autograd registration, fake
    # tensor kernel, and AOT dispatch with dynamic shapes.
    torch.library.opcheck(op, args)


def test_opcheck_sample_count():
    assert len(list(_opcheck_samples())) == 21


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,num_seeds", LAYOUTS + [((64, 600, 7), 600)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu(shape, num_seeds, dtype):
    g = torch.Generator().manual_seed(9)
    host = torch.randn(shape, generator=g).to(dtype)
    seed = with_non_finite(torch.randn(shape, generator=g).to(dtype), g)
    grad = torch.randn(shape, generator=g).to(dtype)
    state, alpha = make_table(num_seeds, g)
    dev = [t.cuda() for t in (host, seed, state, alpha)]
    torch.testing.assert_close(
        ops.seed_blend(*dev).cpu(), ops.seed_blend(host, seed, state, alpha), **TOL[dtype]
    )
    torch.testing.assert_close(
        torch.ops.esper.seed_blend_backward(grad.cuda(), *dev[1:]).cpu(),
        torch.ops.esper.seed_blend_backward(grad, seed, state, alpha),
        **TOL[dtype],
    )
    t_cpu = torch.zeros(num_seeds, 6, dtype=torch.float64)
    t_gpu = t_cpu.cuda()
    for _ in range(2):
        ops.telemetry_accumulate_(host, t_cpu, 0.0)
        ops.telemetry_accumulate_(host.cuda(), t_gpu, 0.0)
        ops.grad_telemetry_accumulate_(grad, t_cpu)
        ops.grad_telemetry_accumulate_(grad.cuda(), t_gpu)
    torch.testing.assert_close(t_gpu.cpu(), t_cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
def test_cuda_lifecycle_advance_and_opcheck():
    state = torch.tensor(ALL_STATES * 3)
    alpha = torch.rand(36)
    steps = torch.randint(0, 9, (36,))
    gpu = [t.cuda() for t in (state, alpha, steps)]
    ops.lifecycle_advance_(state, alpha, steps, 0.2)
    ops.lifecycle_advance_(*gpu, 0.2)
    for a, b in zip(gpu, (state, alpha, steps), strict=True):
        assert torch.equal(a.cpu(), b)
    for op, args in _opcheck_samples():
        cuda_args = tuple(
            a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        torch.library.opcheck(op, cuda_args)


@pytest.mark.gpu
def test_cuda_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="expected `seed` on"):
        ops.seed_blend(
            torch.randn(2, 4).cuda(), torch.randn(2, 4), torch.tensor([4]).cuda(), torch.ones(1).cuda()
        )
    with pytest.raises(RuntimeError, match="expected `state` on"):
        ops.seed_blend(
            torch.randn(2, 4).cuda(), torch.randn(2, 4).cuda(), torch.tensor([4]), torch.ones(1).cuda()
        )
    with pytest.raises(RuntimeError, match="expected `telemetry` on"):
        ops.telemetry_accumulate_(torch.randn(2, 4).cuda(), torch.zeros(1, 6, dtype=torch.float64), 0.0)


_ISA_SCRIPT = """
import sys, torch
from esper.kasmina import ops
g = torch.Generator().manual_seed(0)
out = []
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    x = torch.randn(7, 12, 9, 5, generator=g).to(dtype)
    s = torch.randn(7, 12, 9, 5, generator=g).to(dtype)
    s.view(-1)[::17] = float("nan")
    state, alpha = torch.tensor([3, 4, 8]), torch.tensor([0.3, 0.6, 0.9])
    t = torch.zeros(3, 6, dtype=torch.float64)
    ops.telemetry_accumulate_(x, t, 0.1)
    ops.grad_telemetry_accumulate_(x, t)
    out += [ops.seed_blend(x, s, state, alpha), torch.ops.esper.seed_blend_backward(x, s, state, alpha), t]
torch.save(out, sys.argv[1])
print(ops._C.cpu_kernel_isa())
"""


def test_cpu_isa_builds_agree_bitwise(tmp_path):
    # The CPU kernels pick an AVX2 build of their loops at runtime; ESPER_CPU_BASELINE=1 forces the
    # baseline build. Both must produce the same bits (single thread: same summation order).
    import os
    import subprocess
    import sys

    results, isas = [], []
    for name, extra_env in (("fast", {}), ("baseline", {"ESPER_CPU_BASELINE": "1"})):
        path = tmp_path / f"{name}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
        run = subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        isas.append(run.stdout.strip())
        results.append(torch.load(path))
    assert isas[1] == "baseline" and isas[0] in ("avx2", "baseline")
    for a, b in zip(*results, strict=True):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("state", [S.TRAINING, *BLENDED, S.DORMANT])
@pytest.mark.parametrize("alpha_value", [0.0, 1.0, 0.37])
def test_seed_blend_whole_has_the_fused_ops_values_and_gradients(dtype, state, alpha_value):
    # The native path (TRAINING .. FOSSILIZED, float32/64) must give the fused op's values (equal
    # as numbers: TRAINING may turn a -0.0 into +0.0) and bit-identical gradients, non-finite seed
    # values included; the other cases are the fused op itself.
    g = torch.Generator().manual_seed(int(state) * 7 + int(alpha_value * 100))
    host = torch.randn(5, 6, 4, generator=g).to(dtype)
    host[0, 0, 0] = -0.0
    seed = with_non_finite(torch.randn(5, 6, 4, generator=g), g).to(dtype)
    grad_out = torch.randn(5, 6, 4, generator=g).to(dtype)
    table_state = torch.tensor([int(state)])
    alpha = torch.tensor([alpha_value])
    results = []
    for blend in (lambda h, s: ops.seed_blend(h, s, table_state, alpha),
                  lambda h, s: ops.seed_blend_whole(h, s, state, table_state, alpha)):
        h, s = host.clone().requires_grad_(), seed.clone().requires_grad_()
        out = blend(h, s)
        out.backward(grad_out)
        results.append((out.detach(), h.grad, s.grad))
    (fused_out, fused_gh, fused_gs), (whole_out, whole_gh, whole_gs) = results
    assert torch.equal(whole_out, fused_out)
    assert torch.equal(whole_gh, fused_gh)
    assert torch.equal(whole_gs, fused_gs)
