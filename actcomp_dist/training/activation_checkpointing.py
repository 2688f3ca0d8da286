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
- ``sublayer`` (pre-norm sublayer checkpointing; needs ``efficient_ops``): each block keeps
  its two norms' saved tensors only: the attention sublayer (qkv, core, proj) and the MLP
  sublayer (fc1, SwiGLU, fc2) are re-run in backward from the norm output the norm keeps
  anyway (:func:`checkpoint_sublayer`). With ``memory.policy.norm: lowrank:R`` that is
  LoRAct's pre-norm sublayer mode: one factorisation of each norm output serves the norm and
  the recomputed sublayer.
- ``num_layers``: only the first N blocks are checkpointed (``None`` = all).
- ``full`` with ``memory.policy.block_input`` ``int8`` / ``fp8`` / ``lowrank:R``: each
  checkpointed block keeps its input *packed* (:func:`checkpoint_packed_input`; ``lowrank:R``
  is LoRAct's layer mode). Any other mode with a packed ``block_input`` is refused.

It uses ``torch.utils.checkpoint`` in its non-reentrant form: the RNG state is restored on
recompute (dropout would draw the same masks), and compression seeds come from the values
stored at forward time (the schedule only advances after an optimizer step), so a recompute
rebuilds exactly the same projection.

Non-reentrant checkpointing keeps the block's inputs alive through a closure, where
``saved_tensors_hooks`` cannot see them. :func:`checkpoint_with_accounting` therefore also
routes them through :class:`_KeepForBackward`, an identity whose only effect is to save its
input in the autograd graph: it costs no memory (same storage) and makes the bytes visible to
:func:`actcomp_dist.memory.saved_activation_bytes`: checkpointing code that stashes tensors
outside autograd's saved tensors would escape the count.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _KeepForBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def checkpoint_with_accounting(fn, *args):
    """``fn(*args)`` recomputed in backward; tensor inputs are visible to saved-bytes counters."""
    if not torch.is_grad_enabled():
        return fn(*args)
    args = tuple(
        _KeepForBackward.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a
        for a in args
    )
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


class _CheckpointFromKept(torch.autograd.Function):
    """``run(x, *args)`` in forward keeping only ``kept`` (``x`` itself when ``packer`` is
    ``None``, else ``packer``'s packed ``x``); backward re-runs ``run`` on ``x`` rebuilt from
    ``kept``."""

    @staticmethod
    def forward(ctx, run, packer, args, x, _dummy, *kept):
        out = run(x, *args)  # autograd records nothing inside Function.forward
        ctx.save_for_backward(*kept)
        ctx.run, ctx.packer, ctx.args = run, packer, args
        ctx.x_like = torch.empty_like(x, device="meta")
        device = x.device.type
        ctx.autocast = (
            (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            if torch.amp.is_autocast_available(device)
            else None
        )
        # RNG state as torch.utils.checkpoint preserves it (the block draws nothing today).
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = (x.device, torch.cuda.get_rng_state(x.device)) if x.is_cuda else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept = ctx.saved_tensors
        x_hat = kept[0] if ctx.packer is None else ctx.packer.unpack(kept, ctx.x_like)
        x_hat = x_hat.detach()
        x_hat.requires_grad_(ctx.needs_input_grad[3])
        devices = [ctx.cuda_rng[0]] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng[1], ctx.cuda_rng[0])
            autocast = contextlib.nullcontext()
            if ctx.autocast is not None:
                device, enabled, dtype = ctx.autocast
                autocast = torch.autocast(device, dtype=dtype, enabled=enabled)
            with torch.enable_grad(), autocast:
                out = ctx.run(x_hat, *ctx.args)
        # Parameters accumulate their gradients here, as in Megatron's and DeepSpeed's
        # (reentrant) checkpointing: partitioned (ZeRO-3) parameters are never Function inputs.
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        return None, None, None, x_hat.grad, None, *(None for _ in kept)


def _checkpoint_from_kept(run, packer, x, args, kept):
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        raise ValueError("activation checkpointing: only the kept input may need a gradient")
    # A leaf that needs a gradient, so that backward runs (and reaches the parameters) even
    # when x does not need one (frozen embeddings).
    dummy = torch.empty((), device=x.device, requires_grad=True)
    return _CheckpointFromKept.apply(run, packer, args, x, dummy, *kept)


def checkpoint_packed_input(run, packer, x: torch.Tensor, *args):
    """``run(x, *args)`` keeping only ``packer.pack(x)`` for backward; backward re-runs
    ``run`` on ``x_hat = packer.unpack(...)`` and backpropagates through the re-run (into
    the parameters ``run`` reads, which accumulate ``.grad`` there, and into ``x``). ``args`` are passed as they are (the RoPE tables: no
    gradient flows into them).

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
    return _checkpoint_from_kept(run, packer, x, args, packed)


def checkpoint_sublayer(run, y: torch.Tensor) -> torch.Tensor:
    """``run(y)``, a pre-norm sublayer (attention or MLP) on its norm's output ``y``, keeping
    for backward only what the norm keeps of ``y``: ``y`` itself (the same storage), or under a
    packed ``memory.policy.norm`` the *same* packed tensors the norm keeps (``y.stored_as``;
    LoRAct's factors ``(L, Q)`` or 8-bit codes and scales). Backward re-runs the sublayer on
    ``y`` or ``y_hat = unpack(...)`` and backpropagates through the re-run.

    With ``norm: lowrank:R`` this is LoRAct's pre-norm sublayer checkpointing (its released
    code checkpoints ``self_attn`` and ``mlp`` with their compressed input and caches the norm's
    factorisation so that one factorisation serves both): one factorisation of each norm output
    serves the norm's backward (``x_hat = y_hat / weight``) and the recomputed sublayer, whose
    every gradient is evaluated at ``y_hat``; the residual stream around the sublayer is never
    stored, and its identity branch is exact (the norm's input gradient adds to ``g``).
    """
    if not torch.is_grad_enabled():
        return run(y)
    stored = getattr(y, "stored_as", None)
    if stored is None:
        return _checkpoint_from_kept(run, None, y, (), (y,))
    packer, packed = stored
    return _checkpoint_from_kept(run, packer, y, (), packed)


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
    for layer in layers[:count]:
        if mode == "full" and packer is not None:
            layer.forward = functools.partial(checkpoint_packed_input, layer.forward, packer)
        elif mode == "full":
            layer.forward = functools.partial(checkpoint_with_accounting, layer.forward)
        elif mode == "selective":
            layer.recompute = checkpoint_with_accounting
        elif mode == "sublayer":
            layer.checkpoint_sublayer = checkpoint_sublayer
        else:
            raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    return count
