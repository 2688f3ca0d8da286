"""Activation checkpointing (recompute) that composes with compressed activations.

Applied after the model is built and tensor-parallelised, before the engine wraps it:

- ``full``: each selected decoder block keeps only its input; backward re-runs the block.
  Inside the recompute the compressed layers save their compressed tensors again, so the
  transient memory of the recompute is small too.
- ``selective``: blocks keep their linear inputs (compressed where compression is on) but
  recompute the cheap, memory-hungry parts: RMSNorm outputs, the attention core (RoPE +
  scaled-dot-product attention) and the SwiGLU product. The model marks those parts
  (``LlamaDecoderLayer.recompute``). With the memory-efficient block (``efficient_ops``, the
  default) only the attention core is recomputed: its norms and SwiGLU already keep one tensor
  that a consumer keeps anyway, and recomputing them would keep their input besides.
- ``num_layers``: only the first N blocks are checkpointed (``None`` = all).

It uses ``torch.utils.checkpoint`` in its non-reentrant form: the RNG state is restored on
recompute (dropout would draw the same masks), and compression seeds come from the values
stored at forward time (the schedule only advances after an optimizer step), so a recompute
rebuilds exactly the same projection. The model's compression schedule also replays its
per-call counter (``context_fn=schedule.checkpoint_context``), so methods that draw afresh in
every call (``lowrank``) redraw in the recompute exactly what the forward drew.

Non-reentrant checkpointing keeps the block's inputs alive through a closure, where
``saved_tensors_hooks`` cannot see them. :func:`checkpoint_with_accounting` therefore also
routes them through :class:`_KeepForBackward`, an identity whose only effect is to save its
input in the autograd graph: it costs no memory (same storage) and makes the bytes visible to
:func:`actcomp_dist.memory.saved_activation_bytes`: checkpointing code that stashes tensors
outside autograd's saved tensors would escape the count.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from actcomp_dist.layers import find_schedule


class _KeepForBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def checkpoint_with_accounting(fn, *args, context_fn=noop_context_fn):
    """``fn(*args)`` recomputed in backward; tensor inputs are visible to saved-bytes counters.
    ``context_fn``: as ``torch.utils.checkpoint``'s (the model's schedule replays its per-call
    counter with it)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    args = tuple(
        _KeepForBackward.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a
        for a in args
    )
    return checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn
    )


def apply_activation_checkpointing(model: nn.Module, mode: str, num_layers: int | None) -> int:
    """Checkpoint the first ``num_layers`` blocks of ``model.layers``; returns how many."""
    if mode == "none":
        return 0
    layers = list(model.layers)
    count = len(layers) if num_layers is None else min(num_layers, len(layers))
    schedule = find_schedule(model)
    run = functools.partial(
        checkpoint_with_accounting,
        context_fn=noop_context_fn if schedule is None else schedule.checkpoint_context,
    )
    for layer in layers[:count]:
        if mode == "full":
            layer.forward = functools.partial(run, layer.forward)
        elif mode == "selective":
            layer.recompute = run
        else:
            raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    return count
