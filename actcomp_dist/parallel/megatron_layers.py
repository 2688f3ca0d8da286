"""The megatron-core building blocks the models use, re-exported from one place.

Only ``actcomp_dist.parallel`` and ``actcomp_dist.training`` import megatron-core, so that a change of megatron-core version touches one package.
Everything here runs on the CPU with gloo as well as on GPUs (``use_cpu_initialization``):
the vocab-parallel embedding and cross-entropy, Megatron's own (uncompressed) column-parallel
linear for the output layer, and its ``ModelParallelConfig``.
"""

from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "ModelParallelConfig",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
