"""Map between the logical LLaMA weights and one tensor-parallel rank's shards.

The logical weights are the unsharded, unfused LLaMA tensors under Hugging Face
``LlamaForCausalLM`` names (``model.layers.0.self_attn.q_proj.weight``, ``...mlp.gate_proj
.weight``, ``lm_head.weight``, ...), so converting a Hugging Face checkpoint is a
``load_full_weights`` call. Hugging Face's q/k weights are already in the rotate-half order our
RoPE uses (its conversion script permuted Meta's originals), so nothing is permuted here.

Each model parameter is one of five kinds (t = TP size, i = TP rank):

==============  =================================  =========================================
kind            logical weights                    rank i's shard
==============  =================================  =========================================
``replicated``  a norm weight                      the whole tensor
``rows``        embedding / lm_head [V, h]         rows ``[i V/t, (i+1) V/t)``
``columns``     o_proj / down_proj [h, n]          columns ``[i n/t, (i+1) n/t)``
``qkv``         q [H d, h], k, v [G d, h]          groups ``[i G/t, (i+1) G/t)`` of the fused
                                                   ``[q heads of g | k_g | v_g]`` rows
``gate_up``     gate, up [f, h]                    ``[gate rows i; up rows i]`` (stride 2)
==============  =================================  =========================================

(The fused layouts and why: :mod:`actcomp_dist.models.llama`.) :func:`shard_full_state_dict`
and :func:`merge_shards` are pure functions of tensors; :func:`full_state_dict`,
:func:`load_full_weights` and :func:`gather_full` apply them on a live model, gathering over
its TP group. They work on materialised parameters (not ZeRO-3 partitions); sub-token vectors
and other compressor state are not weights and are not included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from actcomp_dist.models.configs import LlamaConfig
from actcomp_dist.parallel.collectives import all_gather_dim0


@dataclass(frozen=True)
class WeightEntry:
    """One model parameter and the logical weights it is made of."""

    parameter: str  # name in ``model.named_parameters()``
    logical: tuple[str, ...]  # Hugging Face names, in fusion order
    kind: str  # replicated | rows | columns | qkv | gate_up


def weight_layout(config: LlamaConfig) -> list[WeightEntry]:
    """Every parameter of a :class:`~actcomp_dist.models.llama.LlamaModel`, in model order."""
    entries = [WeightEntry("embedding.weight", ("model.embed_tokens.weight",), "rows")]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        entries += [
            WeightEntry(ours + "input_norm.weight", (hf + "input_layernorm.weight",), "replicated"),
            WeightEntry(
                ours + "attention.qkv.weight",
                tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
                "qkv",
            ),
            WeightEntry(
                ours + "attention.proj.weight", (hf + "self_attn.o_proj.weight",), "columns"
            ),
            WeightEntry(
                ours + "mlp_norm.weight", (hf + "post_attention_layernorm.weight",), "replicated"
            ),
            WeightEntry(
                ours + "mlp.fc1.weight",
                (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                "gate_up",
            ),
            WeightEntry(ours + "mlp.fc2.weight", (hf + "mlp.down_proj.weight",), "columns"),
        ]
    entries.append(WeightEntry("final_norm.weight", ("model.norm.weight",), "replicated"))
    if not config.tie_embeddings:
        entries.append(WeightEntry("output_layer.weight", ("lm_head.weight",), "rows"))
    return entries


def logical_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every logical weight (Hugging Face names)."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.query_groups * config.head_dim
    per_kind = {
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "q_proj": (q_width, h),
        "k_proj": (kv_width, h),
        "v_proj": (kv_width, h),
        "o_proj": (h, q_width),
        "gate_proj": (f, h),
        "up_proj": (f, h),
        "down_proj": (h, f),
        "embed_tokens": (v, h),
        "norm": (h,),
        "lm_head": (v, h),
    }
    return {
        name: per_kind[name.removesuffix(".weight").rsplit(".", 1)[-1]]
        for entry in weight_layout(config)
        for name in entry.logical
    }


def _fuse(entry: WeightEntry, tensors: list[torch.Tensor], config: LlamaConfig) -> torch.Tensor:
    """Logical tensors -> the full fused weight (the layout megatron shards by rows)."""
    if entry.kind == "qkv":
        q, k, v = tensors
        groups, hidden = config.query_groups, q.shape[-1]
        per_group = [
            q.reshape(groups, config.heads_per_group * config.head_dim, hidden),
            k.reshape(groups, config.head_dim, hidden),
            v.reshape(groups, config.head_dim, hidden),
        ]
        return torch.cat(per_group, dim=1).reshape(-1, hidden)
    if entry.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    (tensor,) = tensors
    return tensor


def _unfuse(entry: WeightEntry, fused: torch.Tensor, config: LlamaConfig) -> list[torch.Tensor]:
    if entry.kind == "qkv":
        d, hidden = config.head_dim, fused.shape[-1]
        per_group = fused.reshape(config.query_groups, (config.heads_per_group + 2) * d, hidden)
        q, k, v = per_group.split([config.heads_per_group * d, d, d], dim=1)
        return [t.reshape(-1, hidden) for t in (q, k, v)]
    if entry.kind == "gate_up":
        return list(fused.chunk(2, dim=0))
    return [fused]


def _shard(kind: str, fused: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if kind == "replicated":
        return fused
    if kind == "columns":
        return fused.chunk(size, dim=1)[rank]
    if kind == "gate_up":  # megatron stride 2: chunks rank and size + rank of 2 * size
        chunks = fused.chunk(2 * size, dim=0)
        return torch.cat((chunks[rank], chunks[size + rank]), dim=0)
    return fused.chunk(size, dim=0)[rank]  # rows, qkv (whole groups per rank)


def _merge(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if kind == "replicated":
        return shards[0]
    if kind == "columns":
        return torch.cat(shards, dim=1)
    if kind == "gate_up":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def _check_keys(given: Mapping[str, torch.Tensor], expected: list[str], what: str) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )


def shard_full_state_dict(
    full: Mapping[str, torch.Tensor], config: LlamaConfig, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """Logical weights (Hugging Face names) -> rank ``tp_rank``'s parameters (model names).

    Raises ``ValueError`` on missing or unexpected names and on wrong shapes.
    """
    layout = weight_layout(config)
    shapes = logical_shapes(config)
    _check_keys(full, list(shapes), "the full state dict")
    for name, shape in shapes.items():
        if tuple(full[name].shape) != shape:
            raise ValueError(
                f"weight {name} has shape {tuple(full[name].shape)}, the model config needs {shape}"
            )
    return {
        e.parameter: _shard(
            e.kind, _fuse(e, [full[n] for n in e.logical], config), tp_rank, tp_size
        )
        for e in layout
    }


def merge_shards(
    shards: list[Mapping[str, torch.Tensor]], config: LlamaConfig
) -> dict[str, torch.Tensor]:
    """Every rank's parameters (model names, TP-rank order) -> the logical weights."""
    full: dict[str, torch.Tensor] = {}
    for entry in weight_layout(config):
        fused = _merge(entry.kind, [shard[entry.parameter] for shard in shards])
        full.update(zip(entry.logical, _unfuse(entry, fused, config), strict=True))
    return full


