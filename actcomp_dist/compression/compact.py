"""``compact``: random-projection activation compression (CompAct, arXiv 2410.15352).

Forward computes ``Y = X W^T`` exactly and saves ``Z = X P`` [N, r] with ``P`` [n, r] a seeded
random projection (``E[P P^T] = I``); ``P`` itself is never saved — it is rebuilt from the
seeds stored in the autograd context. Backward: ``G_hat = g^T Z`` [m, r], and

- ``lift`` mode returns ``dW ~= G_hat P^T``, an unbiased estimate of ``g^T X``;
- ``subspace`` mode keeps ``G_hat`` on ``weight.subspace.grad`` and lets
  :class:`actcomp_dist.optim.SubspaceAdamW` update ``W`` along ``P^T`` (moments m x r).

The projection of a layer is block-diagonal over its :class:`BlockLayout`: one block for
single-device and column-parallel layers. A row-parallel layer (input sharded along its
features over t ranks) has two layouts, ``row_parallel_projection``:

- ``dense`` (default): the single-device layer's P. Rank i holds rows ``[i*n/t, (i+1)*n/t)``
  of it and computes the partial ``Z_i = X_i P_i``; the layer sums the partials in the
  collective that sums its output (``Z = sum_i Z_i = X P``), so every rank saves the full
  ``Z`` [N, r] (its N/t tokens under sequence parallelism) and ``G_hat`` [m, r] is the same on
  every rank; rank i's weight gradient is ``G_hat P_i^T``. Rank i draws the whole n x r
  matrix and keeps its rows (a generator cannot skip ahead to a row deterministically on
  every device): n*r random numbers per rank instead of n*r/t, no activation memory.
- ``block``: block-diagonal over K = ``row_parallel_blocks`` canonical blocks whatever t, a
  rank owning K/t of them. No extra communication, r/t saved per token and rank, but only
  r/K of P's entries are non-zero.

Block ``b`` is seeded by ``projection_seed(seed, layer_id, site, b, epoch)`` with
``epoch = step // resample_every``, so every micro-batch of a step, every rank and every
recompute rebuilds the same matrix.
"""

from __future__ import annotations

import torch

from actcomp_dist.compression.base import (
    Compressed,
    Compressor,
    SavedWidth,
    parse_rank_argument,
)
from actcomp_dist.compression.layout import BlockLayout
from actcomp_dist.compression.projections import PROJECTIONS, random_projection
from actcomp_dist.compression.registry import register_compressor
from actcomp_dist.seeds import projection_seed

ROW_PARALLEL_PROJECTIONS = ("dense", "block")


@register_compressor("compact")
class CompactCompressor(Compressor):
    options = (
        "rank",
        "projection",
        "row_parallel_projection",
        "row_parallel_blocks",
        "cache_projection",
    )
    choices = {"projection": PROJECTIONS, "row_parallel_projection": ROW_PARALLEL_PROJECTIONS}
    supports_subspace = True
    ablation_option = "rank"

    def __init__(self, config, layout, layer_id, site, schedule) -> None:
        super().__init__(config, layout, layer_id, site, schedule)
        self.rank = config.resolve_rank(layout.total_width)
        self._cache_key: tuple | None = None
        self._cache: torch.Tensor | None = None

    @classmethod
    def saved_width(cls, config, layout) -> SavedWidth:
        rank = config.resolve_rank(layout.total_width)
        if any(layout.block_rank(b, rank) < 1 for b in layout.blocks):
            raise ValueError(
                f"compact rank {rank} of an input of width {layout.total_width} is smaller "
                f"than its {layout.num_blocks} projection blocks; raise CompressionConfig.rank "
                f"or lower CompressionConfig.row_parallel_blocks"
            )
        return SavedWidth(layout.local_rank(rank))  # Z = X P; P is rebuilt from the seeds

    @classmethod
    def row_parallel_layout(cls, config, width, tp_rank, tp_size) -> BlockLayout:
        cls.check_tensor_parallel(config, tp_size)
        if config.row_parallel_projection == "dense":
            return BlockLayout.dense_shard(width, tp_rank, tp_size)
        # K canonical blocks whatever the TP size: the same projection at TP = 1, 2, 4, 8.
        return BlockLayout.for_shard(width, config.row_parallel_blocks, tp_rank, tp_size)

    @classmethod
    def check_tensor_parallel(cls, config, tp_size: int) -> None:
        if config.row_parallel_projection == "block" and config.row_parallel_blocks % tp_size:
            raise ValueError(
                f"compression.row_parallel_projection='block' needs the tensor-parallel size "
                f"{tp_size} to divide compression.row_parallel_blocks="
                f"{config.row_parallel_blocks}; use a multiple of {tp_size} or "
                f"row_parallel_projection='dense'"
            )

    @classmethod
    def parse_ablation_argument(cls, text: str) -> float | int:
        return parse_rank_argument(text)

    def current_seeds(self) -> tuple[int, ...]:
        epoch = self.schedule.epoch
        cfg = self.config
        return tuple(
            projection_seed(cfg.seed, self.layer_id, self.site, b, epoch)
            for b in self.layout.blocks
        )

    def projection(
        self, seeds: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The local projection [n_local, r_local] for the given block seeds."""
        key = (seeds, device, dtype)
        if self._cache_key == key:
            return self._cache
        blocks = []
        for block, seed in zip(self.layout.blocks, seeds, strict=True):
            start, end = self.layout.block_features(block)
            rank = self.layout.block_rank(block, self.rank)
            p = random_projection(self.config.projection, end - start, rank, seed, device, dtype)
            if self.layout.partial_sum:
                first, last = self.layout.shard_rows(block)
                # A row slice of a contiguous P is itself contiguous and would keep all of P
                # alive: copy this rank's rows so the other ranks' rows are freed at once.
                p = p[first:last].clone()
            blocks.append(p)
        p = blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)
        if self.config.cache_projection:
            self._cache_key, self._cache = key, p
        return p

    def compress(self, x2d: torch.Tensor) -> Compressed:
        seeds = self.current_seeds()
        p = self.projection(seeds, x2d.device, x2d.dtype)
        return Compressed(tokens=x2d @ p, seeds=seeds)  # [N, r]

    def lift(self, ghat, basis, seeds):
        return ghat @ self.projection(seeds, ghat.device, ghat.dtype).t()  # [m, n]

    def extra_repr(self) -> str:
        if self.layout.partial_sum:
            first, last = self.layout.shard_rows(0)
            shape = f"rows=[{first}, {last}) of a dense P"
        else:
            shape = f"blocks={list(self.layout.blocks)}"
        return (
            f"{super().extra_repr()}, rank={self.rank}, projection={self.config.projection!r}, "
            f"grad_mode={self.config.grad_mode!r}, {shape}"
        )
