"""Canonical block layout of a layer's input features.

A row-parallel layer's input is sharded along its features, so its projection is
block-diagonal: K canonical blocks, each with its own seed, K fixed independently of the
tensor-parallel size t (K % t == 0). Rank i owns blocks [i*K/t, (i+1)*K/t) and concatenates
them; the full matrix is the same at every t, which is what makes TP invariance exact.
Single-device and column-parallel layers use one block covering the whole width.

Block ``b`` covers features ``[b*n//K, (b+1)*n//K)`` and gets rank ``(b+1)*r//K - b*r//K``:
blocks may differ in size by one, and rank-shard boundaries ``i*n/t`` land on block boundaries
whenever ``t`` divides both ``n`` and ``K``.

A *dense row shard* (:meth:`BlockLayout.dense_shard`) is the other way to shard a projection
over features: one block covering the whole width n and all r columns, of which rank i holds
rows ``[i*n/t, (i+1)*n/t)``. Its ``X_i P_i`` is then a *partial* ``Z`` [N, r] that the layer
must sum over the tensor-parallel group (``partial_sum``); the summed ``Z`` is the
single-device layer's at every t.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockLayout:
    total_width: int  # n: the full input width of the (unsharded) layer
    num_blocks: int = 1  # K
    first_block: int = 0  # first canonical block this layer (rank) owns
    end_block: int | None = None  # one past the last owned block; None = all
    row_shards: int = 1  # t of a dense row shard: the features of the single block are split
    row_shard: int = 0  # the shard (rank) this layout holds

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
        if self.row_shards > 1 and self.num_blocks != 1:
            raise ValueError("a dense row shard has one block")
        if not 0 <= self.row_shard < self.row_shards:
            raise ValueError(f"row shard {self.row_shard} is not in [0, {self.row_shards})")

    @classmethod
    def dense_shard(cls, total_width: int, rank: int, world: int) -> BlockLayout:
        """Rank ``rank``'s rows ``[rank*n/world, (rank+1)*n/world)`` of one dense block."""
        if total_width % world != 0:
            raise ValueError(
                f"an input width of {total_width} cannot be split evenly over a "
                f"tensor-parallel size of {world}"
            )
        return cls(total_width, row_shards=world, row_shard=rank)

    @property
    def partial_sum(self) -> bool:
        """Whether the compressed tokens of this layout are partial sums over the shards."""
        return self.row_shards > 1

    def shard_rows(self, block: int) -> tuple[int, int]:
        """The rows of ``block``'s projection this layout holds, relative to the block."""
        start, end = self.block_features(block)
        size = (end - start) // self.row_shards
        return self.row_shard * size, (self.row_shard + 1) * size

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
        if self.partial_sum:
            return self.total_width // self.row_shards
        return self.block_features(self.end_block - 1)[1] - self.block_features(self.first_block)[0]

    def local_rank(self, rank: int) -> int:
        return sum(self.block_rank(b, rank) for b in self.blocks)
