"""Measured saved-activation bytes of one micro-batch, split by layer kind.

The same counter the trainer uses (:class:`actcomp_dist.memory.SavedTensorCounter`), with
module tracking: every saved tensor is charged to the innermost module whose forward saved it,
and module names are mapped to kinds by :func:`actcomp_dist.models.kinds.module_kind`
(``layers.3.mlp.fc1`` -> ``fc1``), so the measurement and the analytic model
(:func:`actcomp_dist.memory_model.predict_saved_activations`) are compared kind by kind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from actcomp_dist.memory import SavedTensorCounter
from actcomp_dist.models.kinds import module_kind


@dataclass
class SavedBytes:
    total: int
    by_kind: dict[str, int]
    per_layer: list[int]  # bytes charged to each decoder block


def masked_mean_loss(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The trainer's loss of a micro-batch (sum of masked per-token losses / mask count)."""
    return losses.sum() / loss_mask.sum().clamp(min=1)


def measure_saved_bytes(
    model: nn.Module,
    forward: Callable[[], Any],
    num_layers: int,
) -> SavedBytes:
    """Run ``forward()`` (one micro-batch's forward, graph discarded afterwards) and count what
    it saves for backward, attributed to the modules of ``model`` (a ``LlamaModel``)."""
    with torch.enable_grad(), SavedTensorCounter(track_modules=model) as counter:
        forward()
    by_kind: dict[str, int] = defaultdict(int)
    per_layer = [0] * num_layers
    for name, nbytes in counter.by_module.items():
        by_kind[module_kind(name)] += nbytes
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "layers":
            per_layer[int(parts[1])] += nbytes
    return SavedBytes(counter.total_bytes, dict(by_kind), per_layer)


def measure_model_forward(model: nn.Module, tokens, labels, loss_mask) -> SavedBytes:
    """:func:`measure_saved_bytes` of the trainer's forward of ``model`` on one micro-batch."""
    return measure_saved_bytes(
        model,
        lambda: masked_mean_loss(model(tokens, labels, loss_mask), loss_mask),
        len(model.layers),
    )
