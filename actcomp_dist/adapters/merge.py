"""Merge adapters into the base weights, and export the merged model to Hugging Face.

Several adapters on one linear merge by **concatenation** along the rank (LoRI's
"concatenated merging", arXiv 2504.07448 section 3.3): with per-adapter weights ``w_t``,

    delta W = [w_1 s_1 B_1 | ... | w_T s_T B_T] @ [A_1; ...; A_T]
            = sum_t w_t s_t B_t A_t,

one GEMM of rank ``sum_t r_t``, exactly what running the adapters together with multipliers
``w_t`` computes (up to float rounding). Each rank merges its own shard (a column-parallel B
shard times the full A, or the full B times a row-parallel A shard is the local weight
shard's update), so merging needs no communication. Computed in fp32 and added once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from actcomp_dist.adapters.apply import adapter_names, iter_adapters, remove_adapters


def _selected(
    model: nn.Module, names: Sequence[str] | None, weights: Mapping[str, float] | None
) -> tuple[list[str], dict[str, float]]:
    names = list(names) if names is not None else adapter_names(model)
    if not names:
        raise ValueError("the model has no adapters to merge")
    unknown = sorted(set(names) - set(adapter_names(model)))
    if unknown:
        raise ValueError(f"no adapter(s) {unknown}; attached: {adapter_names(model)}")
    weights = dict(weights or {})
    extra = sorted(set(weights) - set(names))
    if extra:
        raise ValueError(f"weights given for adapters {extra} that are not being merged {names}")
    return names, weights


@torch.no_grad()
def merged_deltas(
    model: nn.Module,
    names: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """``delta W`` (fp32, this rank's shard) per adapted linear name, by concatenating the
    adapters ``names`` (default: all) weighted by ``weights[name]`` (default: each adapter's
    ``multiplier``)."""
    names, weights = _selected(model, names, weights)
    per_linear: dict[str, list] = {}
    for path, adapter_name, adapter in iter_adapters(model):
        if adapter_name in names:
            per_linear.setdefault(path, []).append((adapter_name, adapter))
    deltas = {}
    for path, adapters in per_linear.items():
        scaled_b, a = [], []
        for adapter_name, adapter in adapters:
            weight = weights.get(adapter_name, adapter.multiplier)
            scaled_b.append(weight * adapter.config.scale * adapter.effective_B().float())
            a.append(adapter.current_A(adapter.B.device, torch.float32).float())
        deltas[path] = torch.cat(scaled_b, dim=1) @ torch.cat(a, dim=0)  # [m_local, n_local]
    return deltas


@torch.no_grad()
def merge_adapters(
    model: nn.Module,
    names: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
) -> None:
    """Add the concatenated adapters ``names`` (default: all) into the base weights, then
    detach them: the model computes what it computed with those adapters enabled at
    multipliers ``weights`` (default: their current multipliers)."""
    names, weights = _selected(model, names, weights)
    for path, delta in merged_deltas(model, names, weights).items():
        weight = model.get_submodule(path).weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    for name in names:
        remove_adapters(model, name)


def export_merged_hf(
    model: nn.Module,
    directory: str | Path,
    names: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    **export_kwargs,
) -> None:
    """Collective: write our LLaMA with the adapters merged as a Hugging Face directory,
    leaving ``model`` (and its adapters) unchanged. ``export_kwargs`` go to
    :func:`actcomp_dist.models.hf.export_hf` (``dtype``, ``base_directory``, ...)."""
    from actcomp_dist.models.hf import export_hf

    deltas = {f"{path}.weight": d for path, d in merged_deltas(model, names, weights).items()}

    def merged(parameter_name: str, tensor: torch.Tensor) -> torch.Tensor:
        delta = deltas.get(parameter_name)
        if delta is None:
            return tensor
        return (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)

    export_hf(model, directory, local_tensor=merged, **export_kwargs)
