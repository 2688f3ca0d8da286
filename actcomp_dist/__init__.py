"""actcomp_dist: compressed activations for LLM training in Megatron-core and DeepSpeed.

Public API (stable):

    from actcomp_dist import CompressionConfig, CompressedLinear, compress_linears, list_compressors
    from actcomp_dist.memory import saved_activation_bytes
    from actcomp_dist.optim import SubspaceAdamW
"""

from actcomp_dist.compression import list_compressors, register_compressor
from actcomp_dist.config import CompressionConfig
from actcomp_dist.layers import CompressedLinear, SumOverRanks, compress_linears, find_schedule
from actcomp_dist.seeds import CompressionSchedule, projection_seed

__version__ = "0.1.0"

__all__ = [
    "CompressedLinear",
    "CompressionConfig",
    "CompressionSchedule",
    "SumOverRanks",
    "compress_linears",
    "find_schedule",
    "list_compressors",
    "projection_seed",
    "register_compressor",
]
