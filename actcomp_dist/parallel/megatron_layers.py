"""The megatron-core building blocks the models use, re-exported from one place.

Only ``actcomp_dist.parallel`` and ``actcomp_dist.training`` import megatron-core, so that a change of megatron-core version touches one package.
Everything here runs on the CPU with gloo as well as on GPUs (``use_cpu_initialization``):
the vocab-parallel embedding, the group-free steps of megatron's vocab-parallel cross-entropy
(``VocabParallelCrossEntropy``, which :mod:`actcomp_dist.parallel.cross_entropy` runs over the
model's own TP group), Megatron's own (uncompressed) column-parallel linear for the output
layer, and its ``ModelParallelConfig``. ``vocab_parallel_cross_entropy`` (megatron's loss over
its *global* TP group) is re-exported only as the reference the tests compare ours with.
"""

from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

__all__ = [
    "ColumnParallelLinear",
    "ModelParallelConfig",
    "VocabParallelCrossEntropy",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
