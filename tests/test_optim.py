"""``SubspaceAdamW`` and ``clip_grad_norm_`` against hand-written references.

The subspace reference is CompAct's update written out in float64:
moments m x r over the compressed gradient G_hat = g^T X P, bias-corrected Adam direction N,
and the lifted update W <- W (1 - lr wd) - lr alpha N P^T with P rebuilt from the seed of the
step's epoch. Ordinary parameters in the same optimizer are checked against
``torch.optim.AdamW`` itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from compression_reference import gaussian_projection, relative_error
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.optim import SubspaceAdamW, clip_grad_norm_

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
    """float64 CompAct: two steps, resample_every=1 so step t uses the projection of epoch t."""
    w = w0.double().clone()
    m = torch.zeros(N_OUT, RANK, dtype=torch.float64)
    v = torch.zeros_like(m)
    beta1, beta2 = BETAS
    moments_step = 0
    for step in range(2):
        if step == reset_moments_at:
            m, v, moments_step = torch.zeros_like(m), torch.zeros_like(v), 0
        moments_step += 1
        x, c = _step_data(step)
        p = gaussian_projection(SEED, 0, "fc1", step, N_IN, RANK)  # [n, r]
        ghat = c.double().t() @ (x.double() @ p)  # [m, r]
        m = beta1 * m + (1 - beta1) * ghat
        v = beta2 * v + (1 - beta2) * ghat.square()
        m_hat = m / (1 - beta1**moments_step)
        v_hat = v / (1 - beta2**moments_step)
        direction = m_hat / (v_hat.sqrt() + EPS)
        w = w * (1 - LR * WEIGHT_DECAY) - LR * alpha * direction @ p.t()
    return w, m, v


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

    # The subspace weight: m x r moments and the lifted update. Tolerance: W is float32 and
    # the lift is a float32 GEMM; 1e-5 relative on the total update is ~100 float32 epsilons.
    expected_w, expected_m, expected_v = _reference_subspace_weights(w0, alpha or 0.25)
    state = optimizer.state[layer.weight]
    assert state["exp_avg"].shape == (N_OUT, RANK) and state["exp_avg"].dtype == torch.float32
    assert relative_error(state["exp_avg"], expected_m) < 1e-6
    assert relative_error(state["exp_avg_sq"], expected_v) < 1e-6
    assert relative_error(layer.weight - w0, expected_w - w0) < 1e-5

    # The test can tell the difference: resetting the moments at the resample, or not
    # resampling at all, gives a clearly different weight.
    reset_w, _, _ = _reference_subspace_weights(w0, alpha or 0.25, reset_moments_at=1)
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
    assert abs(norm.item() - expected_norm) < 1e-5 * expected_norm
    factor = max_norm / (expected_norm + 1e-6)
    clipped = [layer.weight.subspace.grad, layer.bias.grad, other.weight.grad, other.bias.grad]
    for after, original in zip(clipped, before, strict=True):
        assert relative_error(after, original * factor) < 1e-6

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
    torch.testing.assert_close(norm, expected)
    for p, ref in zip(other.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad)


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
