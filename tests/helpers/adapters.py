"""Adapter weights that make a wrong adapter path visible."""

from __future__ import annotations

import torch
from torch import nn

from actcomp_dist.adapters import iter_adapters


@torch.no_grad()
def randomize_adapters(model: nn.Module, name: str | None = None, seed: int = 0) -> None:
    """Non-zero B (and A for LoRA) drawn per logical tensor, so any TP size gets the same.

    An adapter's B starts at zero, so its output (and A's gradient) would be zero and hide a
    wrong A, a wrong scale or a wrong input; ``name``: only the adapters of that name."""
    generator = torch.Generator().manual_seed(seed)
    for _, _, adapter in iter_adapters(model, name):
        adapter.B.copy_(0.1 * torch.randn(adapter.B.shape, generator=generator))
        if isinstance(adapter.A, nn.Parameter):
            adapter.A.add_(0.05 * torch.randn(adapter.A.shape, generator=generator))
