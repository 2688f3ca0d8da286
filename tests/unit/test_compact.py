"""``compact`` (CompAct random projection): saved bytes, projection distributions, unbiasedness
of the lifted gradient, the seed schedule, gradient accumulation and ``subspace`` mode.

References: projections built by hand from the seed function (compression_reference), float64
matrix products, closed-form byte counts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig, CompressionSchedule, projection_seed
from actcomp_dist.compression.projections import PROJECTIONS, random_projection
from actcomp_dist.memory import saved_activation_bytes
from tests.helpers.compression_reference import gaussian_projection, relative_error, saved_tensors
from tests.helpers.tolerances import assert_rounded_from_exact

N_IN, N_OUT = 32, 8
TOKENS = 64  # rows of _data()
# The layer's fp32 P is randn(fp32) * fl(1/sqrt(r)): two roundings away from the float64 P of
# gaussian_projection, so every product with P counts 2 more rounding steps in its bound.
P_ROUNDINGS = 2
# Z = X P: a length-N_IN reduction; the lifted gradient (g^T Z) P^T adds the token reduction
# and the length-r lift.
Z_LENGTH = N_IN + P_ROUNDINGS
LIFT_LENGTH = Z_LENGTH + TOKENS + 8 + P_ROUNDINGS


def _layer(dtype=torch.float32, schedule=None, layer_id=0, site="fc1", **fields):
    fields = {"method": "compact", "rank": 0.25, "seed": 11, **fields}
    torch.manual_seed(0)
    return CompressedLinear(
        N_IN,
        N_OUT,
        dtype=dtype,
        compression=CompressionConfig(**fields),
        layer_id=layer_id,
        site=site,
        schedule=schedule,
    )


def _data(tokens=TOKENS, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, N_IN, generator=generator, dtype=torch.float64)
    g = torch.randn(tokens, N_OUT, generator=generator, dtype=torch.float64)
    return x.to(dtype), g.to(dtype)


def _saved_z(layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    (z,) = saved_tensors(lambda: layer(x.clone().requires_grad_()))
    return z


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank, r", [(0.25, 8), (8, 8), (0.3, 10), (1, 1), (1.0, 32)])
def test_saved_bytes_exactly_n_r_itemsize(dtype, rank, r):
    layer = _layer(dtype, rank=rank)
    assert layer.compressor.rank == r
    x = torch.randn(4, 16, N_IN, dtype=dtype, requires_grad=True)  # N = 64 tokens
    n_tokens, itemsize = 64, dtype.itemsize

    saved = saved_tensors(lambda: layer(x).sum())
    assert [tuple(t.shape) for t in saved] == [(n_tokens, r)]  # Z only: no X, no P
    compressed = saved_activation_bytes(lambda: layer(x).sum())
    assert compressed == n_tokens * r * itemsize

    oracle = CompressedLinear(N_IN, N_OUT, dtype=dtype, compression=CompressionConfig("none"))
    uncompressed = saved_activation_bytes(lambda: oracle(x).sum())
    assert uncompressed == n_tokens * N_IN * itemsize
    assert compressed / uncompressed == r / N_IN


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------


def test_gaussian_projection_is_the_seeded_formula():
    """Z = X P with P drawn from a fresh generator seeded by projection_seed(seed, layer_id,
    site, block 0, epoch), N(0, 1/r) in float32."""
    layer = _layer(layer_id=5, site="qkv")
    layer.schedule.advance(120)  # resample_every=50: epoch 2
    x, _ = _data()
    p = gaussian_projection(11, 5, "qkv", 2, N_IN, 8)
    # fp32 X P against float64: the rounding bound of the length-N_IN product.
    z = _saved_z(layer, x)
    assert_rounded_from_exact(z, x.double() @ p, x.double().abs() @ p.abs(), Z_LENGTH)


def test_projection_entry_distributions():
    """Entry values and second moments: E[P P^T] = I needs E[p_ij^2] = 1/r.

    Tolerances: mean of r * p^2 over M = 256 * 64 entries; its standard error is sqrt(2 / M)
    = 0.011 (gaussian) and sqrt((s - 1) / M) = 0.030 (sparse, s = sqrt(256) = 16); we allow
    5 standard errors. The sparse density 1/s has standard error 0.0019; we allow 0.01.
    """
    rows, cols = 256, 64
    gaussian = random_projection("gaussian", rows, cols, 3, torch.device("cpu"), torch.float64)
    assert abs((gaussian.square() * cols).mean().item() - 1.0) < 0.06
    assert abs(gaussian.mean().item()) < 5 / math.sqrt(rows * cols * cols)

    rademacher = random_projection("rademacher", rows, cols, 3, torch.device("cpu"), torch.float64)
    # float64 entries built with one or two roundings: allclose's rtol 1e-5 is far above that;
    # a wrong value would be off by a factor.
    assert torch.allclose(rademacher.abs(), torch.full_like(rademacher, 1 / math.sqrt(cols)))
    assert abs((rademacher > 0).double().mean().item() - 0.5) < 0.02

    sparse = random_projection("sparse", rows, cols, 3, torch.device("cpu"), torch.float64)
    s = math.sqrt(rows)
    nonzero = sparse != 0
    assert torch.allclose(sparse[nonzero].abs(), torch.tensor(math.sqrt(s / cols)).double())
    assert abs(nonzero.double().mean().item() - 1 / s) < 0.01
    assert abs((sparse.square() * cols).mean().item() - 1.0) < 0.15


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_lifted_gradient_is_unbiased(projection):
    """The mean of (g^T Z) P^T over independent seeds converges to g^T X.

    For S i.i.d. estimates with E[G_s] = G, E||mean_S - G||^2 = sigma^2 / S, with sigma^2 =
    E||G_s - G||^2 estimated from the same samples. With m * n = 256 entries the error norm
    concentrates, so we allow 2x the predicted error and require the error to shrink by at
    least 2x from S = 25 to S = 400 (predicted: 4x). Float64 so that rounding plays no part.
    """
    x, g = _data(tokens=64, dtype=torch.float64)
    exact = g.t() @ x
    samples = []
    for seed in range(400):
        layer = _layer(torch.float64, projection=projection, seed=seed)
        layer(x.clone().requires_grad_()).backward(g)
        samples.append(layer.weight.grad)
    samples = torch.stack(samples)
    sigma = (samples - exact).square().sum((1, 2)).mean().sqrt().item()
    assert sigma > exact.norm().item()  # one sample alone is far off: averaging is what works
    errors = {}
    for count in (25, 400):
        errors[count] = (samples[:count].mean(0) - exact).norm().item()
        assert errors[count] < 2 * sigma / math.sqrt(count), (count, errors[count], sigma)
    assert errors[400] < 0.5 * errors[25]


# ---------------------------------------------------------------------------------------------
# Seeds and the schedule
# ---------------------------------------------------------------------------------------------


def test_projection_seed_is_a_stable_pure_function():
    """Pinned values: checkpoints and every rank of a run rely on the same seed for the same
    (base seed, layer, site, block, epoch), across processes and versions."""
    assert projection_seed(0, 0, "qkv", 0, 0) == 4646061991517894294
    assert projection_seed(1234, 3, "fc1", 2, 7) == 1959667005445589421
    base = (1234, 3, "fc1", 2, 7)
    variants = [(1235, 3, "fc1", 2, 7), (1234, 4, "fc1", 2, 7), (1234, 3, "fc2", 2, 7)]
    variants += [(1234, 3, "fc1", 3, 7), (1234, 3, "fc1", 2, 8)]
    seeds = {projection_seed(*args) for args in [base, *variants]}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


def test_schedule_state_dict_round_trip():
    schedule = CompressionSchedule(resample_every=4, step=9)
    restored = CompressionSchedule(resample_every=4)
    restored.load_state_dict(schedule.state_dict())
    assert restored.step == 9 and restored.epoch == 2
    with pytest.raises(ValueError, match="resample_every=4"):
        CompressionSchedule(resample_every=5).load_state_dict(schedule.state_dict())
    with pytest.raises(ValueError, match="resample_every"):
        CompressionSchedule(resample_every=0)


def test_layers_and_sites_get_different_projections():
    x, _ = _data()
    places = [(0, "qkv"), (1, "qkv"), (2, "qkv"), (0, "fc1"), (0, "fc2"), (1, "fc2")]
    zs = [_saved_z(_layer(layer_id=layer_id, site=site), x) for layer_id, site in places]
    for i in range(len(zs)):
        for j in range(i):
            # Independent projections give O(1) different entries: far outside 1e-3.
            assert not torch.allclose(zs[i], zs[j], atol=1e-3), (places[i], places[j])
    # The same place in another instance (another rank, a recompute) rebuilds the same matrix.
    assert torch.equal(_saved_z(_layer(layer_id=1, site="fc2"), x), zs[-1])
    # So does another base seed change everything.
    assert not torch.allclose(_saved_z(_layer(layer_id=1, site="fc2", seed=12), x), zs[-1])


def test_projection_changes_exactly_at_resample_boundaries():
    schedule = CompressionSchedule(resample_every=3)
    layer = _layer(schedule=schedule, resample_every=3)
    x, _ = _data()
    zs = []
    for step in range(10):
        assert schedule.step == step
        zs.append(_saved_z(layer, x))
        p = gaussian_projection(11, 0, "fc1", step // 3, N_IN, 8)
        magnitude = x.double().abs() @ p.abs()
        assert_rounded_from_exact(zs[-1], x.double() @ p, magnitude, Z_LENGTH, msg=str(step))
        schedule.advance()
    for a in range(10):
        for b in range(10):
            assert torch.equal(zs[a], zs[b]) == (a // 3 == b // 3), (a, b)


def test_schedule_attach_advances_once_per_optimizer_step():
    layer = _layer(resample_every=2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    handle = layer.schedule.attach(optimizer)
    x, g = _data()
    for _ in range(3):
        layer(x).backward(g)  # two micro-batches per step
        layer(x).backward(g)
        optimizer.step()
    assert layer.schedule.step == 3 and layer.schedule.epoch == 1
    handle.remove()
    optimizer.step()
    assert layer.schedule.step == 3


@pytest.mark.parametrize("cache_projection", [True, False], ids=["cached", "regenerated"])
def test_gradient_accumulation_uses_one_projection(cache_projection):
    """Two micro-batches of one step accumulate (g1^T X1 + g2^T X2) P P^T with the step's P."""
    layer = _layer(resample_every=1, cache_projection=cache_projection)
    (x1, g1), (x2, g2) = _data(seed=1), _data(seed=2)
    layer(x1).backward(g1)
    layer(x2).backward(g2)
    p = gaussian_projection(11, 0, "fc1", 0, N_IN, 8)
    exact = g1.double().t() @ x1.double() + g2.double().t() @ x2.double()
    magnitude = (
        g1.double().abs().t() @ x1.double().abs() + g2.double().abs().t() @ x2.double().abs()
    )
    # Each micro-batch's lift (g^T X P) P^T, plus one rounding for the accumulation.
    assert_rounded_from_exact(
        layer.weight.grad, exact @ p @ p.t(), magnitude @ p.abs() @ p.abs().t(), LIFT_LENGTH + 1
    )


