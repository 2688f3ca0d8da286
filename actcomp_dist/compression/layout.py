"""Canonical block layout of a layer's input features.

A row-parallel layer's input is sharded along its features, so its projection is
block-diagonal: K canonical blocks, each with its own seed, K fixed independently of the
tensor-parallel size t (K % t == 0). Rank i owns blocks [i*K/t, (i+1)*K/t) and concatenates
them; the full matrix is the same at every t, which is what makes TP invariance exact.
Single-device and column-parallel layers use one block covering the whole width.

Block ``b`` covers features ``[b*n//K, (b+1)*n//K)`` and gets rank ``(b+1)*r//K - b*r//K``:
blocks may differ in size by one, and rank-shard boundaries ``i*n/t`` land on block boundaries
whenever ``t`` divides both ``n`` and ``K``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockLayout:
    total_width: int  # n: the full input width of the (unsharded) layer
    num_blocks: int = 1  # K
    first_block: int = 0  # first canonical block this layer (rank) owns
    end_block: int | None = None  # one past the last owned block; None = all

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.num_blocks > self.total_width:
            raise ValueError(
                f"the number of projection blocks must be in [1, {self.total_width}] for an "
                f"input width of {self.total_width}, got {self.num_blocks}"
            )
        if self.end_block is None:
            object.__setattr__(self, "end_block", self.num_blocks)
        if not 0 <= self.first_block < self.end_block <= self.num_blocks:
            raise ValueError(f"invalid owned block range [{self.first_block}, {self.end_block})")

    @classmethod
    def for_shard(cls, total_width: int, num_blocks: int, rank: int, world: int) -> BlockLayout:
        """The blocks owned by ``rank`` of ``world`` when the width is sharded evenly."""
        if num_blocks % world != 0:
            raise ValueError(
                f"row_parallel_blocks={num_blocks} must be divisible by the tensor-parallel "
                f"size {world}"
            )
        per_rank = num_blocks // world
        return cls(total_width, num_blocks, rank * per_rank, (rank + 1) * per_rank)

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.end_block)

    def block_features(self, block: int) -> tuple[int, int]:
        n, k = self.total_width, self.num_blocks
        return block * n // k, (block + 1) * n // k

    def block_rank(self, block: int, rank: int) -> int:
        k = self.num_blocks
        return (block + 1) * rank // k - block * rank // k

    @property
    def local_width(self) -> int:
        return self.block_features(self.end_block - 1)[1] - self.block_features(self.first_block)[0]

    def local_rank(self, rank: int) -> int:
        return sum(self.block_rank(b, rank) for b in self.blocks)