def gather_full(model, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors of this rank (parameters, gradients, ...; model names) -> the
    logical tensors, gathered over the model's TP group. Every rank gets the full result."""
    layout = weight_layout(model.config)
    _check_keys(local, [e.parameter for e in layout], "the per-parameter tensors")
    size = dist.get_world_size(model.tp_group)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for entry in layout:
        tensor = local[entry.parameter]
        if entry.kind == "replicated" or size == 1:
            gathered = [tensor] * size
        else:
            gathered = all_gather_dim0(tensor.unsqueeze(0), model.tp_group).unbind(0)
        for rank, shard in enumerate(gathered):
            shards[rank][entry.parameter] = shard
    return merge_shards(shards, model.config)


@torch.no_grad()
def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's logical weights (Hugging Face names), gathered over its TP group, on every
    rank, on the parameters' device and dtype."""
    parameters = dict(model.named_parameters())
    return {name: t.detach().clone() for name, t in gather_full(model, parameters).items()}


@torch.no_grad()
def load_full_weights(model, full: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's shards of the logical weights ``full`` into ``model``'s parameters.

    Strict: every logical weight must be given with its exact shape, nothing else.
    """
    size = dist.get_world_size(model.tp_group)
    local = shard_full_state_dict(full, model.config, dist.get_rank(model.tp_group), size)
    parameters = dict(model.named_parameters())
    for name, shard in local.items():
        assert shard.shape == parameters[name].shape, (name, shard.shape)
        parameters[name].copy_(shard)