@pytest.mark.parametrize("cache_projection", [True, False], ids=["cached", "regenerated"])
def test_backward_uses_the_seed_stored_at_forward(cache_projection):
    """The schedule advancing between forward and backward (another micro-batch's step hook,
    a pipeline schedule) must not change the projection backward lifts with."""
    layer = _layer(resample_every=1, cache_projection=cache_projection)
    x, g = _data()
    out = layer(x)
    layer.schedule.advance()
    _saved_z(layer, x)  # a forward at the new epoch in between (refreshes any cache)
    out.backward(g)
    p0 = gaussian_projection(11, 0, "fc1", 0, N_IN, 8)
    p1 = gaussian_projection(11, 0, "fc1", 1, N_IN, 8)
    exact = g.double().t() @ x.double()
    magnitude = g.double().abs().t() @ x.double().abs() @ p0.abs() @ p0.abs().t()
    assert_rounded_from_exact(layer.weight.grad, exact @ p0 @ p0.t(), magnitude, LIFT_LENGTH)
    assert relative_error(layer.weight.grad, exact @ p1 @ p1.t()) > 0.5


# ---------------------------------------------------------------------------------------------
# subspace mode
# ---------------------------------------------------------------------------------------------


def test_subspace_keeps_the_compressed_gradient():
    layer = _layer(grad_mode="subspace", layer_id=2, site="fc2")
    reference = nn.Linear(N_IN, N_OUT)
    reference.load_state_dict(layer.state_dict())
    x, g = _data()
    layer(x).backward(g)
    reference(x).backward(g)

    assert layer.weight.grad is None
    p = gaussian_projection(11, 2, "fc2", 0, N_IN, 8)
    expected = g.double().t() @ (x.double() @ p)  # [m, r]
    assert layer.weight.subspace.grad.shape == (N_OUT, 8)
    assert layer.weight.subspace.grad.dtype == torch.float32
    # g^T Z: the length-N_IN product X P, then the token reduction.
    magnitude = g.double().abs().t() @ x.double().abs() @ p.abs()
    assert_rounded_from_exact(layer.weight.subspace.grad, expected, magnitude, Z_LENGTH + TOKENS)
    assert layer.weight.subspace.seeds == (projection_seed(11, 2, "fc2", 0, 0),)
    assert torch.equal(layer.bias.grad, reference.bias.grad)  # the bias is an ordinary parameter


