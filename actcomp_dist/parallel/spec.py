"""A megatron-core ``ModuleSpec`` that puts the compressed layers into megatron's ``GPTModel``.

    from megatron.core.models.gpt import GPTModel
    spec = get_compressed_gpt_layer_spec(CompressionConfig(method="compact", rank=0.25))
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=..., ...)
    schedule = actcomp_dist.find_schedule(model)   # advance once per optimizer step

It is megatron-core's own local spec (``get_gpt_layer_local_spec``) with the linears of the
compressed sites swapped: ``linear_qkv`` (site ``qkv``) and ``linear_fc1`` (``fc1``) become
:class:`~actcomp_dist.parallel.CompressedColumnParallelLinear`, ``linear_proj`` (``proj``) and
``linear_fc2`` (``fc2``) :class:`~actcomp_dist.parallel.CompressedRowParallelLinear`. Sites not
in ``compression.sites`` keep megatron's ``ColumnParallelLinear`` / ``RowParallelLinear``.

**Layer ids.** A compressed layer needs its global layer index (part of every projection seed,
see actcomp_dist.seeds), but megatron passes ``layer_number`` only to the ``TransformerLayer``;
its linears get ``(input_size, output_size, config=, init_method=, bias=, gather_output= /
input_is_parallel=, skip_bias_add=, is_expert=, tp_comm_buffer_name=, tp_group=[, stride=])``.
So the spec's layer class is :class:`CompressedTransformerLayer`, a ``TransformerLayer`` that,
before building its submodules, computes its global layer number exactly as megatron does
(``layer_number + get_transformer_layer_offset(...)``, so pipeline stages agree) and binds
``layer_id = layer_number - 1``, the site name, the compression config and the model-wide
schedule into ``ModuleSpec.params`` of a private copy of its linear specs. With the same
weights, layer ``i`` of ``GPTModel`` therefore draws the same projections as
``LlamaModel.layers[i]``.

Megatron's fused layouts match ours (:mod:`actcomp_dist.models.llama`): its QKV rows are
``[q heads of group g | k_g | v_g]`` per group and its gated FC1 uses ``stride=2``
(``[gate_i; up_i]`` per rank).

**Memory-efficient block ops** (``LlamaModel(efficient_ops=True)``) are not part of this spec:
megatron's ``TransformerLayer`` calls its own norm, core attention and MLP activation, whose
saved tensors are megatron's (its ``memory_efficient_layer_norm`` option with apex and
``TransformerConfig.recompute_granularity`` are megatron's own levers). The compressed linears
here behave as in the naive LLaMA block: a row-parallel FC2 gets its input as a tensor.

On a GPU this is ordinary megatron-core. On CPU, ``GPTModel`` needs megatron's CUDA RNG
tracker and ``torch.cuda.current_device()`` pointed at the CPU and an explicit causal attention
mask (its default mask is allocated on ``"cuda"``); the tests do that with test-only shims; the
product never patches megatron.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from actcomp_dist.config import TRANSFORMER_SITES as SITES
from actcomp_dist.config import CompressionConfig
from actcomp_dist.parallel.linear import CompressedColumnParallelLinear, CompressedRowParallelLinear
from actcomp_dist.seeds import CompressionSchedule

# site -> (submodule that holds the linear, its field, the compressed class)
_SLOTS = {
    "qkv": ("self_attention", "linear_qkv", CompressedColumnParallelLinear),
    "proj": ("self_attention", "linear_proj", CompressedRowParallelLinear),
    "fc1": ("mlp", "linear_fc1", CompressedColumnParallelLinear),
    "fc2": ("mlp", "linear_fc2", CompressedRowParallelLinear),
}


class CompressedTransformerLayer(TransformerLayer):
    """megatron-core ``TransformerLayer`` whose compressed linears know their layer id.

    Same constructor as ``TransformerLayer`` plus ``compression`` and ``schedule`` (given by
    the spec's params).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        *,
        compression: CompressionConfig,
        schedule: CompressionSchedule,
    ) -> None:
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        global_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pg_rank(pg_collection.pp)
        )
        submodules = _bind_layer(submodules, compression, schedule, layer_id=global_number - 1)
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        assert self.layer_number == global_number, (self.layer_number, global_number)


def _bind_layer(
    submodules: TransformerLayerSubmodules,
    compression: CompressionConfig,
    schedule: CompressionSchedule,
    layer_id: int,
) -> TransformerLayerSubmodules:
    """A copy of ``submodules`` whose compressed linears carry this layer's parameters (the
    spec shared by all layers is never modified)."""
    changes: dict[str, dict[str, ModuleSpec]] = {}
    for site, (parent, field, cls) in _SLOTS.items():
        if site in compression.sites:
            params = dict(compression=compression, layer_id=layer_id, site=site, schedule=schedule)
            changes.setdefault(parent, {})[field] = ModuleSpec(module=cls, params=params)
    replaced = {}
    for parent, fields in changes.items():
        spec = getattr(submodules, parent)
        replaced[parent] = dataclasses.replace(
            spec, submodules=dataclasses.replace(spec.submodules, **fields)
        )
    return dataclasses.replace(submodules, **replaced)


def get_compressed_gpt_layer_spec(
    compression: CompressionConfig,
    schedule: CompressionSchedule | None = None,
    *,
    qk_layernorm: bool = False,
    normalization: str = "RMSNorm",
) -> ModuleSpec:
    """megatron-core's local GPT layer spec with the compressed sites' linears swapped in.

    Args:
        compression: method and sites (``qkv``, ``proj``, ``fc1``, ``fc2``).
        schedule: the step counter shared by every compressed layer of the model; a new one
            when omitted (find it on the built model with ``actcomp_dist.find_schedule``).
        qk_layernorm, normalization: passed to ``get_gpt_layer_local_spec``.
    """
    unknown = sorted(set(compression.sites) - set(SITES))
    if unknown:
        raise ValueError(
            f"CompressionConfig.sites has unknown site(s) {unknown}; a GPT layer's sites are "
            f"{list(SITES)}"
        )
    base = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    return ModuleSpec(
        module=CompressedTransformerLayer,
        params=dict(
            compression=compression,
            schedule=schedule or CompressionSchedule(compression.resample_every),
        ),
        submodules=base.submodules,
    )


_GPT_MODEL_NAMES = {
    "embedding.weight": "embedding.word_embeddings.weight",
    "final_norm.weight": "decoder.final_layernorm.weight",
    "output_layer.weight": "output_layer.weight",
}
_GPT_MODEL_BLOCK_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "attention.qkv.weight": "self_attention.linear_qkv.weight",
    "attention.proj.weight": "self_attention.linear_proj.weight",
    "mlp_norm.weight": "pre_mlp_layernorm.weight",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
}


def gpt_model_parameter_name(name: str) -> str:
    """The name in megatron-core's ``GPTModel`` (this spec, or the local spec, with
    ``normalization="RMSNorm"``, ``gated_linear_unit=True``, no biases) of the ``LlamaModel``
    parameter ``name``. Both models use the same fused layouts, so a tensor-parallel shard
    moves between them unchanged."""
    if name in _GPT_MODEL_NAMES:
        return _GPT_MODEL_NAMES[name]
    prefix, _, index_and_rest = name.partition("layers.")
    index, _, rest = index_and_rest.partition(".")
    if prefix or not index.isdigit() or rest not in _GPT_MODEL_BLOCK_NAMES:
        raise ValueError(f"{name!r} is not a LlamaModel parameter name")
    return f"decoder.layers.{index}.{_GPT_MODEL_BLOCK_NAMES[rest]}"
