"""``apply_memory_policy``: the storage policies of :mod:`actcomp_dist.storage` on a Hugging Face
decoder, patched in place.

What each kind's policy does to a Llama / Mistral / Qwen2 block (see :mod:`.families`):

- ``norm`` (every RMSNorm of the family, the final one too): ``keep`` runs
  :func:`actcomp_dist.models.efficient_ops.rms_norm`, which keeps the norm's output ``y`` and the
  fp32 per-token ``rstd`` and nothing else; the next projections (or PEFT LoRA's A) keep ``y``
  as their input, the same storage. Hugging Face's norm keeps the input, the normalised tensor
  and ``rstd`` besides (two more hidden-sized tensors per norm). Forward is bit-identical;
  backward is the closed form in ``efficient_ops`` (equal to autograd to rounding). A norm
  weight that is exactly zero makes that norm's gradients NaN (``x_hat = y / weight``).
- ``swiglu``: the MLP keeps ``gate`` and ``up`` only (``keep``), or both packed in 8 bits
  (``int8``, ``fp8``), and recomputes ``silu(gate) * up`` in backward (:mod:`.ops`); Hugging
  Face keeps ``gate``, ``silu(gate)``, ``up`` and the product. Needs ``hidden_act="silu"``.
- ``attention``: ``keep`` leaves Hugging Face's attention as it is (with SDPA and no padding
  mask it keeps q, k after RoPE, v, the output and the log-sum-exp: no alias of a projection
  output). ``int8`` / ``fp8`` keep q, k, v packed and re-run SDPA in backward
  (:func:`actcomp_dist.storage.attention_with_stored_inputs`); causal attention without a
  padding mask only (a batch with padding raises), no attention dropout.
- ``block_input`` is HF gradient checkpointing's business; the linear sites (``qkv``, ``proj``,
  ``fc1``, ``fc2``) are compressed through ``compression=``: both must stay ``keep``.

``compression`` (a :class:`~actcomp_dist.config.CompressionConfig`) swaps the trainable
``nn.Linear`` inputs of q/k/v, gate/up and down (or, under PEFT, their LoRA A) for
:class:`~actcomp_dist.layers.CompressedLinear` (:func:`~actcomp_dist.layers.compress_linears`;
``o_proj`` and LoRA B stay exact: B's input ``A x`` is already r wide). A frozen base layer
keeps nothing for its weight either way. Compressing the input of a projection that follows a
``keep`` norm removes nothing: the norm keeps the same tensor.

Order: apply after the model is built (or loaded) and after or before PEFT's
``get_peft_model``; before HF gradient checkpointing or not, either order works; before
wrapping by DeepSpeed / DDP / FSDP. Patching swaps the modules' classes for subclasses (state
dict, parameters and ``isinstance`` checks unchanged); applying again re-patches from the
original classes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf.families import Family, supported_families, supported_names
from actcomp_dist.hf.ops import swiglu, swiglu_linear, swiglu_then
from actcomp_dist.layers import CompressedLinear, compress_linears
from actcomp_dist.models.efficient_ops import rms_norm
from actcomp_dist.storage import KINDS, Quantizer, StoragePolicy, attention_with_stored_inputs

#: Named policies (``apply_memory_policy(model, "exact")``).
PRESETS: dict[str, dict[str, str]] = {
    "exact": {},
}
#: The kinds this package patches; the others must stay ``keep`` (see the module doc).
HF_KINDS = ("norm", "attention", "swiglu")
#: Linear leaves whose inputs ``compression=`` compresses.
COMPRESSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def resolve_policy(policy: str | Mapping[str, Any] | StoragePolicy) -> StoragePolicy:
    """A preset name, a ``memory.policy`` mapping or a :class:`StoragePolicy`, checked for
    what this package serves; raises ``ValueError`` naming the field and the valid values."""
    if isinstance(policy, str):
        if policy not in PRESETS:
            raise ValueError(
                f"apply_memory_policy: unknown preset {policy!r}; presets: {sorted(PRESETS)} "
                f"or a memory.policy mapping of kinds {list(HF_KINDS)}"
            )
        policy = PRESETS[policy]
    if isinstance(policy, Mapping):
        policy = StoragePolicy.from_mapping(policy)
    if not isinstance(policy, StoragePolicy):
        raise TypeError(
            f"apply_memory_policy: policy must be a preset name, a mapping or a StoragePolicy, "
            f"not {type(policy).__name__}"
        )
    for kind in KINDS:
        value = getattr(policy, kind)
        if kind not in HF_KINDS and value != "keep":
            raise ValueError(
                f"memory.policy.{kind}={value!r} is not served on Hugging Face models (block "
                f"inputs follow HF gradient checkpointing, linear sites are compressed through "
                f"compression=); kinds served: {list(HF_KINDS)}"
            )
    return policy


# -- the patched classes -------------------------------------------------------------------------


class _EfficientRMSNorm:
    """RMSNorm keeping its output and ``rstd`` (``actcomp_dist.models.efficient_ops``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _keeps_no_input(module: nn.Module) -> bool:
    """Whether ``module``'s backward needs nothing of its input: a frozen linear, a compressing
    ``CompressedLinear``, or a PEFT LoRA layer made of those with no dropout or variant."""
    if isinstance(module, CompressedLinear):
        return not module.weight.requires_grad or not module.compressor.is_identity
    if type(module) is nn.Linear:
        return not module.weight.requires_grad
    lora_a = getattr(module, "lora_A", None)
    base = getattr(module, "base_layer", None)
    if lora_a is None or base is None or getattr(module, "merged", False):
        return False
    active = [name for name in module.active_adapters if name in lora_a]
    return _keeps_no_input(base) and all(
        _keeps_no_input(lora_a[name])
        and isinstance(module.lora_dropout[name], nn.Identity)
        and name not in getattr(module, "lora_variant", {})
        for name in active
    )


class _SwiGLUMLP:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` keeping ``gate`` and ``up`` only."""

    _actcomp_swiglu: Quantizer | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [b, s, intermediate] each
        down, storage = self.down_proj, self._actcomp_swiglu
        if type(down) is nn.Linear and down.weight.requires_grad:
            return swiglu_linear(gate, up, down.weight, down.bias, storage)
        if _keeps_no_input(down):
            return down(swiglu(gate, up, storage))
        return swiglu_then(down, gate, up, storage)


class _StoredInputsAttention:
    """Attention keeping q, k, v packed in 8 bits (see the module doc)."""

    _actcomp_attention: Quantizer
    _actcomp_apply_rotary: Any

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        if not torch.is_grad_enabled():
            return super().forward(
                hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
            )
        if attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} (attention={self._actcomp_attention.name}): 8-bit "
                "attention serves causal attention without an attention mask (no padding, no "
                "sliding window shorter than the sequence); pack sequences without padding or "
                "use attention='keep'"
            )
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, heads, s, d]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, groups, s, d]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, groups, s, d]
        cos, sin = position_embeddings
        q, k = self._actcomp_apply_rotary(q, k, cos, sin)
        if past_key_values is not None:  # use_cache=True while training: an empty cache
            k, v = past_key_values.update(k, v, self.layer_idx)
            if k.shape[2] != q.shape[2]:
                raise ValueError(
                    f"{type(self).__name__}: 8-bit attention does not train on a KV cache prefix"
                )
        out = attention_with_stored_inputs(
            q, k, v, self._actcomp_attention, self.num_key_value_groups > 1
        )  # [b, heads, s, d]
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


@functools.cache
def _patched_class(base: type, mixin: type) -> type:
    return type(base.__name__, (mixin, base), {"_actcomp_base": base, "__module__": __name__})


def _original(cls: type) -> type:
    return getattr(cls, "_actcomp_base", cls)


# -- apply ---------------------------------------------------------------------------------------


def _find_family(model: nn.Module) -> Family:
    families = supported_families()
    found: dict[type, Family] = {}
    for name, module in model.named_modules():
        cls = _original(type(module))
        if cls in families:
            found[cls] = families[cls]
        elif cls.__name__.endswith("DecoderLayer"):
            raise ValueError(
                f"apply_memory_policy: {name} is a {cls.__name__}, not a supported decoder "
                f"layer; supported: {supported_names()}"
            )
    if not found:
        raise ValueError(
            f"apply_memory_policy: {type(model).__name__} has no supported decoder layer; "
            f"supported: {supported_names()}"
        )
    if len(found) > 1:
        raise ValueError(
            f"apply_memory_policy: {type(model).__name__} mixes decoder layers "
            f"{sorted(c.__name__ for c in found)}; one family per model"
        )
    return next(iter(found.values()))


def _check_mlp(name: str, mlp: nn.Module) -> None:
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    if act not in ("silu", "swish"):
        raise ValueError(
            f"apply_memory_policy: {name} ({type(mlp).__name__}) has hidden_act={act!r}; the "
            "swiglu policy serves silu (SwiGLU) MLPs only"
        )


def _check_attention(name: str, attention: nn.Module, policy: StoragePolicy) -> None:
    if policy.attention != "keep" and getattr(attention, "attention_dropout", 0.0):
        raise ValueError(
            f"apply_memory_policy: {name} has attention_dropout="
            f"{attention.attention_dropout}; memory.policy.attention={policy.attention!r} "
            "serves attention without dropout (use 'keep')"
        )


def _compression_targets(model: nn.Module, family: Family) -> list[str]:
    """Full names of the trainable ``nn.Linear`` that read the input of a compressed projection
    (the projection itself, or its PEFT LoRA A)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not module.weight.requires_grad:
            continue
        parts = name.split(".")
        plain = parts[-1] in COMPRESSED_PROJECTIONS
        lora_a = len(parts) >= 3 and parts[-2] == "lora_A" and parts[-3] in COMPRESSED_PROJECTIONS
        if plain or lora_a:
            names.append(name)
    return names


def apply_memory_policy(
    model: nn.Module,
    policy: str | Mapping[str, Any] | StoragePolicy = "exact",
    compression: CompressionConfig | None = None,
) -> nn.Module:
    """Patch ``model`` (a transformers Llama / Mistral / Qwen2 model, PEFT-wrapped or not) in
    place so each kind of saved tensor follows ``policy`` (see the module doc); returns it.

    Everything is validated before anything is patched: an unsupported model, a policy a
    module cannot take, or a bad preset raises ``ValueError`` and leaves ``model`` untouched.
    """
    policy = resolve_policy(policy)
    family = _find_family(model)
    modules = list(model.named_modules())
    norms = [(n, m) for n, m in modules if _original(type(m)) is family.norm]
    mlps = [(n, m) for n, m in modules if _original(type(m)) is family.mlp]
    attentions = [(n, m) for n, m in modules if _original(type(m)) is family.attention]
    for name, mlp in mlps:
        _check_mlp(name, mlp)
    for name, attention in attentions:
        _check_attention(name, attention, policy)
    targets = _compression_targets(model, family) if compression is not None else []
    if compression is not None and not targets:
        raise ValueError(
            f"apply_memory_policy: compression={compression.method!r} but no trainable "
            f"nn.Linear among {list(COMPRESSED_PROJECTIONS)} (or their PEFT lora_A)"
        )

    for _, norm in norms:
        norm.__class__ = _patched_class(family.norm, _EfficientRMSNorm)
    for _, mlp in mlps:
        mlp.__class__ = _patched_class(family.mlp, _SwiGLUMLP)
        mlp._actcomp_swiglu = policy.quantizer("swiglu")
    for _, attention in attentions:
        quantizer = policy.quantizer("attention")
        if quantizer is None:
            attention.__class__ = family.attention
            continue
        attention.__class__ = _patched_class(family.attention, _StoredInputsAttention)
        attention._actcomp_attention = quantizer
        attention._actcomp_apply_rotary = family.apply_rotary
    if targets:
        compress_linears(model, compression, include=targets)
    return model
