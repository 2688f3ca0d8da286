"""What kind of activation each submodule of :class:`~actcomp_dist.models.LlamaModel` saves.

The memory model (:mod:`actcomp_dist.memory_model`) predicts saved bytes per kind and the
measurement (:mod:`actcomp_dist.ablation.measure`) charges every saved tensor to the innermost
module whose forward saved it; this table joins the two. It names the attributes of
:class:`~actcomp_dist.models.llama.LlamaDecoderLayer`, :class:`~actcomp_dist.models.llama.LlamaAttention`
and :class:`~actcomp_dist.models.llama.SwiGLUMLP`, so it lives beside them; a renamed submodule
changes this file too. The memory model itself never needs the names (it predicts by kind), so
the planner does not import the model package.
"""

from __future__ import annotations

#: A block's submodule (the last part of its dotted name) -> the kind the memory model predicts.
#: The linears are their site names; ``attention`` / ``mlp`` themselves save the attention core
#: and the SwiGLU product.
BLOCK_MODULE_KINDS: dict[str, str] = {
    "input_norm": "norm",
    "mlp_norm": "norm",
    "qkv": "qkv",
    "proj": "proj",
    "fc1": "fc1",
    "fc2": "fc2",
    "attention": "attention_core",
    "mlp": "swiglu",
}


def module_kind(name: str) -> str:
    """The kind of a dotted module name of :class:`~actcomp_dist.models.LlamaModel`:
    ``layers.3.attention.qkv`` -> ``qkv``, ``layers.3`` -> ``block_input`` (what checkpointing
    keeps), ``""`` -> ``loss`` (the cross-entropy runs in the model's own forward); modules
    outside the blocks are their own kind (``output_layer``, ``final_norm``, ``embedding``)."""
    parts = name.split(".") if name else []
    if not parts:
        return "loss"
    if parts[0] == "layers" and len(parts) >= 2:
        rest = parts[2:]
        if not rest:
            return "block_input"
        return BLOCK_MODULE_KINDS.get(rest[-1], rest[-1])
    return parts[0]


#: The learning-rate groups of ``train.lr_scale`` (besides ``default``): the four linear sites,
#: and the parameters outside them.
LR_GROUP_OF_KIND: dict[str, str] = {
    "qkv": "qkv",
    "proj": "proj",
    "fc1": "fc1",
    "fc2": "fc2",
    "embedding": "embedding",
    "norm": "norm",
    "final_norm": "norm",
    "output_layer": "output",
}


def parameter_group(name: str) -> str:
    """The ``train.lr_scale`` group of a dotted parameter name of
    :class:`~actcomp_dist.models.LlamaModel`: the group of the module that holds it
    (``layers.3.attention.qkv.weight`` -> ``qkv``, ``layers.3.input_norm.weight`` and
    ``final_norm.weight`` -> ``norm``, ``embedding.weight`` -> ``embedding``,
    ``output_layer.weight`` -> ``output``); any other parameter (an adapter's, a plugin
    module's) -> ``default``. A tied output layer shares ``embedding.weight``: ``embedding``."""
    return LR_GROUP_OF_KIND.get(module_kind(name.rpartition(".")[0]), "default")
