"""``lowrank`` (LoRAct online low-rank compression): exactness on low-rank inputs, error
falling with the rank on full-rank inputs, saved bytes and reproducibility; a fresh sample in
every call that an activation-checkpoint recompute replays; GEMMs in the compute dtype with the
QR in float32; ``rsvd`` within the Halko-Martinsson-Tropp error bounds.

The weight gradient it returns is ``g^T X Q Q^T`` with ``Q`` [n, k] orthonormal; when rank(X)
<= k and ``Q`` spans X's row space, ``X Q Q^T = X`` and the gradient is exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.compression.lowrank import LOWRANK_ALGORITHMS, low_rank_factors
from actcomp_dist.memory import saved_activation_bytes
from actcomp_dist.seeds import call_seed, seeded_generator
from tests.helpers.compression_reference import relative_error, saved_tensors
from tests.helpers.tolerances import UNIT_ROUNDOFF, gamma

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


def _float32_rtol(x: torch.Tensor, k: int) -> float:
    """Relative (Frobenius) tolerance of the float32 ``g^T X Q Q^T`` against the float64 one
    with the same column sample: the contractions over tokens, basis and width round within
    ``gamma_(N+k+n)``, and a float32 orthonormalisation of the range finder's ``X^T X[:, S]``
    perturbs the projector by ``u cond(X^T X[:, S]) <= u cond(X)^2``, ``cond`` over the nonzero
    singular values. Nonzero against float32's noise: ``x`` is a float32 rounding of the
    input, which by Weyl's inequality adds singular values of at most ``u ||X||_F``; twice that
    is the cut."""
    u = UNIT_ROUNDOFF[torch.float32]
    x = x.double()
    singular = torch.linalg.svdvals(x)
    nonzero = singular[singular > 2 * u * x.norm()]
    cond = (nonzero[0] / nonzero[-1]).item()
    return gamma(N_TOKENS + k + N_IN, torch.float32) + u * cond**2


@pytest.mark.parametrize("algorithm", LOWRANK_ALGORITHMS)
@pytest.mark.parametrize("power_iterations", [0, 2])
@pytest.mark.parametrize("input_rank, rank", [(4, 8), (8, 8), (3, 0.25)])
def test_exact_on_input_of_rank_at_most_r(algorithm, power_iterations, input_rank, rank):
    """Float32 compute against the float64 ``g^T X`` within _float32_rtol (the basis spans
    the row space, so only rounding is left). A basis missing a direction of the row space
    would be off by O(1)."""
    layer = _layer(rank=rank, lowrank_algorithm=algorithm, power_iterations=power_iterations)
    x = _low_rank_input(input_rank).float()
    g = _grad_out()
    exact = g.double().t() @ x.double()
    rtol = _float32_rtol(x, layer.compressor.rank)
    assert relative_error(_weight_grad(layer, x, g), exact) <= rtol


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


def _sampled_reference(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """LoRAct's sampled basis from the published recipe, in float64: the k columns a generator
    seeded with ``seed`` permutes first, ``Q = qr(X^T X[:, S])``."""
    x = x.double()
    columns = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))[:k]
    return torch.linalg.qr(x.t() @ x[:, columns]).Q  # [n, k]


def _full_rank_input(seed: int = 4) -> torch.Tensor:
    return torch.randn(N_TOKENS, N_IN, generator=torch.Generator().manual_seed(seed))


def test_a_fresh_sample_in_every_call_seeded_by_step_and_call():
    """Two calls of one step and one call of the next step draw three different samples, each
    the one ``call_seed(seed, layer, site, step, call)`` names (the call counter restarts at 0
    when the step advances). Reference: float64 ``g^T X Q Q^T`` with Q from that seed; the
    float32 result is within _float32_rtol of it, while two different samples differ by O(1)
    on a full-rank input."""
    layer = _layer(rank=8)
    x, g = _full_rank_input(), _grad_out()
    grads = []
    for step, call in [(0, 0), (0, 1), (1, 0)]:
        if step == 1 and layer.schedule.step == 0:
            layer.schedule.advance()
        grad = _weight_grad(layer, x, g).clone()
        q = _sampled_reference(x, 8, call_seed(5, layer.layer_id, layer.site, step, call))
        expected = g.double().t() @ (x.double() @ q @ q.t())
        assert relative_error(grad, expected) <= _float32_rtol(x, 8)
        grads.append(grad)
    for i in range(3):
        for j in range(i):
            assert relative_error(grads[i], grads[j]) > 0.1


def test_the_seed_is_stored_at_forward_time():
    """Backward reads the factors saved in forward: advancing the schedule (or drawing more
    samples) between forward and backward changes nothing."""
    x, g = _full_rank_input(), _grad_out()
    reference = _weight_grad(_layer(rank=8), x, g)
    layer = _layer(rank=8)
    out = layer(x.clone().requires_grad_())
    layer.schedule.advance()
    layer(x)  # another draw in between
    out.backward(g)
    assert torch.equal(layer.weight.grad, reference)


@pytest.mark.parametrize("algorithm", LOWRANK_ALGORITHMS)
def test_checkpoint_recompute_redraws_the_forward_sample(algorithm):
    """Non-reentrant ``torch.utils.checkpoint`` with the schedule's ``context_fn``: the
    recompute replays the call counter, so the gradient is bit-identical to the run without
    checkpointing (same ops on the same sample), for two checkpointed calls of one step. The
    next forward continues the counter where the forward (not the recompute) left it."""
    x, g = _full_rank_input(), _grad_out()
    plain = _layer(rank=8, lowrank_algorithm=algorithm)
    checkpointed = _layer(rank=8, lowrank_algorithm=algorithm)
    context = checkpointed.schedule.checkpoint_context
    for _ in range(2):
        expected = _weight_grad(plain, x, g)
        checkpointed.weight.grad = None
        y = checkpoint(
            checkpointed, x.clone().requires_grad_(), use_reentrant=False, context_fn=context
        )
        y.backward(g)
        assert torch.equal(checkpointed.weight.grad, expected)
    assert checkpointed.schedule.calls == plain.schedule.calls == 2

    # Without the context the recompute draws the next sample: still a LoRAct gradient, but
    # not the forward's (this is what the context is for).
    unreplayed = _layer(rank=8, lowrank_algorithm=algorithm)
    checkpoint(unreplayed, x.clone().requires_grad_(), use_reentrant=False).backward(g)
    assert relative_error(unreplayed.weight.grad, _weight_grad(_layer(rank=8), x, g)) > 1e-3


class _OpDtypes(TorchDispatchMode):
    """Records the input dtype of every product that reads a token-indexed operand (one with
    ``N_TOKENS`` rows or columns) and of every QR / SVD."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {"token_gemm": set(), "qr": set()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("mm", "addmm", "bmm") and any(N_TOKENS in t.shape for t in tensors):
            self.seen["token_gemm"].update(t.dtype for t in tensors)
        elif name in ("linalg_qr", "geqrf", "linalg_svd", "_linalg_svd"):
            self.seen["qr"].add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("algorithm", LOWRANK_ALGORITHMS)
