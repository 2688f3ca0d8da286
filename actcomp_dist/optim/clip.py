"""Global gradient-norm clipping over ordinary and compressed (subspace) gradients.

One norm over everything a step updates: ``.grad`` of ordinary parameters and
the m x r gradient of subspace parameters (``weight.subspace.grad``), so a single ``max_norm`` governs the step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from actcomp_dist.subspace import subspace_state


def gradients(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in parameters:
        state = subspace_state(p)
        grad = state.grad if state is not None else p.grad
        if grad is not None:
            out.append(grad)
    return out


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale all gradients so their joint L2 norm is at most ``max_norm``; returns the norm
    before clipping. With ``process_group`` the squared norms of the local shards are summed
    over it (pass the tensor-parallel group for TP-sharded weights; replicated ones must then be
    passed on one rank only, and so must the weight of a dense row-parallel ``compact`` layer
    in ``subspace`` mode: its m x r gradient is the same on every TP rank)."""
    grads = gradients(parameters)
    if grads:
        squared = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    else:
        squared = torch.zeros(())
    if process_group is not None:
        dist.all_reduce(squared, group=process_group)
    total = squared.sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device, g.dtype))
    return total
