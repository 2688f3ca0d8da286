"""``SubspaceAdamW`` and ``clip_grad_norm_`` against hand-written references.

The subspace reference is CompAct's update written out in float64:
moments m x r over the compressed gradient G_hat = g^T X P, bias-corrected Adam direction N,
and the lifted update W <- W (1 - lr wd) - lr alpha N P^T with P rebuilt from the seed of the
step's epoch. Ordinary parameters in the same optimizer are checked against
``torch.optim.AdamW`` itself.

Tolerances: the reference also carries, element by element, a first-order bound on the error
of an fp32 evaluation of each quantity (running error analysis): the rounding bound of each
reduction (tests/helpers/tolerances.py) and one unit roundoff per elementwise operation and per fp32
constant, propagated through the moment updates, the square root, the division and the lift.
The clipping tests bound the fp32 norm by the length of its sum of squares.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.optim import SubspaceAdamW, clip_grad_norm_
from tests.helpers.compression_reference import gaussian_projection, relative_error
from tests.helpers.tolerances import UNIT_ROUNDOFF, gamma

N_TOKENS, N_IN, N_OUT, RANK, SEED = 32, 16, 8, 4, 21
LR, BETAS, EPS, WEIGHT_DECAY = 0.05, (0.9, 0.95), 1e-8, 0.1


def _subspace_layer(resample_every: int = 1) -> CompressedLinear:
    torch.manual_seed(0)
    cfg = CompressionConfig(
        method="compact", rank=RANK, grad_mode="subspace", resample_every=resample_every, seed=SEED
    )
    return CompressedLinear(N_IN, N_OUT, compression=cfg, layer_id=0, site="fc1")


def _step_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output gradient of one step (loss = sum(y * c), so dL/dy = c)."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(N_TOKENS, N_IN, generator=generator), torch.randn(
        N_TOKENS, N_OUT, generator=generator
    )


def _reference_subspace_weights(w0, alpha, reset_moments_at=None):
    """float64 CompAct: two steps, resample_every=1 so step t uses the projection of epoch t.

    Returns ``(w, m, v)`` and ``(dw, dm, dv)``: first-order bounds on how far an fp32
    evaluation of each (``SubspaceAdamW._update``'s operations) can be from it. Terms: ``G_hat``
    within the rounding bound of ``X P`` (length n, plus 2 roundings of fp32 P: randn times
    fl(1/sqrt(r))) and of the token reduction; each lerp / mul / addcmul / sqrt / division /
    add one unit roundoff of its operands' magnitude, fp32 constants one more; the lift
    ``N P^T`` a length-r reduction (plus P's 2 roundings)."""
    u = UNIT_ROUNDOFF[torch.float32]
    w = w0.double().clone()
    m = torch.zeros(N_OUT, RANK, dtype=torch.float64)
    v = torch.zeros_like(m)
    dw, dm, dv = torch.zeros_like(w), torch.zeros_like(m), torch.zeros_like(v)
    beta1, beta2 = BETAS
    moments_step = 0
    for step in range(2):
        if step == reset_moments_at:
            m, v, moments_step = torch.zeros_like(m), torch.zeros_like(v), 0
            dm, dv = torch.zeros_like(dm), torch.zeros_like(dv)
        moments_step += 1
        x, c = _step_data(step)
        p = gaussian_projection(SEED, 0, "fc1", step, N_IN, RANK)  # [n, r]
        ghat = c.double().t() @ (x.double() @ p)  # [m, r]
        dg = gamma(N_IN + 2 + N_TOKENS, torch.float32) * (
            c.double().abs().t() @ x.double().abs() @ p.abs()
        )
        # p.mul_(1 - lr wd): the constant and the product.
        decay = 1 - LR * WEIGHT_DECAY
        dw = decay * dw + 2 * u * decay * w.abs()
        w = w * decay
        # lerp m + (1 - beta1) (g - m): difference, constant, product, sum.
        dm = beta1 * dm + (1 - beta1) * dg + 4 * u * (m.abs() + ghat.abs())
        m = beta1 * m + (1 - beta1) * ghat
        # v beta2 + (1 - beta2) g^2: two constants, three products, the sum.
        dv = beta2 * dv + (1 - beta2) * (2 * ghat.abs() + dg) * dg
        dv = dv + 6 * u * (beta2 * v + (1 - beta2) * ghat.square())
        v = beta2 * v + (1 - beta2) * ghat.square()
        m_hat = m / (1 - beta1**moments_step)
        v_hat = v / (1 - beta2**moments_step)
        # denom = sqrt(v) / c2 + eps: sqrt, constant, division, add; |sqrt(v + d) - sqrt(v)| is
        # at most d / (2 sqrt v) and at most sqrt d.
        scale2 = math.sqrt(1 - beta2**moments_step)
        denom = v_hat.sqrt() + EPS
        d_sqrt = torch.minimum(dv.sqrt(), dv / (2 * v.sqrt()).clamp_min(1e-300))
        d_denom = d_sqrt / scale2 + 4 * u * denom
        direction = m_hat / denom
        # exp_avg / denom (the bias correction of m goes into the step size below).
        d_ratio = (dm + m.abs() * d_denom / (denom - d_denom)) / denom + u * m.abs() / denom
        step_size = LR * alpha / (1 - beta1**moments_step)
        p_abs = p.abs()
        d_lift = (
            d_ratio @ p_abs.t() + gamma(RANK + 2, torch.float32) * (m.abs() / denom) @ p_abs.t()
        )
        update = LR * alpha * direction @ p.t()  # = step_size (m / denom) P^T
        # times the step size (constant, product), then the add.
        dw = dw + step_size * d_lift + 2 * u * update.abs() + u * (w - update).abs()
        w = w - update
    return (w, m, v), (dw, dm, dv)


@pytest.mark.parametrize("alpha", [None, 0.5], ids=["default-alpha", "alpha-0.5"])
def test_two_steps_match_the_reference_with_moments_kept_across_a_resample(alpha):
    layer = _subspace_layer(resample_every=1)
    other = nn.Linear(N_IN, N_OUT)  # an ordinary parameter group in the same optimizer
    w0 = layer.weight.detach().clone()

    reference_other = copy.deepcopy(other)
    reference_bias = nn.Parameter(layer.bias.detach().clone())
    reference_optimizer = torch.optim.AdamW(
        [*reference_other.parameters(), reference_bias],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        foreach=False,
    )
    scale = {} if alpha is None else {"subspace_scale": alpha}
    optimizer = SubspaceAdamW(
        [*layer.parameters(), *other.parameters()],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        **scale,
    )
    layer.schedule.attach(optimizer)

    for step in range(2):
        x, c = _step_data(step)
        optimizer.zero_grad()
        ((layer(x) * c).sum() + other(x).square().sum()).backward()
        assert layer.weight.grad is None and layer.weight.subspace.grad.shape == (N_OUT, RANK)
        optimizer.step()

        reference_optimizer.zero_grad()
        (reference_other(x).square().sum() + (reference_bias * c.sum(0)).sum()).backward()
        reference_optimizer.step()

    # Ordinary parameters (the compressed layer's bias and another module): plain AdamW.
    assert torch.equal(layer.bias, reference_bias)
    assert torch.equal(other.weight, reference_other.weight)
    assert torch.equal(other.bias, reference_other.bias)

    # The subspace weight: m x r moments and the lifted update, each element within the
    # reference's first-order bound on the fp32 rounding (see _reference_subspace_weights).
    expected, bounds = _reference_subspace_weights(w0, alpha or 0.25)
    state = optimizer.state[layer.weight]
    assert state["exp_avg"].shape == (N_OUT, RANK) and state["exp_avg"].dtype == torch.float32
    actual = (layer.weight.detach(), state["exp_avg"], state["exp_avg_sq"])
    for name, value, exact, bound in zip("wmv", actual, expected, bounds, strict=True):
        error = (value.double() - exact).abs()
        assert (error <= bound).all(), (name, error.max().item(), (error / bound).max().item())

    # The test can tell the difference: resetting the moments at the resample, or not
    # resampling at all, gives a clearly different weight.
    (reset_w, _, _), _ = _reference_subspace_weights(w0, alpha or 0.25, reset_moments_at=1)
    assert relative_error(layer.weight - w0, reset_w - w0) > 0.05
    p0 = gaussian_projection(SEED, 0, "fc1", 0, N_IN, RANK)
    p1 = gaussian_projection(SEED, 0, "fc1", 1, N_IN, RANK)
    assert relative_error(p1, p0) > 1.0


def test_zero_grad_clears_compressed_gradients():
    layer = _subspace_layer()
    optimizer = SubspaceAdamW(layer.parameters())
    x, c = _step_data(0)
    (layer(x) * c).sum().backward()
    assert layer.weight.subspace.grad is not None and layer.bias.grad is not None
    optimizer.zero_grad()
    assert layer.weight.subspace.grad is None and layer.weight.subspace.seeds is None
    assert layer.bias.grad is None
    # A new step may now use a new projection without tripping the accumulation check.
    layer.schedule.advance()
    (layer(x) * c).sum().backward()
    assert layer.weight.subspace.grad is not None


def test_invalid_hyperparameters():
    params = [nn.Parameter(torch.zeros(2))]
    for bad in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"subspace_scale": 0.0}, {"eps": -1e-8}):
        with pytest.raises(ValueError):
            SubspaceAdamW(params, **bad)


