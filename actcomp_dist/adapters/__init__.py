"""Fine-tuning adapters (LoRA, LoRI) on our tensor-parallel linears and on plain ``nn.Linear``.

    from actcomp_dist.adapters import AdapterConfig, apply_adapters, compute_masks, ...

    apply_adapters(model, AdapterConfig(method="lori", rank=32, sparsity=0.9))
    ... dense calibration ...; compute_masks(model); start_masked_training(model)
    ... train (only the adapters' B require grad) ...
    save_adapter(model, "adapters/task1")            # B (and the mask) only: small files
    merge_adapters(model, ["task1", "task2"], {"task1": 0.5, "task2": 0.5})
    export_merged_hf(model, "hf_out", base_directory="llama-2-7b-hf")

Modules: :mod:`.base` (the adapter module, its autograd function and TP layout),
:mod:`.lora` / :mod:`.lori` (the registered methods), :mod:`.apply` (attaching adapters to a
model), :mod:`.masks` (LoRI-S global-threshold masks, continual learning), :mod:`.io` (adapter
files), :mod:`.merge` (merging into base weights, Hugging Face export). A new method is one
module with a ``@register_adapter`` class and one import line below.
"""

from actcomp_dist.adapters import lora, lori  # noqa: F401  (registers)
from actcomp_dist.adapters.apply import (
    adapter_names,
    adapter_parameter_count,
    adapters_named,
    apply_adapters,
    find_target_linears,
    iter_adapters,
    remove_adapters,
    set_adapter_enabled,
    set_adapter_multiplier,
    set_adapter_trainable,
)
from actcomp_dist.adapters.base import (
    AdapterGeometry,
    LowRankAdapter,
    adapter_seed,
    generate_A,
    geometry_of,
)
from actcomp_dist.adapters.config import AdapterConfig
from actcomp_dist.adapters.io import load_adapter, read_adapter_config, save_adapter
from actcomp_dist.adapters.masks import (
    allocate_masks,
    clear_masks,
    compute_masks,
    kth_largest,
    snapshot_B,
    start_masked_training,
)
from actcomp_dist.adapters.merge import export_merged_hf, merge_adapters, merged_deltas
from actcomp_dist.adapters.registry import (
    get_adapter_class,
    list_adapter_methods,
    register_adapter,
)

__all__ = [
    "AdapterConfig",
    "AdapterGeometry",
    "LowRankAdapter",
    "adapter_names",
    "adapter_parameter_count",
    "adapter_seed",
    "adapters_named",
    "allocate_masks",
    "apply_adapters",
    "clear_masks",
    "compute_masks",
    "export_merged_hf",
    "find_target_linears",
    "generate_A",
    "geometry_of",
    "get_adapter_class",
    "iter_adapters",
    "kth_largest",
    "list_adapter_methods",
    "load_adapter",
    "merge_adapters",
    "merged_deltas",
    "read_adapter_config",
    "register_adapter",
    "remove_adapters",
    "save_adapter",
    "set_adapter_enabled",
    "set_adapter_multiplier",
    "set_adapter_trainable",
    "snapshot_B",
    "start_masked_training",
]