@pytest.mark.parametrize("power_iterations", [0, 1])
def test_bf16_gemms_stay_bf16_and_the_qr_runs_in_float32(algorithm, power_iterations):
    """No bf16 activation is copied to float32 for the products (the paper's compute-dtype
    GEMMs); the QRs (and rsvd's small SVD) run in float32. (rsvd's [n, l] x [l, k] product of
    two float32 factors, which reads no activation, is not a token GEMM.)"""
    layer = _layer(torch.bfloat16, rank=8, lowrank_algorithm=algorithm)
    layer.compression = layer.compressor.config = layer.compression.replace(
        power_iterations=power_iterations
    )
    x = _full_rank_input().bfloat16().requires_grad_()
    with _OpDtypes() as ops:
        layer(x)
    assert ops.seen["token_gemm"] == {torch.bfloat16}
    assert ops.seen["qr"] == {torch.float32}


# Halko, Martinsson and Tropp (2011), "Finding structure with randomness", SIAM Review 53(2):
# bounds on the expected error of the Gaussian range finder with l = k + p columns.
HMT_TOKENS, HMT_WIDTH, HMT_RANK, HMT_OVERSAMPLING, HMT_DRAWS = 256, 64, 8, 10, 200


def _hmt_layer(**fields) -> CompressedLinear:
    config = CompressionConfig(method="lowrank", seed=5, lowrank_algorithm="rsvd", **fields)
    return CompressedLinear(HMT_WIDTH, 4, dtype=torch.float64, compression=config)