def _model_with_gradients():
    layer = _subspace_layer()
    other = nn.Linear(N_IN, N_OUT)
    x, c = _step_data(0)
    ((layer(x) * c).sum() + other(x).square().sum()).backward()
    return layer, other


def test_clip_grad_norm_includes_compressed_gradients():
    layer, other = _model_with_gradients()
    params = [*layer.parameters(), *other.parameters()]
    grads = [layer.weight.subspace.grad, layer.bias.grad, other.weight.grad, other.bias.grad]
    before = [g.double().clone() for g in grads]
    expected_norm = math.sqrt(sum(g.square().sum().item() for g in before))

    max_norm = expected_norm / 4
    norm = clip_grad_norm_(params, max_norm)
    # fp32 sum of squares of all entries (a square, then sums per tensor and over the
    # tensors: length <= count + 1, all terms positive, so magnitude = value), then the square
    # root (halves the relative error, one rounding more).
    count = sum(g.numel() for g in before)
    norm_rtol = gamma(count + 1, torch.float32) / 2 + UNIT_ROUNDOFF[torch.float32]
    assert abs(norm.item() - expected_norm) <= norm_rtol * expected_norm
    factor = max_norm / (expected_norm + 1e-6)
    clipped = [layer.weight.subspace.grad, layer.bias.grad, other.weight.grad, other.bias.grad]
    # scale = max_norm / (norm + 1e-6) in fp32 (two constants, the add, the division), then
    # one product per element.
    scale_rtol = norm_rtol + gamma(5, torch.float32)
    for after, original in zip(clipped, before, strict=True):
        error = (after.double() - original * factor).abs()
        assert (error <= scale_rtol * (original * factor).abs()).all()

    # Below the threshold nothing changes.
    unchanged = [g.clone() for g in clipped]
    clip_grad_norm_(params, 10 * expected_norm)
    assert all(torch.equal(a, b) for a, b in zip(clipped, unchanged, strict=True))


