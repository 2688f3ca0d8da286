"""``subtoken`` (VeLoRA rank-1 sub-token projection): the projection vector, its freezing and
checkpointing, saved bytes, the weight gradient against the float64 reconstruction, the
gradient scale ``velora_scale``, and the vector averaged over data-parallel ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig, compress_linears
from actcomp_dist.memory import saved_activation_bytes
from tests.helpers.compression_reference import relative_error, saved_tensors
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_rounded_from_exact, gamma

N_TOKENS, N_IN, N_OUT, GROUPS = 48, 32, 16, 4
GROUP_WIDTH = N_IN // GROUPS


def _layer(dtype=torch.float32, groups=GROUPS, velora_scale=1.0, **kwargs):
    torch.manual_seed(0)
    return CompressedLinear(
        N_IN,
        N_OUT,
        dtype=dtype,
        compression=CompressionConfig(method="subtoken", groups=groups, velora_scale=velora_scale),
        **kwargs,
    )


def _batch(seed: int, tokens: int = N_TOKENS, shift: float = 0.5) -> torch.Tensor:
    """Inputs with a non-zero mean (as real activations have), so the mean sub-token is a
    well-defined direction."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, N_IN, generator=generator) + shift * torch.arange(N_IN) / N_IN


def _expected_vector(*batches: torch.Tensor) -> torch.Tensor:
    sub_tokens = torch.cat([b.double().reshape(-1, GROUP_WIDTH) for b in batches])
    mean = sub_tokens.mean(0)
    return mean / mean.norm()


def _reconstructed_weight_grad(x, g, v):
    """float64: every sub-token x_j is replaced by (x_j . v) v, then dW = g^T X_tilde."""
    x, g, v = x.double(), g.double(), v.double()
    sub = x.reshape(x.shape[0], GROUPS, GROUP_WIDTH)
    x_tilde = ((sub @ v).unsqueeze(-1) * v).reshape_as(x)
    return g.t() @ x_tilde


def _assert_reconstruction(grad, x, g, v, scale=1.0):
    """``grad`` is the float32 ``scale g^T X_tilde`` of float32 ``x``, ``g``, ``v``: within the
    rounding bound of its chain (tests/helpers/tolerances.py) of the float64 value. The chain:
    the sub-token dot products x_j . v (length GW), the scaled vector and the product c v (one
    rounding each), the contraction over tokens (N); the magnitude is the same chain on
    absolute values."""
    magnitude = abs(scale) * _reconstructed_weight_grad(x.abs(), g.abs(), v.abs())
    expected = scale * _reconstructed_weight_grad(x, g, v)
    assert_rounded_from_exact(grad, expected, magnitude, x.shape[0] + GROUP_WIDTH + 2)


def _vector_rtol(*batches: torch.Tensor, rounded: bool = False) -> float:
    """Relative (2-norm) tolerance of the float32 v against the float64 normalised mean of
    ``batches``' sub-tokens. The float32 mean of M sub-tokens (a sum in any order, the
    all-reduce's addition, the division) is off by at most ``gamma_(M+2) mean|x|`` per element
    (plus u, one rounding of each input, when the inputs are float64 ``rounded`` to float32);
    normalising moves the direction by at most twice that error over ``||mean||``, and the
    float32 norm (GW squares, a square root) and division add ``gamma_(GW+3)``. The mean of
    inputs centred near 0 is small against mean|x|: the bound says by how much."""
    u = UNIT_ROUNDOFF[torch.float32]
    sub = torch.cat([b.double().reshape(-1, GROUP_WIDTH) for b in batches])
    per_element = (gamma(sub.shape[0] + 2, torch.float32) + (u if rounded else 0.0)) * sub.abs()
    error = per_element.mean(0).norm() / sub.mean(0).norm()
    return 2 * error.item() + gamma(GROUP_WIDTH + 3, torch.float32)


