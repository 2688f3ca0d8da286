"""Adapter files: the trained part of an adapter only, independent of the TP size.

A saved adapter is a directory with two layouts side by side:

- ours, which resumes training exactly (masks, sparse storage, A regenerated from its seed):

  - ``actcomp_adapter.json``: the :class:`AdapterConfig` (method, rank, alpha, seed, task, ...),
    the adapter name and, per adapted linear, its layer id, site, logical shape and A's seed;
  - ``actcomp_adapter.safetensors``: per adapted linear (model names), in the linear's logical
    (unsharded, fused) row order:

  ===========================  ===============================================================
  ``<linear>.B``               B [out_features, r] (dense adapters, or masked ones whose
                               entries outside the mask are not all zero: continual learning)
  ``<linear>.B_values``        a masked B with zeros outside its mask: only the kept entries,
                               row-major (LoRI-S at 90% sparsity: a tenth of the dense bytes)
  ``<linear>.mask_bits``       the mask, 8 entries per byte (little-endian bit order)
  ``<linear>.A``               LoRA only (a trained A). LoRI's A is never stored: it is
                               regenerated from the seed in ``adapter_config.json``.
  ===========================  ===============================================================

- PEFT's, which ``peft.PeftModel.from_pretrained(hf_model, directory)`` loads onto the Hugging
  Face model of the same weights (``adapter_config.json``, ``adapter_model.safetensors``): a
  LoRA per Hugging Face module, the fused QKV and gate/up adapters split into q/k/v and
  gate/up (they share A; B's rows are split), A written out (LoRI's frozen A too), LoRI's mask
  and the adapter's whole scale ``multiplier * alpha / r`` folded into B, so PEFT's own scale is
  ``lora_alpha / r = 1``.

Column-parallel shards are gathered into (and cut back from) the base weight's row order —
fused QKV groups, Megatron's stride-2 gate/up chunks — so a file saved at TP = 2 loads at
TP = 1, 4 or 8. Saving and loading are collective over the TP group; rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from actcomp_dist.adapters.apply import adapters_named, apply_adapters, iter_adapters
from actcomp_dist.adapters.base import ROW, AdapterGeometry
from actcomp_dist.adapters.config import AdapterConfig
from actcomp_dist.parallel.collectives import all_gather_dim0

CONFIG_FILE = "actcomp_adapter.json"
WEIGHTS_FILE = "actcomp_adapter.safetensors"
FORMAT = "actcomp-adapter/1"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT names a CausalLM adapter's tensors after its wrappers: PeftModel.base_model (LoraModel)
# .model (the transformers model).
_PEFT_PREFIX = "base_model.model."


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor -> uint8 [ceil(numel / 8)], entry i in bit ``i % 8`` of byte ``i // 8``."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat((flat, flat.new_zeros((-flat.numel()) % 8)))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and(1)
    numel = 1
    for size in shape:
        numel *= size
    return bits.reshape(-1)[:numel].bool().reshape(shape)


def gather_rows(local: torch.Tensor, geometry: AdapterGeometry) -> torch.Tensor:
    """A column-parallel B-shaped tensor -> the logical one (row order of the full weight:
    with Megatron's partition stride s, rank i's shard is chunks ``i, t + i, ...`` of s*t)."""
    if not geometry.b_sharded:
        return local
    size, stride = geometry.tp_size, geometry.stride
    shards = all_gather_dim0(local.unsqueeze(0), geometry.group).unbind(0)
    chunks = [shard.chunk(stride) for shard in shards]
    return torch.cat([chunks[rank][j] for j in range(stride) for rank in range(size)])


def shard_rows(full: torch.Tensor, geometry: AdapterGeometry) -> torch.Tensor:
    """Inverse of :func:`gather_rows`: this rank's rows of a logical B-shaped tensor."""
    if not geometry.b_sharded:
        return full
    size, stride, rank = geometry.tp_size, geometry.stride, geometry.tp_rank
    pieces = full.chunk(stride * size)
    return torch.cat([pieces[j * size + rank] for j in range(stride)])


def _gather_a(a: torch.Tensor, geometry: AdapterGeometry) -> torch.Tensor:
    if geometry.mode != ROW or geometry.tp_size == 1:
        return a
    return torch.cat(all_gather_dim0(a.unsqueeze(0), geometry.group).unbind(0), dim=1)