def test_clip_grad_norm_matches_torch_for_ordinary_parameters():
    _, other = _model_with_gradients()
    reference = copy.deepcopy(other)
    for p, ref in zip(other.parameters(), reference.parameters(), strict=True):
        ref.grad = p.grad.clone()  # deepcopy does not copy .grad
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    norm = clip_grad_norm_(other.parameters(), 1.0)
    # Both sum the same fp32 squares, possibly in another order: within twice the rounding
    # bound of the length-(count + 1) sum, and the square root's rounding, of each other.
    count = sum(p.numel() for p in other.parameters())
    norm_rtol = 2 * (gamma(count + 1, torch.float32) / 2 + UNIT_ROUNDOFF[torch.float32])
    torch.testing.assert_close(norm, expected, rtol=norm_rtol, atol=0)
    # Each then scales by max_norm / (norm + 1e-6): the norms' difference plus the roundings
    # of the constants, the add, the division and the product, on each side.
    scale_rtol = norm_rtol + 2 * gamma(5, torch.float32)
    for p, ref in zip(other.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=scale_rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_keeps_float32_moments(dtype):
    """Resuming from ``state_dict()`` continues exactly as the uninterrupted run, with the
    moments still float32 for bf16 weights (``torch.optim.Optimizer`` would cast them)."""

    def make():
        torch.manual_seed(0)
        cfg = CompressionConfig(method="compact", rank=RANK, grad_mode="subspace", seed=SEED)
        layer = CompressedLinear(N_IN, N_OUT, dtype=dtype, compression=cfg)
        return layer, SubspaceAdamW(layer.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(layer, optimizer, index):
        x, c = _step_data(index)
        optimizer.zero_grad()
        (layer(x.to(dtype)) * c.to(dtype)).sum().backward()
        optimizer.step()

    layer, optimizer = make()
    step(layer, optimizer, 0)
    # state_dict() returns live tensors that the next step updates in place.
    saved_weights = copy.deepcopy(layer.state_dict())
    saved_state = copy.deepcopy(optimizer.state_dict())
    step(layer, optimizer, 1)

    resumed, resumed_optimizer = make()
    resumed.load_state_dict(saved_weights)
    resumed_optimizer.load_state_dict(saved_state)
    for state in resumed_optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    step(resumed, resumed_optimizer, 1)
    assert torch.equal(resumed.weight, layer.weight) and torch.equal(resumed.bias, layer.bias)