def test_subspace_accumulates_micro_batches_and_rejects_mixed_projections():
    layer = _layer(grad_mode="subspace", resample_every=1)
    (x1, g1), (x2, g2) = _data(seed=1), _data(seed=2)
    layer(x1).backward(g1)
    out = layer(x2)
    layer.schedule.advance()  # between forward and backward: the stored seed still rules
    out.backward(g2)
    p = gaussian_projection(11, 0, "fc1", 0, N_IN, 8)
    expected = g1.double().t() @ x1.double() @ p + g2.double().t() @ x2.double() @ p
    magnitude = (
        g1.double().abs().t() @ x1.double().abs() + g2.double().abs().t() @ x2.double().abs()
    ) @ p.abs()
    # Two micro-batches' g^T Z plus one rounding for the accumulation.
    assert_rounded_from_exact(
        layer.weight.subspace.grad, expected, magnitude, Z_LENGTH + TOKENS + 1
    )

    # A micro-batch at the new epoch would add a gradient from another subspace.
    with pytest.raises(RuntimeError, match="different projections"):
        layer(x1).backward(g1)


def test_deep_copy_keeps_subspace_mode():
    """``copy.deepcopy`` (EMA copies, model surgery) makes new Parameters without Python
    attributes; the copy must still train in its subspace, identically to the original."""
    from actcomp_dist.optim import SubspaceAdamW, is_subspace_parameter

    layer = _layer(grad_mode="subspace")
    clone = copy.deepcopy(layer)
    assert clone.weight is not layer.weight and is_subspace_parameter(clone.weight)
    x, g = _data()
    for module in (layer, clone):
        module(x).backward(g)
        SubspaceAdamW(module.parameters(), lr=0.1).step()
    assert clone.weight.grad is None
    assert torch.equal(clone.weight.subspace.grad, layer.weight.subspace.grad)
    assert torch.equal(clone.weight, layer.weight)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("tp", [2, 4])
def test_dense_row_shards_stack_to_the_single_device_projection(projection, tp):
    """``row_parallel_projection='dense'``: rank i's projection is rows [i*n/t, (i+1)*n/t) of
    the single-device layer's P (same seed; ``sparse`` keeps its density 1/sqrt(n) of the
    full width), and each rank's saved width is the full r."""
    from actcomp_dist.compression import build_compressor, layer_layout

    config = CompressionConfig(method="compact", rank=0.25, seed=11, projection=projection)
    single = _layer(projection=projection, site="fc2").compressor
    seeds = single.current_seeds()
    full = single.projection(seeds, torch.device("cpu"), torch.float32)  # [n, r]
    shards = []
    for rank in range(tp):
        layout = layer_layout(config, N_IN, row_parallel=True, tp_rank=rank, tp_size=tp)
        shard = build_compressor(config, layout, 0, "fc2", single.schedule)
        assert shard.compressed_width == full.shape[1] and shard.in_features == N_IN // tp
        shards.append(shard.projection(shard.current_seeds(), torch.device("cpu"), torch.float32))
    assert torch.equal(torch.cat(shards), full)
