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
  ``lowrank:R`` (LoRAct's norm mode, on the two norms of each decoder layer; the final norm
  stays ``keep``): the norm keeps ``rstd`` and the factors ``L = y Q`` [N, R], ``Q`` [h, R] of
  its output (:class:`actcomp_dist.storage.LowRankStorage`); every trainable linear reading
  ``y`` (q/k/v or gate/up, or their PEFT LoRA A) computes its weight gradient as
  ``(g^T L) Q^T`` from the *same* two tensors, so ``y`` is kept by nobody. The norm's own
  backward reads ``y ~= L Q^T``. Every ``lowrank:R`` factorisation here draws its ``k``
  sampled columns afresh from the global CPU generator, as the authors' code does
  (``torch.randperm(n)[:k]`` per compression; LowRankStorage ``fresh_columns``): like dropout
  it consumes the RNG, and HF's checkpointing (both variants) replays it in its re-run.
  Readers must be ``nn.Linear`` or vanilla PEFT LoRA without dropout (a dropout mask would
  need ``y`` itself); anything else is refused.
- ``swiglu``: the MLP keeps ``gate`` and ``up`` only (``keep``), both packed in 8 bits
  (``int8``, ``fp8``) or as LoRAct factors (``lowrank:R``, LoRAct's act_fn mode: each of
  ``gate`` and ``up`` as ``(N + I) R`` elements), and recomputes ``silu(gate) * up`` in
  backward (:mod:`.ops`); Hugging Face keeps ``gate``, ``silu(gate)``, ``up`` and the product.
  Needs ``hidden_act="silu"``.
- ``attention``: ``keep`` leaves Hugging Face's attention as it is (with SDPA and no padding
  mask it keeps q, k after RoPE, v, the output and the log-sum-exp: no alias of a projection
  output). ``int8`` / ``fp8`` keep q, k, v packed and re-run SDPA in backward
  (:func:`actcomp_dist.storage.attention_with_stored_inputs`); causal attention without a
  padding mask only (a batch with padding raises), no attention dropout.
  ``recompute`` (and ``swiglu: recompute``): the attention (MLP) sublayer keeps only its
  input, the norm output, and is re-run from it in backward (:func:`.ops.recompute_from_kept`;
  same RNG and autocast state, as reentrant checkpointing; gradients accumulate through
  ``.backward()``). With ``norm: keep`` that input is the norm's kept output (one storage,
  exact gradients: sublayer checkpointing); with ``norm: lowrank:R`` it is the norm's factors
  ``L``, ``Q`` (one factorisation serves the norm and the re-run sublayer) and the sublayer
  is re-run from ``L Q^T``: LoRAct's pre-norm sublayer mode. Any adapter type serves inside
  (the readers are re-run, not patched). The attention then returns no attention weights.