def _hf_modules(model: nn.Module, path: str, b: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(Hugging Face module name, its rows of B)`` for our linear ``path`` with logical B:
    our LLaMA's fused linears split as its weights are; other models keep their own names."""
    from actcomp_dist.models.configs import LlamaConfig

    config = getattr(model, "config", None)
    if not isinstance(config, LlamaConfig):
        return [(path, b)]
    from actcomp_dist.models.weights import _unfuse, weight_layout

    (entry,) = [e for e in weight_layout(config) if e.parameter == f"{path}.weight"]
    parts = _unfuse(entry, b, config)
    return [(n.removesuffix(".weight"), t) for n, t in zip(entry.logical, parts, strict=True)]


def _peft_config(rank: int, targets: set[str]) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # the scale is folded into B
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


@torch.no_grad()
def save_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> None:
    """Collective: write adapter ``name`` (trained tensors only) to ``directory`` (rank 0), in
    our layout and in PEFT's (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    peft: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    linears: dict[str, dict] = {}
    config: AdapterConfig | None = None
    for path, adapter in adapters_named(model, name):
        config = adapter.config
        geometry = adapter.geometry
        b = gather_rows(adapter.effective_B().contiguous(), geometry).cpu()
        entry = {
            "layer_id": adapter.layer_id,
            "site": adapter.site,
            "in_features": geometry.in_features,
            "out_features": geometry.out_features,
            "a_seed": adapter.seed,
            "masked": adapter.mask is not None,
            "sparse_storage": False,
        }
        if adapter.mask is not None:
            mask = gather_rows(adapter.mask.to(torch.uint8), geometry).bool().cpu()
            tensors[f"{path}.mask_bits"] = pack_bits(mask)
            if not b.masked_fill(mask, 0).any():
                entry["sparse_storage"] = True
                tensors[f"{path}.B_values"] = b[mask].contiguous()
        if not entry["sparse_storage"]:
            tensors[f"{path}.B"] = b
        if isinstance(adapter.A, nn.Parameter):  # LoRA: trained, not regenerable
            tensors[f"{path}.A"] = _gather_a(adapter.A.detach().contiguous(), geometry).cpu()
        linears[path] = entry
        a = _gather_a(adapter.current_A(b.device, torch.float32).contiguous(), geometry).cpu()
        for module, b_rows in _hf_modules(model, path, adapter.scale * b.float()):
            peft[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a
            peft[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b_rows.contiguous()
            targets.add(module.rsplit(".", 1)[-1])
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "name": name, "config": config.to_dict(), "linears": linears}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        # safetensors refuses tensors sharing storage: A is shared by the split modules.
        peft = {key: t.clone() for key, t in peft.items()}
        save_file(peft, str(directory / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        peft_config = _peft_config(config.rank, targets)
        (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    if dist.is_initialized():
        dist.barrier()


def read_adapter_config(directory: str | Path) -> tuple[str, AdapterConfig, dict[str, dict]]:
    """``(name, config, linears)`` of a saved adapter."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a saved adapter")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta["name"], AdapterConfig.from_dict(meta["config"]), meta["linears"]


@torch.no_grad()
def load_adapter(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    *,
    freeze_base: bool = True,
) -> str:
    """Attach a saved adapter to ``model`` (as ``name``, default: its saved name) and load it,
    at this model's TP size; A is regenerated from the saved seed. Returns the name.

    Raises ``ValueError`` if the saved linears or shapes differ from the model's.
    """
    saved_name, config, linears = read_adapter_config(directory)
    name = name or saved_name
    if not any(True for _ in iter_adapters(model, name)):
        apply_adapters(model, config, name, freeze_base=freeze_base)
    attached = adapters_named(model, name)
    if sorted(p for p, _ in attached) != sorted(linears):
        raise ValueError(
            f"adapter {directory} covers linears {sorted(linears)[:6]}..., the model's "
            f"{config.targets} are {sorted(p for p, _ in attached)[:6]}...: not the same model"
        )
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    for path, adapter in attached:
        entry, geometry = linears[path], adapter.geometry
        shape = (entry["out_features"], config.rank)
        if (entry["in_features"], entry["out_features"]) != (
            geometry.in_features,
            geometry.out_features,
        ) or (entry["layer_id"], entry["site"]) != (adapter.layer_id, adapter.site):
            raise ValueError(f"adapter {directory}: {path} was saved for another layer shape")
        if entry.get("a_seed", adapter.seed) != adapter.seed:
            raise ValueError(
                f"adapter {directory}: {path} was saved with A seed {entry['a_seed']}, its "
                f"config (seed {config.seed}, task {config.task}) derives {adapter.seed}"
            )
        mask = unpack_bits(tensors[f"{path}.mask_bits"], shape) if entry["masked"] else None
        if entry["sparse_storage"]:
            b = torch.zeros(shape, dtype=tensors[f"{path}.B_values"].dtype)
            b[mask] = tensors[f"{path}.B_values"]
        else:
            b = tensors[f"{path}.B"]
        adapter.B.copy_(shard_rows(b, geometry))
        if mask is not None:
            adapter.mask = shard_rows(mask, geometry).to(adapter.B.device)
            # Entries outside the mask are pinned at their saved values (0 for LoRI-S).
            adapter.frozen_B = None if entry["sparse_storage"] else adapter.B.detach().clone()
        if f"{path}.A" in tensors:
            a = tensors[f"{path}.A"]
            if geometry.mode == ROW and geometry.tp_size > 1:
                a = a.chunk(geometry.tp_size, dim=1)[geometry.tp_rank]
            adapter.A.copy_(a)
    return name