def _known_spectrum() -> tuple[torch.Tensor, torch.Tensor]:
    """A [256, 64] float64 matrix with singular values 1/j (slow decay: the bounds bite)."""
    generator = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(HMT_TOKENS, HMT_WIDTH, generator=generator).double())
    v, _ = torch.linalg.qr(torch.randn(HMT_WIDTH, HMT_WIDTH, generator=generator).double())
    singular = 1.0 / torch.arange(1, HMT_WIDTH + 1, dtype=torch.float64)
    return (u * singular) @ v.t(), singular


def _assert_mean_within(errors: list[float], bound: float) -> None:
    """The bounds are on the expectation: the sample mean of the independent draws plus four
    standard errors must stay below it (a true mean at the bound fails this with probability
    ~3e-5; the measured means sit at 20-72% of the bounds)."""
    errors_t = torch.tensor(errors, dtype=torch.float64)
    mean, sem = errors_t.mean().item(), errors_t.std().item() / math.sqrt(len(errors))
    assert mean + 4 * sem <= bound, (mean, sem, bound)


def test_rsvd_range_finder_within_the_hmt_frobenius_bound():
    """Theorem 10.5: E ||A - A Q Q^T||_F <= sqrt(1 + k/(p-1)) tau_k with tau_k^2 = sum_{j>k}
    sigma_j^2, for Q from a Gaussian test matrix of k + p columns (no truncation: rank k + p,
    oversampling 0 asks for exactly that). After truncating to rank k (what the layer saves),
    ||A - A Q_k Q_k^T||_F <= ||A - A Q Q^T||_F + tau_k (HMT section 9.3: the truncation of
    B = Q^T A^T loses at most its own tail, itself below A's), so the expectation is at most
    (1 + sqrt(1 + k/(p-1))) tau_k; and never below tau_k (Eckart-Young)."""
    a, singular = _known_spectrum()
    k, p = HMT_RANK, HMT_OVERSAMPLING
    tail = singular[k:].norm().item()
    range_finder, truncated = [], []
    layer = _hmt_layer(rank=k, oversampling=p)
    for draw in range(HMT_DRAWS):
        low, q = low_rank_factors(a, k + p, seeded_generator(draw, a.device), "rsvd", 0)
        range_finder.append((a - low @ q.t()).norm().item())
        # The layer draws afresh in every call: HMT_DRAWS independent test matrices.
        low, q = saved_tensors(lambda: layer(a.clone().requires_grad_()))
        truncated.append((a - low @ q.t()).norm().item())
    _assert_mean_within(range_finder, math.sqrt(1 + k / (p - 1)) * tail)
    _assert_mean_within(truncated, (1 + math.sqrt(1 + k / (p - 1))) * tail)
    assert min(truncated) >= tail * (1 - 1e-12)


@pytest.mark.parametrize("power_iterations", [0, 1, 2])
def test_rsvd_within_the_hmt_spectral_bound_with_power_iterations(power_iterations):
    """Corollary 10.10 (Theorem 10.6 at q = 0), spectral norm, q power iterations:
    E ||A - A Q Q^T|| <= [(1 + sqrt(k/(p-1))) sigma_{k+1}^{2q+1}
                          + e sqrt(k+p)/p (sum_{j>k} sigma_j^{2(2q+1)})^{1/2}]^{1/(2q+1)},
    plus sigma_{k+1} for the truncation to rank k (HMT eq. 9.10)."""
    a, singular = _known_spectrum()
    k, p, q = HMT_RANK, HMT_OVERSAMPLING, power_iterations
    power = 2 * q + 1
    tail = (singular[k:] ** (2 * power)).sum().sqrt().item()
    bound = (
        (1 + math.sqrt(k / (p - 1))) * singular[k].item() ** power
        + math.e * math.sqrt(k + p) / p * tail
    ) ** (1 / power) + singular[k].item()
    layer = _hmt_layer(rank=k, oversampling=p, power_iterations=q)
    errors = []
    for _ in range(HMT_DRAWS // 4):
        low, basis = saved_tensors(lambda: layer(a.clone().requires_grad_()))
        errors.append(torch.linalg.matrix_norm(a - low @ basis.t(), ord=2).item())
    _assert_mean_within(errors, bound)
    assert min(errors) >= singular[k].item() * (1 - 1e-12)  # Eckart-Young, spectral
