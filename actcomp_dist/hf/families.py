"""The Hugging Face decoder families :func:`actcomp_dist.hf.apply_memory_policy` patches.

A family is recognised by its decoder-layer class; its norm, MLP, attention and causal-LM classes
and its RoPE function are what the patches replace or call. Llama, Mistral and Qwen2 share one block
shape: pre-norm RMSNorm (``weight * normalise(x.float()).to(dtype)``), SwiGLU MLP with separate
``gate_proj`` / ``up_proj`` / ``down_proj``, grouped-query attention with separate
``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and rotate-half RoPE. Qwen2's q/k/v biases
and Mistral's sliding window change nothing the patches touch (a sliding window shorter than
the sequence arrives as an attention mask, which the 8-bit attention refuses).

Adding a family: one :func:`register_family` entry with its module path and class prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    decoder_layer: type
    norm: type
    mlp: type
    attention: type
    apply_rotary: Callable
    causal_lm: type


_FAMILY_MODULES: dict[str, tuple[str, str]] = {}


def register_family(name: str, module: str, prefix: str) -> None:
    """Family ``name`` lives in ``module`` with classes ``{prefix}DecoderLayer``,
    ``{prefix}RMSNorm``, ``{prefix}MLP``, ``{prefix}Attention``, ``{prefix}ForCausalLM`` and
    ``apply_rotary_pos_emb``."""
    _FAMILY_MODULES[name] = (module, prefix)
    supported_families.cache_clear()


@functools.cache
def supported_families() -> dict[type, Family]:
    """Decoder-layer class -> :class:`Family` (imports transformers on first use)."""
    out = {}
    for name, (module_name, prefix) in _FAMILY_MODULES.items():
        module = importlib.import_module(module_name)
        family = Family(
            name,
            getattr(module, f"{prefix}DecoderLayer"),
            getattr(module, f"{prefix}RMSNorm"),
            getattr(module, f"{prefix}MLP"),
            getattr(module, f"{prefix}Attention"),
            module.apply_rotary_pos_emb,
            getattr(module, f"{prefix}ForCausalLM"),
        )
        out[family.decoder_layer] = family
    return out


register_family("llama", "transformers.models.llama.modeling_llama", "Llama")
register_family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral")
register_family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2")


def supported_names() -> list[str]:
    return [cls.__name__ for cls in supported_families()]
