"""``lowrank``: online low-rank activation compression (LoRAct, arXiv 2509.23472).

Data-dependent and calibration-free: for each saved activation ``A`` [N, n] pick k feature
columns ``S`` with a seeded generator, form ``Y = A^T A[:, S]`` [n, k], orthonormalise
``Q = qr(Y)`` in float32 (float64 for float64 inputs), optionally refine with power
iterations ``Y <- A^T (A Q)``, and save ``L = A Q`` [N, k] and ``Q`` [n, k]. Backward uses
``A ~= L Q^T``, so ``dW ~= (g^T L) Q^T`` — exact whenever rank(A) <= k (``range(Q)`` then
contains the row space of ``A``), and otherwise the error of the best rank-k row-space
projection plus sampling error.

``lowrank_algorithm="rsvd"`` replaces the sampled columns by a Gaussian test matrix
(Halko-Martinsson-Tropp randomized range finder), the baseline LoRAct compares against.

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
from actcomp_dist.seeds import projection_seed, seeded_generator

LOWRANK_ALGORITHMS = ("sampled", "rsvd")


@register_compressor("lowrank")
class LowRankCompressor(Compressor):
    options = ("rank", "lowrank_algorithm", "power_iterations")
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
        seed = projection_seed(
            cfg.seed, self.layer_id, self.site, self.layout.first_block, self.schedule.epoch
        )
        generator = seeded_generator(seed, x2d.device)
        # At least float32 (bf16 Gram matrices lose the small directions); float64 stays float64.
        a = x2d.to(torch.promote_types(x2d.dtype, torch.float32))  # [N, n]
        n, k = a.shape[1], self.rank
        if cfg.lowrank_algorithm == "sampled":
            columns = torch.randperm(n, generator=generator, device=x2d.device)[:k]
            y = a.t() @ a[:, columns]  # [n, k]
        else:
            # Drawn in float32 whatever the compute dtype, so a seed means one test matrix.
            omega = torch.randn(n, k, generator=generator, device=x2d.device).to(a.dtype)
            y = a.t() @ (a @ omega)  # [n, k]
        q = torch.linalg.qr(y).Q
        for _ in range(cfg.power_iterations):
            q = torch.linalg.qr(a.t() @ (a @ q)).Q
        low = a @ q  # [N, k]
        return Compressed(tokens=low.to(x2d.dtype), basis=(q.to(x2d.dtype),), seeds=(seed,))

    def lift(self, ghat, basis, seeds):
        (q,) = basis
        return ghat @ q.t()  # [m, n]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, "
            f"algorithm={self.config.lowrank_algorithm!r}, "
            f"power_iterations={self.config.power_iterations}"
        )
