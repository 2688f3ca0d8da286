"""``lowrank``: online low-rank activation compression (LoRAct, Shi et al., "Memory-Efficient
Fine-Tuning via Low-Rank Activation Compression", arXiv 2509.23472).

Data-dependent and calibration-free. In every forward call, for the activation ``A`` [N, n]:

- ``sampled`` (LoRAct's sampling-based orthogonal decomposition): draw k feature columns
  ``S``, form ``Y = A^T A[:, S]`` [n, k] and orthonormalise ``Q = qr(Y)``;
- ``rsvd`` (the randomized SVD LoRAct compares against; Halko, Martinsson and Tropp 2011,
  Algorithms 4.1/4.4 and 5.1): a Gaussian test matrix ``Omega`` [N, k + p] on the token side,
  ``Y = A^T Omega``, ``Q = qr(Y)`` [n, k + p]; then the best rank-k part of ``A Q`` (the top k
  right singular vectors ``W`` of ``A Q``, from the QR of ``A Q`` and an SVD of its small R)
  gives ``Q <- Q W`` [n, k]. ``p`` is ``oversampling``.

``power_iterations`` q refines either basis by subspace iteration with re-orthonormalisation
between the products (HMT Algorithm 4.4): ``Z = qr(A Q)``, ``Q = qr(A^T Z)``. Forward saves
``L = A Q`` [N, k] and ``Q`` [n, k]; backward uses ``A ~= L Q^T``, so ``dW ~= (g^T L) Q^T`` —
exact whenever ``range(Q)`` contains the row space of ``A`` (rank(A) <= k and the sample
spans it), otherwise the error of projecting the rows of ``A`` on ``range(Q)``, never below the
best rank-k error (Eckart-Young).

**As the paper does.** The sample is drawn afresh in every call (not frozen for
``resample_every`` steps, which this method ignores); its seed is
``call_seed(seed, layer_id, site, step, call)`` with ``(step, call)`` from the model's
:class:`~actcomp_dist.seeds.CompressionSchedule`, stored at forward time with the saved
tensors, and an activation-checkpoint recompute replays the call counter
(:meth:`~actcomp_dist.seeds.CompressionSchedule.checkpoint_context`), so it redraws the very
same sample. The GEMMs run in the compute dtype (bf16 stays bf16; the Gaussian test matrix is
drawn in float32 and cast, so a seed means one matrix whatever the dtype); only the QRs and
the small SVD run in float32 (float64 for float64 inputs).

**Oversampling default p = 10.** HMT (section 4.2) recommend p = 5 or 10 for Gaussian test
matrices; their expected-error bound (Theorem 10.5) carries the factor ``sqrt(1 + k/(p-1))``,
so p = 10 more than halves the excess of p = 5 for the same k, and costs 10 more columns in
the products (under 2% of the GEMM work at k = n/8 for n >= 4096). Only k columns are saved.

The basis ``Q`` is computed from each rank's own data, so unlike ``compact`` this method is not
tensor-parallel invariant (``basis_is_shared = False``).
"""

from __future__ import annotations

import torch

from actcomp_dist.compression.base import (
    Compressed,
    Compressor,
    SavedWidth,
    parse_rank_argument,
)
from actcomp_dist.compression.registry import register_compressor
from actcomp_dist.seeds import call_seed, seeded_generator

LOWRANK_ALGORITHMS = ("sampled", "rsvd")


