"""Megatron-core tensor/sequence-parallel layers, process-group state and DeepSpeed glue.

Only this package and ``actcomp_dist.training`` import megatron-core or DeepSpeed.
"""

from actcomp_dist.parallel.linear import (
    CompressedColumnParallelLinear,
    CompressedRowParallelLinear,
)

__all__ = ["CompressedColumnParallelLinear", "CompressedRowParallelLinear"]
