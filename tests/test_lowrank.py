"""``lowrank`` (LoRAct online low-rank compression): exactness on low-rank inputs, error
falling with the rank on full-rank inputs, saved bytes and reproducibility.

The weight gradient it returns is ``g^T X Q Q^T`` with ``Q`` [n, k] orthonormal; when rank(X)
<= k and ``Q`` spans X's row space, ``X Q Q^T = X`` and the gradient is exact.
"""

from __future__ import annotations

import pytest
import torch
from compression_reference import relative_error, saved_tensors

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.compression.lowrank import LOWRANK_ALGORITHMS
from actcomp_dist.memory import saved_activation_bytes

N_TOKENS, N_IN, N_OUT = 96, 32, 16


def _layer(dtype=torch.float32, **fields):
    fields = {"method": "lowrank", "seed": 5, **fields}
    torch.manual_seed(0)
    return CompressedLinear(N_IN, N_OUT, dtype=dtype, compression=CompressionConfig(**fields))


def _weight_grad(layer, x, g):
    layer.weight.grad = None
    layer(x.clone().requires_grad_()).backward(g)
    return layer.weight.grad


def _low_rank_input(rank: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(N_TOKENS, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, N_IN, generator=generator, dtype=torch.float64)
    return left @ right / rank**0.5  # [N, n] of rank exactly `rank`


def _grad_out(seed: int = 2) -> torch.Tensor:
    return torch.randn(N_TOKENS, N_OUT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("algorithm", LOWRANK_ALGORITHMS)
@pytest.mark.parametrize("power_iterations", [0, 2])
@pytest.mark.parametrize("input_rank, rank", [(4, 8), (8, 8), (3, 0.25)])
def test_exact_on_input_of_rank_at_most_r(algorithm, power_iterations, input_rank, rank):
    """Float32 compute; the tolerance 1e-5 is ~80 float32 epsilons (measured: <= 1e-6), room
    for the squared conditioning of A^T A in the range finder. A basis missing a direction
    of the row space would be off by O(1)."""
    layer = _layer(rank=rank, lowrank_algorithm=algorithm, power_iterations=power_iterations)
    x = _low_rank_input(input_rank).float()
    g = _grad_out()
    exact = g.double().t() @ x.double()
    assert relative_error(_weight_grad(layer, x, g), exact) < 1e-5


@pytest.mark.parametrize("algorithm", LOWRANK_ALGORITHMS)
@pytest.mark.parametrize("power_iterations", [0, 1])
def test_error_falls_as_rank_grows_on_full_rank_input(algorithm, power_iterations):
    """Input with a decaying spectrum (singular values 0.8^i, full rank). The relative error
    of the weight gradient must fall strictly with r, stay above the best possible rank-r
    error of the activation (Eckart-Young; the gradient is g^T X, so we compare with the
    error of X itself, an honest scale), and vanish at r = n where Q is square orthogonal."""
    generator = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(N_TOKENS, N_IN, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N_IN, N_IN, generator=generator, dtype=torch.float64))
    singular = 0.8 ** torch.arange(N_IN, dtype=torch.float64)
    x = (u * singular) @ v.t()
    g = _grad_out()
    exact = g.double().t() @ x

    errors = []
    for rank in (4, 8, 16, 32):
        layer = _layer(
            torch.float64, rank=rank, lowrank_algorithm=algorithm, power_iterations=power_iterations
        )
        grad = _weight_grad(layer, x, g.double())
        errors.append(relative_error(grad, exact))
        # The reconstruction error of X itself is at least the best rank-r error.
        (low, q) = saved_tensors(lambda layer=layer: layer(x.clone().requires_grad_()))
        best = singular[rank:].norm() / singular.norm()
        assert relative_error(low @ q.t(), x) >= best.item() * (1 - 1e-9)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank, k", [(0.25, 8), (5, 5)])
def test_saved_bytes(dtype, rank, k):
    """L = X Q [N, k] and Q [n, k], both in the compute dtype: (N k + n k) * itemsize."""
    layer = _layer(dtype, rank=rank)
    x = torch.randn(4, N_TOKENS // 4, N_IN, dtype=dtype, requires_grad=True)
    saved = saved_tensors(lambda: layer(x))
    assert sorted(tuple(t.shape) for t in saved) == sorted([(N_TOKENS, k), (N_IN, k)])
    assert all(t.dtype == dtype for t in saved)
    assert saved_activation_bytes(lambda: layer(x)) == (N_TOKENS * k + N_IN * k) * dtype.itemsize


@pytest.mark.parametrize("algorithm", LOWRANK_ALGORITHMS)
def test_reproducible_with_the_same_seed(algorithm):
    """Sampling uses a generator seeded by the pure seed function: the same seed and step
    give the same gradient bit for bit; another seed gives another (approximate) gradient."""
    x = torch.randn(N_TOKENS, N_IN, generator=torch.Generator().manual_seed(4))
    g = _grad_out()
    first = _weight_grad(_layer(rank=8, lowrank_algorithm=algorithm), x, g)
    second = _weight_grad(_layer(rank=8, lowrank_algorithm=algorithm), x, g)
    other_seed = _weight_grad(_layer(rank=8, lowrank_algorithm=algorithm, seed=6), x, g)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other_seed, atol=1e-3)