- ``block_input``: ``lowrank:R`` (LoRAct's layer mode) makes each decoder layer keep the factors
  of its input ``x`` (``(N + h) R`` elements) and re-run the whole layer from
  ``x_hat = L Q^T`` in backward: the residual (identity) path passes the gradient through
  exactly, the branches see ``x_hat``. The layer takes the place of HF gradient checkpointing
  (either variant; on or off, the same losses and gradients): it keeps the factors where HF
  keeps ``x``. A re-run layer does not write a KV cache (``use_cache`` off, as under HF
  checkpointing). The linear sites (``qkv``, ``proj``, ``fc1``, ``fc2``) are compressed
  through ``compression=``: they must stay ``keep``.

Presets (``R = hidden // 8`` for every tensor factorised, gate and up included: the authors'
code applies one absolute rank to all, 128 at hidden 1024; ``R = intermediate // 8`` for gate
and up was measured at 1.19x the step CPU time of plain LoRA): ``"exact"`` (every kind
``keep``: memory-efficient exact ops, losses equal to the unpatched model's); ``"loract"`` (``norm`` and ``swiglu`` at
``lowrank:R``: LoRAct's norm and act_fn modes, Shi et al., arXiv 2509.23472, no re-run);
``"loract-layer"`` (``block_input: lowrank:R``: the layer mode, the configuration of the
authors' code example, github.com/shijxcs/meft README at commit 78695c1:
``patch_locations="layer"``, rank 128 on Qwen3-0.6B, hidden 1024, i.e. hidden // 8) and
``"loract-sublayer"`` (``norm: lowrank:R``, ``attention`` and ``swiglu`` ``recompute``: the
pre-norm sublayer mode of that README's previous commit 9b51a01, rank 128). The paper's own
text was not checked for a single recommended mode. ``"int8"`` is not LoRAct: ``attention``
and ``swiglu`` at ``int8`` (q, k, v and gate, up in 8 bits, norms as ``"exact"``), the
configuration that met the bytes, step-time and loss targets of the ``"loract"`` preset on the
measured hidden-128 model, where no LoRAct rank did (README, Hugging Face, Measured). A
mapping in the run config's ``memory.policy`` format (kind -> policy) gives any other mix,
e.g. ``{"norm": "lowrank:16", "attention": "int8"}``.

The loss (``loss_chunk_tokens``, default 1024; every policy): with ``labels`` and grad enabled
the ``*ForCausalLM``'s output layer and transformers' ``ForCausalLMLoss`` run as one function,
:func:`actcomp_dist.hf.loss.linear_cross_entropy`, that keeps no logits (transformers' loss keeps
the fp32 log-probabilities ``[N, V]``: at vocabulary 2048 and hidden 128 more than all the
decoder layers of ``"loract"`` together) and computes the logits of labelled tokens only; the
output's ``logits`` is then ``None``. Equal to transformers' loss and gradients to rounding
(tests/unit/test_hf_loss.py). Without labels or under ``torch.no_grad()`` the forward is
transformers' own. Serves a plain ``nn.Linear`` head (tied or not, frozen or trained) with the
default loss function; a PEFT-wrapped head (``modules_to_save``, LoRA on ``lm_head``) or a
custom ``loss_function`` is refused: pass ``loss_chunk_tokens=None``.

``compression`` (a :class:`~actcomp_dist.config.CompressionConfig`) swaps the trainable
``nn.Linear`` inputs of q/k/v, gate/up and down (or, under PEFT, their LoRA A) for
:class:`~actcomp_dist.layers.CompressedLinear` (:func:`~actcomp_dist.layers.compress_linears`;
``o_proj`` and LoRA B stay exact: B's input ``A x`` is already r wide). A frozen base layer
keeps nothing for its weight either way. With the patches above compression removes nothing
and adds its ``Z``: a ``keep`` norm keeps the q/k/v and gate/up input anyway, and
``down_proj``'s input is recomputed from gate/up (``lowrank`` norms refuse it: both would
store the same input).

Order: apply after the model is built (or loaded) and after or before PEFT's
``get_peft_model``; before HF gradient checkpointing or not, either order works; before
wrapping by DeepSpeed / DDP / FSDP. Patching swaps the modules' classes for subclasses (state
dict, parameters and ``isinstance`` checks unchanged); applying again re-patches from the
original classes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf.families import Family, supported_families, supported_names
from actcomp_dist.hf.loss import linear_cross_entropy
from actcomp_dist.hf.ops import (
    factored_input_linear,
    low_rank_rms_norm,
    recompute_from_kept,
    swiglu,
    swiglu_and_linears,
    swiglu_linear,
    swiglu_then,
)
from actcomp_dist.layers import CompressedLinear, compress_linears
from actcomp_dist.models.efficient_ops import rms_norm
from actcomp_dist.storage import (
    KINDS,
    POLICIES,
    LowRankStorage,
    Quantizer,
    StoragePolicy,
    attention_with_stored_inputs,
    storage_for,
)

#: Named policies (``apply_memory_policy(model, "exact")``); ``R`` of ``"loract"`` is resolved
#: per model as :data:`LORACT_RANK_DIVISOR` below the width of the tensor factorised.
PRESETS: dict[str, dict[str, str]] = {
    "exact": {},
    "loract": {"norm": "lowrank:R", "swiglu": "lowrank:R"},
    "loract-layer": {"block_input": "lowrank:R"},
    "loract-sublayer": {"norm": "lowrank:R", "attention": "recompute", "swiglu": "recompute"},
    "int8": {"attention": "int8", "swiglu": "int8"},
}
#: The presets' rank: hidden // 8 for every factorised tensor (norm outputs, gate and up,
#: block inputs): the authors' code applies one rank to all of them (128 at hidden 1024).
LORACT_RANK_DIVISOR = 8
#: The kinds this package patches and the policies each takes; other kinds must stay ``keep``.
HF_IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "norm": ("keep", "lowrank:R"),
    "attention": ("keep", "int8", "fp8", "recompute"),
    "swiglu": ("keep", "int8", "fp8", "lowrank:R", "recompute"),
    "block_input": ("keep", "lowrank:R"),
}
HF_KINDS = tuple(HF_IMPLEMENTED)
#: Linear leaves whose inputs ``compression=`` compresses.
COMPRESSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
#: The projections that read each decoder-layer norm's output (LoRAct's norm mode).
NORM_CONSUMERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


@dataclasses.dataclass(frozen=True)
class HfPolicy:
    """The resolved policy of each kind :mod:`actcomp_dist.hf` patches."""

    norm: str = "keep"
    attention: str = "keep"
    swiglu: str = "keep"
    block_input: str = "keep"

    def storage(self, kind: str) -> Quantizer | None:
        """The packer of ``kind``; ``lowrank:R`` draws its columns afresh in every call, as
        the authors' code does (:class:`~actcomp_dist.storage.LowRankStorage`
        ``fresh_columns``)."""
        value = getattr(self, kind)
        packer = None if value == "recompute" else storage_for(value)
        if isinstance(packer, LowRankStorage):
            return LowRankStorage(packer.rank, fresh_columns=True)
        return packer

    def recomputes(self, kind: str) -> bool:
        return getattr(self, kind) == "recompute"


def _grammar(value: str) -> str:
    return "lowrank:R" if isinstance(value, str) and value.startswith("lowrank:") else value


def resolve_policy(
    policy: str | Mapping[str, Any] | StoragePolicy, widths: Mapping[str, int] | None = None
) -> HfPolicy:
    """A preset name, a ``memory.policy`` mapping or a :class:`StoragePolicy`, checked for
    what this package serves; raises ``ValueError`` naming the field and the valid values.
    ``widths`` (``norm``, ``swiglu`` -> width) resolves the ``R`` of ``"loract"``."""
    if isinstance(policy, str):
        if policy not in PRESETS:
            raise ValueError(
                f"apply_memory_policy: unknown preset {policy!r}; presets: {sorted(PRESETS)} "
                f"or a memory.policy mapping of kinds {list(HF_KINDS)}"
            )
        widths = widths or {}
        policy = {
            kind: f"lowrank:{max(1, widths.get(kind, 0) // LORACT_RANK_DIVISOR)}"
            if value == "lowrank:R"
            else value
            for kind, value in PRESETS[policy].items()
        }
    elif isinstance(policy, StoragePolicy):
        policy = policy.changes()
    if not isinstance(policy, Mapping):
        raise TypeError(
            f"apply_memory_policy: policy must be a preset name, a mapping or a StoragePolicy, "
            f"not {type(policy).__name__}"
        )
    unknown = sorted(set(policy) - set(KINDS))
    if unknown:
        raise ValueError(f"memory.policy has unknown kind(s) {unknown}; valid kinds: {list(KINDS)}")
    for kind, value in policy.items():
        where = f"memory.policy.{kind}={value!r}"
        if _grammar(value) not in POLICIES or (
            value.startswith("lowrank:") and not value.partition(":")[2].isdigit()
        ):
            raise ValueError(f"{where} is not a policy; valid: {list(POLICIES)}")
        if kind not in HF_KINDS and value != "keep":
            raise ValueError(
                f"{where} is not served on Hugging Face models (linear sites are compressed "
                f"through compression=); kinds served: {list(HF_KINDS)}"
            )
        if kind in HF_KINDS and _grammar(value) not in HF_IMPLEMENTED[kind]:
            raise ValueError(
                f"{where} is not served for kind {kind!r} on Hugging Face models; served: "
                f"{list(HF_IMPLEMENTED[kind])}"
            )
        if value.startswith("lowrank:") and int(value.partition(":")[2]) < 1:
            raise ValueError(f"{where}: the rank R must be >= 1")
    return HfPolicy(**{k: v for k, v in policy.items() if k in HF_KINDS})


# -- the patched classes -------------------------------------------------------------------------


class _EfficientRMSNorm:
    """RMSNorm keeping its output and ``rstd`` (``actcomp_dist.models.efficient_ops``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class _LowRankRMSNorm:
    """RMSNorm keeping ``rstd`` and LoRAct factors of its output (``lowrank:R``)."""

    _actcomp_norm: Quantizer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _draw_without_packing(self, self._actcomp_norm, hidden_states.shape[-1])
        return low_rank_rms_norm(
            hidden_states, self.weight, self.variance_epsilon, self._actcomp_norm
        )


def _draw_without_packing(module: nn.Module, storage: Quantizer | None, *widths: int) -> None:
    """A training forward without grad (the first pass of HF's reentrant checkpointing) takes
    the column draws a forward with grad takes when it packs (one per factorised tensor of
    ``widths``), as dropout draws its mask: the re-run, which restores the RNG state, then
    draws what the run without checkpointing draws."""
    if module.training and not torch.is_grad_enabled() and isinstance(storage, LowRankStorage):
        for width in widths:
            storage.skip(width)


class _FactoredInputLinearModule:
    """``nn.Linear`` whose weight gradient reads a low-rank norm's factors when its input
    carries them (``input.lowrank_factors``), instead of keeping the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = getattr(x, "lowrank_factors", None)
        if factors is None or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return factored_input_linear(x, self.weight, self.bias, factors)


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


def _vanilla_lora_adapters(module: nn.Module, dtype: torch.dtype) -> list[str] | None:
    """The active adapters of a PEFT LoRA layer over a frozen ``nn.Linear`` whose adapters are
    all plain LoRA (``nn.Linear`` A and B, no dropout, no variant) in ``dtype`` (or under
    autocast); ``None`` for anything else."""
    base, lora_a = getattr(module, "base_layer", None), getattr(module, "lora_A", None)
    if base is None or lora_a is None or type(base) is not nn.Linear or base.weight.requires_grad:
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    names = [name for name in module.active_adapters if name in lora_a]
    same_dtype = torch.is_autocast_enabled(base.weight.device.type) or all(
        lora_a[name].weight.dtype == dtype for name in names
    )
    plain = all(
        type(lora_a[name]) is nn.Linear
        and type(module.lora_B[name]) is nn.Linear
        and isinstance(module.lora_dropout[name], nn.Identity)
        and name not in getattr(module, "lora_variant", {})
        for name in names
    )
    return names if plain and same_dtype else None


class _SwiGLUMLP:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` keeping ``gate`` and ``up`` only."""

    _actcomp_swiglu: Quantizer | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [b, s, intermediate] each
        down, storage = self.down_proj, self._actcomp_swiglu
        _draw_without_packing(self, storage, gate.shape[-1], up.shape[-1])
        if type(down) is nn.Linear and down.weight.requires_grad:
            return swiglu_linear(gate, up, down.weight, down.bias, storage)
        if _keeps_no_input(down):
            return down(swiglu(gate, up, storage))
        adapters = _vanilla_lora_adapters(down, gate.dtype)
        if adapters is not None:
            # PEFT LoRA's forward with one function computing the product and every A's output:
            # gate and up are kept once (as they are, or packed), the frozen base keeps
            # nothing, B keeps A h.
            lora_a = [down.lora_A[name] for name in adapters]
            h, *a_hs = swiglu_and_linears(gate, up, storage, [(a.weight, a.bias) for a in lora_a])
            result = down.base_layer(h)
            result_dtype = result.dtype
            for name, a_h in zip(adapters, a_hs, strict=True):
                result = result + down.lora_B[name](a_h) * down.scaling[name]
            return result.to(result_dtype)
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
        device = q.device.type
        if torch.is_autocast_enabled(device):
            # What autocast does to SDPA's inputs (RoPE in fp32 promotes q and k): the packed
            # copies and backward's re-run then see one dtype.
            dtype = torch.get_autocast_dtype(device)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = attention_with_stored_inputs(
            q, k, v, self._actcomp_attention, self.num_key_value_groups > 1
        )  # [b, heads, s, d]
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


class _LinearCrossEntropyCausalLM:
    """A ``*ForCausalLM`` whose training loss (``labels`` given, grad enabled) runs
    :func:`actcomp_dist.hf.loss.linear_cross_entropy` on the last hidden states: no logits are
    kept for backward, and none are returned (``logits`` is ``None``). Anything else
    (no labels, ``torch.no_grad()``, ``logits_to_keep``) is Hugging Face's own forward."""

    _actcomp_loss_chunk_tokens: int

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is None or not torch.is_grad_enabled() or not all_logits:
            return self._actcomp_base.forward(
                self, **inputs, labels=labels, logits_to_keep=logits_to_keep, **kwargs
            )
        # What transformers' can_return_tuple does around its forward.
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        # kwargs go to the model and the loss alike, as in transformers' forward.
        outputs = self.model(**inputs, **kwargs)
        ignore_index = kwargs.get("ignore_index", -100)
        target = kwargs.get("shift_labels")
        if target is None:  # ForCausalLMLoss's shift: token t predicts label t + 1
            target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = self.get_output_embeddings()
        loss = linear_cross_entropy(
            outputs.last_hidden_state,
            head.weight,
            head.bias,
            target,
            chunk_tokens=self._actcomp_loss_chunk_tokens,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            ignore_index=ignore_index,
        )
        # Imported here: importing actcomp_dist.hf does not import transformers.
        from transformers.modeling_outputs import CausalLMOutputWithPast

        result = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict else result.to_tuple()


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class _LowRankCheckpointLayer:
    """A decoder layer that keeps LoRAct factors of its input and is re-run from their
    reconstruction in backward (``block_input=lowrank:R``, LoRAct's layer mode). Takes the
    place of HF gradient checkpointing for the layer (see :func:`_layer_class`)."""

    _actcomp_block_input: Quantizer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        run = functools.partial(self._actcomp_base.forward, self)
        if not torch.is_grad_enabled():
            return run(hidden_states, *args, **kwargs)
        # A re-run layer must not write a KV cache twice (what HF checkpointing does too).
        if kwargs.get("past_key_values") is not None:
            kwargs["past_key_values"] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return recompute_from_kept(
            run,
            hidden_states,
            args,
            kwargs,
            storage=self._actcomp_block_input,
            trainable=_trainable(self),
        )


class _RecomputedSublayer:
    """An attention or MLP sublayer that keeps only its input, the pre-norm output: the
    factors a low-rank norm attached to it (one storage with the norm's), else the output
    itself (kept by the norm too); backward re-runs the sublayer from it
    (``attention`` / ``swiglu`` ``=recompute``; with ``norm=lowrank:R`` LoRAct's pre-norm
    sublayer mode)."""

    _actcomp_norm: Quantizer | None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        base = functools.partial(self._actcomp_base.forward, self)
        if not torch.is_grad_enabled():
            return base(hidden_states, *args, **kwargs)
        factors = getattr(hidden_states, "lowrank_factors", None)
        attention = isinstance(self, _RecomputedAttention)
        run = (lambda *a, **k: base(*a, **k)[0]) if attention else base
        out = recompute_from_kept(
            run,
            hidden_states,
            args,
            kwargs,
            storage=self._actcomp_norm if factors is not None else None,
            factors=factors,
            trainable=_trainable(self),
        )
        return (out, None) if attention else out


class _RecomputedAttention(_RecomputedSublayer):
    """Attention variant: returns ``(output, None)`` (no attention weights)."""


def _layer_class(family: Family) -> type:
    """The decoder-layer subclass of LoRAct's layer mode. HF wraps every subclass's
    ``forward`` in its gradient checkpointing; the wrapper is replaced by the plain method, so
    with HF gradient checkpointing on (either variant) the layer keeps the factors of its
    input instead of HF keeping the input itself (one re-run, not two)."""
    cls = _patched_class(family.decoder_layer, _LowRankCheckpointLayer)
    cls.forward = _LowRankCheckpointLayer.forward
    return cls


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


def _model_config(model: nn.Module) -> Any:
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "hidden_size") and hasattr(config, "intermediate_size"):
            return config
    raise ValueError(f"apply_memory_policy: {type(model).__name__} has no model config")


def _norm_consumers(
    model: nn.Module, family: Family, policy: HfPolicy
) -> tuple[list[nn.Module], list[nn.Module]]:
    """The decoder-layer norms and the trainable linears that read their outputs (a
    projection itself, or its PEFT LoRA A); refuses a reader that would keep the full output.
    A re-run sublayer (``recompute``) keeps the norm's factors itself: its readers are not
    listed (any adapter type serves there)."""
    recomputed = {
        "input_layernorm": policy.recomputes("attention"),
        "post_attention_layernorm": policy.recomputes("swiglu"),
    }
    norms, linears = [], []
    for layer_name, layer in model.named_modules():
        if _original(type(layer)) is not family.decoder_layer:
            continue
        for norm_name, readers in NORM_CONSUMERS.items():
            norms.append(layer.get_submodule(norm_name))
            if recomputed[norm_name]:
                continue
            for reader_name in readers:
                name = f"{layer_name}.{reader_name}"
                reader = layer.get_submodule(reader_name)
                linears += _factored_readers(name, reader)
    return norms, linears


def _factored_readers(name: str, reader: nn.Module) -> list[nn.Module]:
    plain = _original(type(reader)) is nn.Linear
    if plain:
        return [reader] if reader.weight.requires_grad else []
    lora_a, base = getattr(reader, "lora_A", None), getattr(reader, "base_layer", None)
    if lora_a is not None and base is not None and _original(type(base)) is nn.Linear:
        out = [base] if base.weight.requires_grad else []
        for adapter, linear in lora_a.items():
            dropout = reader.lora_dropout[adapter]
            if not isinstance(dropout, nn.Identity) or adapter in reader.lora_variant:
                raise ValueError(
                    f"apply_memory_policy: norm=lowrank:R serves vanilla LoRA without dropout "
                    f"(LoraConfig(lora_dropout=0)); {name} adapter {adapter!r} has "
                    f"{'a variant' if adapter in reader.lora_variant else type(dropout).__name__}"
                )
            out.append(linear)
        return out
    raise ValueError(
        f"apply_memory_policy: norm=lowrank:R serves nn.Linear and PEFT LoRA readers of the "
        f"norm output; {name} is a {type(reader).__name__}"
    )


def _check_mlp(name: str, mlp: nn.Module) -> None:
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    if act not in ("silu", "swish"):
        raise ValueError(
            f"apply_memory_policy: {name} ({type(mlp).__name__}) has hidden_act={act!r}; the "
            "swiglu policy serves silu (SwiGLU) MLPs only"
        )


def _check_attention(name: str, attention: nn.Module, policy: StoragePolicy) -> None:
    if policy.attention not in ("keep", "recompute") and getattr(
        attention, "attention_dropout", 0.0
    ):
        raise ValueError(
            f"apply_memory_policy: {name} has attention_dropout="
            f"{attention.attention_dropout}; memory.policy.attention={policy.attention!r} "
            "serves attention without dropout (use 'keep')"
        )


def _check_fused_loss(causal_lms: list[tuple[str, nn.Module]], chunk_tokens: Any) -> None:
    """The fused loss computes transformers' ``ForCausalLMLoss`` from a plain ``lm_head``
    weight: refuse a bad chunk size, a wrapped head or another loss function."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(
            f"apply_memory_policy: loss_chunk_tokens={chunk_tokens!r} must be an int >= 1 "
            "(tokens per chunk of the fused loss) or None (transformers' loss)"
        )
    from transformers.loss.loss_utils import ForCausalLMLoss

    for name, causal_lm in causal_lms:
        head = causal_lm.get_output_embeddings()
        where = f"{name}.lm_head" if name else "lm_head"
        if type(head) is not nn.Linear:
            raise ValueError(
                f"apply_memory_policy: loss_chunk_tokens={chunk_tokens} computes the loss from "
                f"{where}'s weight and serves a plain nn.Linear head; {where} is a "
                f"{type(head).__name__} (a PEFT adapter or modules_to_save on the head?): pass "
                "loss_chunk_tokens=None for transformers' loss"
            )
        if causal_lm.loss_function is not ForCausalLMLoss:
            raise ValueError(
                f"apply_memory_policy: loss_chunk_tokens={chunk_tokens} computes transformers' "
                f"ForCausalLMLoss; {name or type(causal_lm).__name__} has loss_function "
                f"{getattr(causal_lm.loss_function, '__name__', causal_lm.loss_function)!r}: "
                "pass loss_chunk_tokens=None to keep it"
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
    loss_chunk_tokens: int | None = 1024,
) -> nn.Module:
    """Patch ``model`` (a transformers Llama / Mistral / Qwen2 model, PEFT-wrapped or not) in
    place so each kind of saved tensor follows ``policy`` (see the module doc); returns it.
    ``loss_chunk_tokens``: the causal LM's training loss runs
    :func:`actcomp_dist.hf.loss.linear_cross_entropy` this many tokens at a time and keeps no
    logits (``None``: transformers' own loss, which keeps fp32 log-probabilities ``[N, V]``).

    Everything is validated before anything is patched: an unsupported model, a policy a
    module cannot take, or a bad preset raises ``ValueError`` and leaves ``model`` untouched.
    """
    family = _find_family(model)
    config = _model_config(model)
    widths = {
        "norm": config.hidden_size,
        "swiglu": config.hidden_size,
        "block_input": config.hidden_size,
    }
    policy = resolve_policy(policy, widths)
    modules = list(model.named_modules())
    norms = [(n, m) for n, m in modules if _original(type(m)) is family.norm]
    mlps = [(n, m) for n, m in modules if _original(type(m)) is family.mlp]
    attentions = [(n, m) for n, m in modules if _original(type(m)) is family.attention]
    layers = [(n, m) for n, m in modules if _original(type(m)) is family.decoder_layer]
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
    recomputing = [
        kind
        for kind in ("attention", "swiglu", "block_input")
        if policy.recomputes(kind) or (kind == "block_input" and policy.block_input != "keep")
    ]
    if compression is not None and recomputing:
        raise ValueError(
            f"apply_memory_policy: compression={compression.method!r} with memory.policy "
            f"{ {k: getattr(policy, k) for k in recomputing} }: a re-run sublayer or layer keeps "
            "nothing of its linears' inputs, there is nothing to compress; choose one"
        )
    causal_lms = [(n, m) for n, m in modules if _original(type(m)) is family.causal_lm]
    if loss_chunk_tokens is not None:
        _check_fused_loss(causal_lms, loss_chunk_tokens)
    low_rank_norms, consumers = [], []
    if policy.norm != "keep":
        if compression is not None:
            raise ValueError(
                f"apply_memory_policy: memory.policy.norm={policy.norm!r} and compression="
                f"{compression.method!r} both store the q/k/v and gate/up inputs; choose one"
            )
        low_rank_norms, consumers = _norm_consumers(model, family, policy)

    factored_linear = _patched_class(nn.Linear, _FactoredInputLinearModule)
    for _, module in modules:  # re-applying: readers of a previous low-rank norm
        if type(module) is factored_linear:
            module.__class__ = nn.Linear
    low_rank_ids = {id(m) for m in low_rank_norms}
    for _, norm in norms:
        if id(norm) in low_rank_ids:
            norm.__class__ = _patched_class(family.norm, _LowRankRMSNorm)
            norm._actcomp_norm = policy.storage("norm")
        else:
            norm.__class__ = _patched_class(family.norm, _EfficientRMSNorm)
    for linear in consumers:
        linear.__class__ = factored_linear
    for _, mlp in mlps:
        if policy.recomputes("swiglu"):
            mlp.__class__ = _patched_class(family.mlp, _RecomputedSublayer)
            mlp._actcomp_norm = policy.storage("norm")
            continue
        mlp.__class__ = _patched_class(family.mlp, _SwiGLUMLP)
        mlp._actcomp_swiglu = policy.storage("swiglu")
    for _, attention in attentions:
        if policy.recomputes("attention"):
            attention.__class__ = _patched_class(family.attention, _RecomputedAttention)
            attention._actcomp_norm = policy.storage("norm")
            continue
        quantizer = policy.storage("attention")
        if quantizer is None:
            attention.__class__ = family.attention
            continue
        attention.__class__ = _patched_class(family.attention, _StoredInputsAttention)
        attention._actcomp_attention = quantizer
        attention._actcomp_apply_rotary = family.apply_rotary
    for _, layer in layers:
        if policy.block_input == "keep":
            layer.__class__ = family.decoder_layer
            continue
        layer.__class__ = _layer_class(family)
        layer._actcomp_block_input = policy.storage("block_input")
    for _, causal_lm in causal_lms:
        if loss_chunk_tokens is None:
            causal_lm.__class__ = family.causal_lm
            continue
        causal_lm.__class__ = _patched_class(family.causal_lm, _LinearCrossEntropyCausalLM)
        causal_lm._actcomp_loss_chunk_tokens = loss_chunk_tokens
    if targets:
        compress_linears(model, compression, include=targets)
    return model
