"""``subtoken`` (VeLoRA rank-1 sub-token projection): the projection vector, its freezing and
checkpointing, saved bytes, and the weight gradient against the float64 reconstruction."""

from __future__ import annotations

import pytest
import torch
from compression_reference import relative_error, saved_tensors

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.memory import saved_activation_bytes

N_TOKENS, N_IN, N_OUT, GROUPS = 48, 32, 16, 4
GROUP_WIDTH = N_IN // GROUPS


def _layer(dtype=torch.float32, groups=GROUPS, **kwargs):
    torch.manual_seed(0)
    return CompressedLinear(
        N_IN,
        N_OUT,
        dtype=dtype,
        compression=CompressionConfig(method="subtoken", groups=groups),
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


def test_vector_is_normalised_mean_of_first_batch_then_frozen():
    layer = _layer()
    first, second = _batch(1), _batch(2, shift=-3.0)
    layer(first)
    v = layer.compressor.subtoken_vector.clone()
    assert relative_error(v, _expected_vector(first)) < 1e-6
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
    assert relative_error(layer.compressor.subtoken_vector, _expected_vector(other, mine)) < 1e-6


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
    expected = _reconstructed_weight_grad(x, g, layer.compressor.subtoken_vector)
    assert relative_error(layer.weight.grad, expected) < 1e-6
    # ... which is an approximation, not g^T X (this input is not rank-1 per sub-token).
    assert relative_error(layer.weight.grad, g.double().t() @ x.double()) > 0.1


def test_exact_when_every_sub_token_lies_on_v():
    """Closed form: if every sub-token is a multiple of one direction u, v = +-u and the
    reconstruction is X itself, so the weight gradient is exact."""
    generator = torch.Generator().manual_seed(6)
    u = torch.randn(GROUP_WIDTH, generator=generator, dtype=torch.float64)
    scales = torch.rand(N_TOKENS, GROUPS, 1, generator=generator, dtype=torch.float64) + 0.1
    x = (scales * u).reshape(N_TOKENS, N_IN)
    g = torch.randn(N_TOKENS, N_OUT, generator=generator, dtype=torch.float64)
    layer = _layer(torch.float64)
    layer(x).backward(g)
    assert relative_error(layer.weight.grad, g.t() @ x) < 1e-6  # v is stored in float32


def test_groups_must_divide_the_width():
    with pytest.raises(ValueError, match="groups=5 must divide the input width 32"):
        _layer(groups=5)


def test_compress_before_initialisation_is_a_clear_error():
    """Only a training-mode forward may choose v; an eval-mode forward that needs gradients
    before any training batch has nothing to project on."""
    layer = _layer().eval()
    with pytest.raises(RuntimeError, match="before its vector was initialised"):
        layer(_batch(1))
