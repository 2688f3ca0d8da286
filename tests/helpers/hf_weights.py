"""Weights for tiny transformers models that make wrong wiring visible."""

import torch


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Matrices at std 1/sqrt(fan-in), vectors (norm weights) at 1 + 0.2 N(0, 1), from a
    generator seeded with ``seed``: the logits are far from uniform and the norms far from 1, so
    a wrongly loaded or wrongly patched weight cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            else:
                fan_in = parameter.shape[-1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