def _orthonormal(y: torch.Tensor, qr_dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.qr(y.to(qr_dtype)).Q


def low_rank_factors(
    a: torch.Tensor,
    k: int,
    generator: torch.Generator,
    algorithm: str = "sampled",
    oversampling: int = 0,
    power_iterations: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` [N, n] -> ``(L, Q)``: ``L = a Q`` [N, k] and ``Q`` [n, k] with orthonormal columns,
    both in ``a``'s dtype (the products in that dtype, the QRs in float32, float64 for float64
    ``a``; autocast does not apply). ``generator`` draws the column sample (``sampled``) or the
    Gaussian test matrix [N, k + oversampling] (``rsvd``); see the module doc."""
    with torch.autocast(a.device.type, enabled=False):
        return _factors(a, k, generator, algorithm, oversampling, power_iterations)


def column_draw(n: int, generator: torch.Generator) -> torch.Tensor:
    """The ``sampled`` algorithm's draw for a width-``n`` tensor: a permutation of
    ``range(n)`` (its first ``k`` are the sampled columns), drawn where ``generator`` lives
    (the global CPU generator for LoRAct's per-call draw, see storage.LowRankStorage). The
    one place the draw is made, so a caller that takes it without factorising
    (``LowRankStorage.skip``) consumes the RNG exactly as a factorisation does."""
    return torch.randperm(n, generator=generator, device=generator.device)


def _factors(a, k, generator, algorithm, oversampling, power_iterations):
    qr_dtype = torch.promote_types(a.dtype, torch.float32)
    n = a.shape[1]
    if algorithm == "sampled":
        columns = column_draw(n, generator)[:k].to(a.device)  # used on a's device
        q = _orthonormal(a.t() @ a[:, columns], qr_dtype)  # [n, k]
    elif algorithm == "rsvd":
        width = min(k + oversampling, n)
        omega = torch.randn(a.shape[0], width, generator=generator, device=a.device)  # [N, l]
        q = _orthonormal(a.t() @ omega.to(a.dtype), qr_dtype)  # [n, l]
    else:
        raise ValueError(
            f"lowrank_algorithm={algorithm!r} is not one of {list(LOWRANK_ALGORITHMS)}"
        )
    for _ in range(power_iterations):
        z = _orthonormal(a @ q.to(a.dtype), qr_dtype)  # [N, l]
        q = _orthonormal(a.t() @ z.to(a.dtype), qr_dtype)  # [n, l]
    if q.shape[1] > k:
        # Truncate to the best rank-k part of A Q: its top k right singular vectors.
        r = torch.linalg.qr((a @ q.to(a.dtype)).to(qr_dtype), mode="r").R  # [min(N, l), l]
        right = torch.linalg.svd(r, full_matrices=True).Vh[:k].t()  # [l, k]
        q = q @ right  # [n, k], still orthonormal
    q = q.to(a.dtype)
    return a @ q, q  # [N, k], [n, k]


@register_compressor("lowrank")
class LowRankCompressor(Compressor):
    options = ("rank", "lowrank_algorithm", "oversampling", "power_iterations")
    choices = {"lowrank_algorithm": LOWRANK_ALGORITHMS}
    basis_is_shared = False
    ablation_option = "rank"

    def __init__(self, config, layout, layer_id, site, schedule) -> None:
        super().__init__(config, layout, layer_id, site, schedule)
        self.rank = self.saved_width(config, layout).per_token

    @classmethod
    def saved_width(cls, config, layout) -> SavedWidth:
        # A sharded layer keeps its share of the rank, so TP does not multiply the bytes.
        rank = layout.local_rank(config.resolve_rank(layout.total_width))
        return SavedWidth(rank, layout.local_width * rank)  # L = A Q [N, k], and Q [n, k]

    @classmethod
    def parse_ablation_argument(cls, text: str) -> float | int:
        return parse_rank_argument(text)

    def compress(self, x2d: torch.Tensor) -> Compressed:
        cfg = self.config
        step, call = self.schedule.next_call()
        seed = call_seed(cfg.seed, self.layer_id, self.site, step, call)
        low, q = low_rank_factors(
            x2d,
            self.rank,
            seeded_generator(seed, x2d.device),
            cfg.lowrank_algorithm,
            cfg.oversampling,
            cfg.power_iterations,
        )
        return Compressed(tokens=low, basis=(q,), seeds=(seed,))

    def lift(self, ghat, basis, seeds):
        (q,) = basis
        return ghat @ q.t()  # [m, n]

    def extra_repr(self) -> str:
        oversampling = (
            f", oversampling={self.config.oversampling}"
            if self.config.lowrank_algorithm == "rsvd"
            else ""
        )
        return (
            f"{super().extra_repr()}, rank={self.rank}, "
            f"algorithm={self.config.lowrank_algorithm!r}{oversampling}, "
            f"power_iterations={self.config.power_iterations}"
        )
