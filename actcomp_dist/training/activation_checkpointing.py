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
- ``full`` with ``memory.policy.block_input`` ``int8`` / ``fp8`` / ``lowrank:R``: each
  checkpointed block keeps its input *packed* (:func:`checkpoint_packed_input`; ``lowrank:R``
  is LoRAct's layer mode). Any other mode with a packed ``block_input`` is refused.
- ``sublayer`` (pre-norm sublayer checkpointing; needs ``efficient_ops``): each block keeps
  its two norms' saved tensors only: the attention sublayer (qkv, core, proj) and the MLP
  sublayer (fc1, SwiGLU, fc2) are re-run in backward from the norm output the norm keeps
  anyway (:func:`actcomp_dist.autograd.checkpoint_sublayer`). With ``memory.policy.norm:
  lowrank:R`` that is LoRAct's pre-norm sublayer mode: one factorisation of each norm output
  serves the norm and the recomputed sublayer.
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

from actcomp_dist.autograd import checkpoint_from_kept, checkpoint_sublayer
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


def checkpoint_packed_input(run, packer, x: torch.Tensor, *args):
    """``run(x, *args)`` keeping only ``packer.pack(x)`` for backward; backward re-runs
    ``run`` on ``x_hat = packer.unpack(...)`` and backpropagates through the re-run (into
    the parameters ``run`` reads, which accumulate ``.grad`` there, and into ``x``). ``args``
    are passed as they are (the RoPE tables: no gradient flows into them).

    The gradient rule, LoRAct's layer mode (Shi et al., arXiv 2509.23472; its released code
    checkpoints a decoder layer and keeps the compressed hidden states): a pre-norm block is
    ``y = x + F(x)``. Forward computes ``y`` from the exact ``x``, so the loss and every later
    block are untouched. Backward evaluates every gradient *inside* the block at the
    reconstruction: the weight gradients are those of ``F`` at ``x_hat`` and the input
    gradient is ``g + J_F(x_hat)^T g``. The identity branch is exact: the residual add is
    linear, so its vector-Jacobian product is ``g`` wherever it is evaluated; only the branch
    through ``F`` sees the reconstruction error. (The alternative, a reconstruction error that
    also reaches the identity path, would corrupt the residual-stream gradient that every
    earlier block reads; no method does that.) With ``packer`` an 8-bit quantizer the same
    rule holds at the dequantised input.
    """
    if not torch.is_grad_enabled():
        return run(x, *args)
    with torch.no_grad():
        packed = packer.pack(x)
    return checkpoint_from_kept(run, packer, x, args, packed)


def apply_activation_checkpointing(model: nn.Module, mode: str, num_layers: int | None) -> int:
    """Checkpoint the first ``num_layers`` blocks of ``model.layers``; returns how many.

    A model with a packed ``memory.policy.block_input`` (``model.storage_policy``) needs
    ``mode == "full"``; its checkpointed blocks keep the packed input."""
    policy = getattr(model, "storage_policy", None)
    packer = policy.packer("block_input") if policy is not None else None
    if mode == "sublayer" and not getattr(model, "efficient_ops", True):
        raise ValueError(
            "activation_checkpointing.mode='sublayer' keeps each sublayer's input as the norm "
            "keeps it: it needs memory.efficient_ops=true (the naive norm keeps its input)"
        )
    if packer is not None and mode != "full":
        raise ValueError(
            f"memory.policy.block_input={policy.block_input!r} packs the input that full "
            f"checkpointing keeps; it needs activation_checkpointing.mode='full', got {mode!r}"
        )
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
        if mode == "full" and packer is not None:
            layer.forward = functools.partial(checkpoint_packed_input, layer.forward, packer)
        elif mode == "full":
            layer.forward = functools.partial(run, layer.forward)
        elif mode == "selective":
            layer.recompute = run
        elif mode == "sublayer":
            layer.checkpoint_sublayer = checkpoint_sublayer
        else:
            raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    return count