def test_vector_is_normalised_mean_of_first_batch_then_frozen():
    layer = _layer()
    first, second = _batch(1), _batch(2, shift=-3.0)
    layer(first)
    v = layer.compressor.subtoken_vector.clone()
    assert relative_error(v, _expected_vector(first)) <= _vector_rtol(first)
    layer(second)  # a very different batch: v stays what the first batch chose
    assert torch.equal(layer.compressor.subtoken_vector, v)


def test_vector_is_averaged_over_replicas_before_freezing():
    """With an ``all_reduce`` (data/tensor-parallel replicas), v is the mean over every
    replica's sub-tokens, weighted by their counts: the same v on every rank."""
    sent: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        sent.append(t.clone())
        return t

    other, mine = _batch(3, tokens=16), _batch(4, tokens=48)
    _layer(all_reduce=record)(other)
    layer = _layer(all_reduce=lambda t: t + sent[0])
    layer(mine)
    vector = layer.compressor.subtoken_vector
    assert relative_error(vector, _expected_vector(other, mine)) <= _vector_rtol(other, mine)


def test_vector_is_in_the_state_dict_and_restored():
    trained = _layer()
    trained(_batch(1))
    state = trained.state_dict()
    assert torch.equal(state["compressor.subtoken_vector"], trained.compressor.subtoken_vector)

    restored = _layer()
    restored.load_state_dict(state)
    x, g = _batch(5, shift=-3.0), torch.randn(N_TOKENS, N_OUT)
    restored(x).backward(g)  # must not re-initialise from this batch
    trained(x).backward(g)
    assert torch.equal(restored.compressor.subtoken_vector, trained.compressor.subtoken_vector)
    assert torch.equal(restored.weight.grad, trained.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_n_times_groups(dtype):
    layer = _layer(dtype)
    x = _batch(1).to(dtype).reshape(4, N_TOKENS // 4, N_IN).requires_grad_()
    layer(x)
    saved = saved_tensors(lambda: layer(x))
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((N_TOKENS, GROUPS), dtype)]
    assert saved_activation_bytes(lambda: layer(x)) == N_TOKENS * GROUPS * dtype.itemsize


def test_weight_grad_is_the_reconstruction_formula():
    layer = _layer()
    layer(_batch(1))  # fixes v
    x, g = _batch(2), torch.randn(N_TOKENS, N_OUT, generator=torch.Generator().manual_seed(9))
    layer(x).backward(g)
    _assert_reconstruction(layer.weight.grad, x, g, layer.compressor.subtoken_vector)
    # ... which is an approximation, not g^T X (this input is not rank-1 per sub-token).
    assert relative_error(layer.weight.grad, g.double().t() @ x.double()) > 0.1


def test_exact_when_every_sub_token_lies_on_v():
    """Closed form: if every sub-token is a multiple of one direction u, v = +-u and the
    reconstruction is X itself, so the weight gradient is exact. v is chosen in float32 from
    the float32-rounded inputs, v = u/||u|| + d with ||d|| <= eps (_vector_rtol); every
    sub-token s u is then reconstructed as s (u . v) v, off by s w with the one vector
    w = (u . v) v - u, ||w|| <= 2 eps + eps^2, so the gradient's relative error is exactly
    ||w|| (each block of g^T X scales by the same u), plus float64 rounding."""
    generator = torch.Generator().manual_seed(6)
    u = torch.randn(GROUP_WIDTH, generator=generator, dtype=torch.float64)
    scales = torch.rand(N_TOKENS, GROUPS, 1, generator=generator, dtype=torch.float64) + 0.1
    x = (scales * u).reshape(N_TOKENS, N_IN)
    g = torch.randn(N_TOKENS, N_OUT, generator=generator, dtype=torch.float64)
    layer = _layer(torch.float64)
    layer(x).backward(g)
    eps = _vector_rtol(x, rounded=True)
    unit = u / u.norm()
    sign = torch.sign(layer.compressor.subtoken_vector.double() @ unit)
    assert relative_error(layer.compressor.subtoken_vector, sign * unit) <= eps
    # float64 rounding of both sides' chains (length N + GW + 2), relative to ||g^T X||.
    exact = g.t() @ x
    rounding = 2 * gamma(N_TOKENS + GROUP_WIDTH + 2, torch.float64)
    rounding *= ((g.abs().t() @ x.abs()).norm() / exact.norm()).item()
    assert relative_error(layer.weight.grad, exact) <= 2 * eps + eps**2 + rounding


def test_groups_must_divide_the_width():
    with pytest.raises(ValueError, match="groups=5 must divide the input width 32"):
        _layer(groups=5)


def test_compress_before_initialisation_is_a_clear_error():
    """Only a training-mode forward may choose v; an eval-mode forward that needs gradients
    before any training batch has nothing to project on."""
    layer = _layer().eval()
    with pytest.raises(RuntimeError, match="before its vector was initialised"):
        layer(_batch(1))


@pytest.mark.parametrize("scale", [0.1, 2.5])
def test_velora_scale_multiplies_the_reconstructed_input(scale):
    """VeLoRA's gradient scale: dW = scale * g^T X_tilde with X_tilde the rank-1 sub-token
    reconstruction (float64 closed form; float32 within its rounding bound). The bias gradient and
    the input gradient are not scaled: bit for bit those of the unscaled layer."""
    plain, scaled = _layer(bias=True), _layer(bias=True, velora_scale=scale)
    for layer in (plain, scaled):
        layer(_batch(1))  # fixes v
    x, g = _batch(2), torch.randn(N_TOKENS, N_OUT, generator=torch.Generator().manual_seed(9))
    grads = []
    for layer in (plain, scaled):
        x_leaf = x.clone().requires_grad_()
        layer(x_leaf).backward(g)
        grads.append((layer.weight.grad, layer.bias.grad, x_leaf.grad))
    v = scaled.compressor.subtoken_vector
    _assert_reconstruction(grads[1][0], x, g, v, scale)
    assert torch.equal(grads[1][1], grads[0][1]) and torch.equal(grads[1][2], grads[0][2])


@pytest.mark.parametrize("velora_scale", [0, -0.1, float("inf"), "0.1", True])
def test_bad_velora_scale_names_the_field(velora_scale):
    with pytest.raises(ValueError, match=r"CompressionConfig.velora_scale=.* must be a finite"):
        CompressionConfig(method="subtoken", velora_scale=velora_scale)


def _rank_batch(rank: int) -> torch.Tensor:
    return _batch(10 + rank, shift=1.0 + rank)


def _vector_on_rank(rank: int, world: int, opt_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compress_linears on a one-linear model; each rank's first batch differs. Returns this
    rank's vector and its own mean sub-token (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_IN, N_OUT))
    cfg = CompressionConfig(method="subtoken", groups=GROUPS)
    compress_linears(model, cfg, **({"all_reduce": None} if opt_out else {}))
    batch = _rank_batch(rank)
    model(batch)
    own_mean = batch.double().reshape(-1, GROUP_WIDTH).mean(0)
    return model[0].compressor.subtoken_vector.clone(), own_mean


def test_vector_is_averaged_over_data_parallel_ranks_by_default(tmp_path):
    """Two gloo ranks with plain data parallelism and compress_linears' default: both ranks
    hold the same vector (bit for bit: one all-reduce), the normalised mean of the two ranks'
    mean sub-tokens (equal batch sizes; float64 reference, float32 sums of 2 x 192 sub-tokens
    within _vector_rtol). With ``all_reduce=None`` each rank keeps its own."""
    (v0, mean0), (v1, mean1) = run_distributed(_vector_on_rank, 2, tmp_path, False)
    assert torch.equal(v0, v1)
    batches = [_rank_batch(rank) for rank in range(2)]
    expected = (mean0 + mean1) / 2
    assert relative_error(v0, expected / expected.norm()) <= _vector_rtol(*batches)
    assert relative_error(v0, mean0 / mean0.norm()) > 1e-2  # the ranks' batches do differ

    (own0, mean0), (own1, mean1) = run_distributed(_vector_on_rank, 2, tmp_path, True)
    assert relative_error(own0, mean0 / mean0.norm()) <= _vector_rtol(batches[0])
    assert relative_error(own1, mean1 / mean1.norm()) <= _vector_rtol(batches[1])
