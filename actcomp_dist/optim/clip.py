"""Gradient-norm clipping: global over ordinary and compressed (subspace) gradients, or per
parameter tensor.

Global (:func:`clip_grad_norm_`): one norm over everything a step updates: ``.grad`` of
ordinary parameters and the m x r gradient of subspace parameters (``weight.subspace.grad``),
so a single ``max_norm`` governs the step.

Per parameter (:func:`clip_grad_norm_per_parameter_`, ``train.clip_grad_scope='parameter'``):
each parameter tensor's gradient is scaled to norm at most ``max_norm`` on its own, as LoRI's
released training code does (each adapter matrix has its own AdamW, which calls
``clip_grad_norm_(p, max_grad_norm)`` on that one tensor's masked gradient, ``max_grad_norm=1``
in every published script). The norm is the logical tensor's: a tensor-parallel shard's squared
norm is summed over the TP group (one all-reduce of one value per sharded tensor, batched).
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


def is_tensor_parallel_shard(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` holds this rank's part of a tensor split over the TP group:
    Megatron's attribute ``tensor_model_parallel``, on its layers' sharded weights and on the
    adapters' sharded factors (:func:`actcomp_dist.adapters.base.mark_tensor_parallel`), the
    attribute DeepSpeed's and Megatron's global norms read too."""
    return bool(getattr(parameter, "tensor_model_parallel", False))


@torch.no_grad()
def clip_grad_norm_per_parameter_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    tensor_parallel_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale each parameter's gradient so that its own L2 norm (the whole tensor's, over the
    shards of ``tensor_parallel_group``) is at most ``max_norm``, with torch's rule
    ``min(1, max_norm / (norm + 1e-6))``. Collective over the group when some parameter is a
    TP shard (every rank of it must pass the same parameters in the same order). Returns the
    norms before clipping (fp32, one per parameter with a gradient)."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.zeros(0)
    squared = torch.stack([p.grad.float().pow(2).sum() for p in with_grad])
    sharded = torch.tensor([is_tensor_parallel_shard(p) for p in with_grad])
    if tensor_parallel_group is not None and dist.get_world_size(tensor_parallel_group) > 1:
        if bool(sharded.any()):
            partial = squared[sharded.to(squared.device)].clone()
            dist.all_reduce(partial, group=tensor_parallel_group)
            squared[sharded.to(squared.device)] = partial
    norms = squared.sqrt()
    if max_norm > 0:
        scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, scale in zip(with_grad, scales, strict=True):
            p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
    return norms
