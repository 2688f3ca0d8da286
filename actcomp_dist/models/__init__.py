"""The LLaMA model: configs, the tensor-parallel model, weight mapping and a megatron-core spec.

    from actcomp_dist.models import build_llama, get_model_config
    model = build_llama("tiny", CompressionConfig(method="compact", rank=0.25))
    loss = model.loss(tokens, labels)

The model needs megatron-core's parallel state
(:func:`actcomp_dist.parallel.state.initialize_model_parallel`) before it is built.
"""

from actcomp_dist.models.configs import (
    MODEL_CONFIGS,
    LlamaConfig,
    check_tensor_parallel,
    get_model_config,
    list_model_configs,
    parameter_count,
)
from actcomp_dist.models.kinds import module_kind
from actcomp_dist.models.llama import (
    SITES,
    LlamaDecoderLayer,
    LlamaLayerSpec,
    LlamaModel,
    build_llama,
)
from actcomp_dist.models.weights import (
    full_state_dict,
    gather_full,
    load_full_weights,
    merge_shards,
    shard_full_state_dict,
)

__all__ = [
    "MODEL_CONFIGS",
    "SITES",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaLayerSpec",
    "LlamaModel",
    "build_llama",
    "check_tensor_parallel",
    "full_state_dict",
    "gather_full",
    "get_model_config",
    "list_model_configs",
    "load_full_weights",
    "merge_shards",
    "module_kind",
    "parameter_count",
    "shard_full_state_dict",
]
