"""The single-device compressed linear autograd function, and :func:`recompute_in_backward`
(keep a cheap function's input instead of its output; the memory-efficient block uses it).

Forward computes the output with the same call ``nn.Linear`` makes (so outputs are
bit-identical; under ``torch.autocast`` after the same casts autocast applies to
``nn.Linear``) and saves only what the compressor returns. Backward computes the exact input
gradient ``dX = g W`` and the compressed weight gradient ``G_hat = g^T T``; in ``lift`` mode it
returns ``lift(G_hat)`` as the weight's gradient, in ``subspace`` mode it accumulates ``G_hat``
on the weight's :class:`~actcomp_dist.subspace.SubspaceState` (``weight.subspace.grad``; the
weight's ``.grad`` stays ``None``).

The seeds the basis was built from are stored in the context at forward time and used in
backward; nothing is re-read from the schedule (that would break gradient accumulation across
an optimizer step and recompute inside activation checkpointing).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from actcomp_dist.compression.base import Compressor
from actcomp_dist.subspace import subspace_state


def accumulate_compressed_grad(
    weight: torch.nn.Parameter, ghat: torch.Tensor, seeds: tuple[int, ...]
) -> None:
    """Add ``ghat`` [m, r], formed with the projection of ``seeds``, to the weight's
    :class:`~actcomp_dist.subspace.SubspaceState` (see :meth:`SubspaceState.accumulate`)."""
    subspace_state(weight).accumulate(ghat, seeds)


class CompressedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compressor: Compressor, subspace: bool):
        device_type = x.device.type
        compute_weight, autocast_off = weight, contextlib.nullcontext()
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # Autocast does not reach into backward, so cast here exactly as autocast casts
            # nn.Linear's inputs and run with autocast off: the output matches nn.Linear's
            # under autocast, the saved tensors are in the autocast dtype, and backward sees
            # one dtype throughout (autograd casts the returned gradients to the inputs').
            dtype = torch.get_autocast_dtype(device_type)
            x, compute_weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            autocast_off = torch.autocast(device_type, enabled=False)
        with autocast_off:
            out = F.linear(x, compute_weight, bias)
            packed = compressor.compress(x.reshape(-1, x.shape[-1]))
        # The parameter, not its cast copy: no m x n activation is kept alive for backward.
        ctx.save_for_backward(weight, packed.tokens, *packed.basis)
        ctx.compute_dtype = x.dtype
        ctx.compressor = compressor
        ctx.seeds = packed.seeds
        ctx.subspace = subspace
        ctx.weight = weight  # the Parameter itself, for subspace accumulation (not a copy)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, tokens, *basis = ctx.saved_tensors
        weight = weight.to(ctx.compute_dtype)  # no-op unless forward ran under autocast
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)  # exact: dX never needs X
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, m]
        if ctx.needs_input_grad[1]:
            ghat = g2d.t().matmul(tokens)  # [m, c]
            if ctx.subspace:
                accumulate_compressed_grad(ctx.weight, ghat, ctx.seeds)
            else:
                grad_w = ctx.compressor.lift(ghat, tuple(basis), ctx.seeds)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _RecomputeInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, source, storage):
        ctx.fn, ctx.storage = fn, storage
        if storage is None:
            ctx.save_for_backward(source)
        else:
            ctx.save_for_backward(*storage.pack(source))
            ctx.source_like = torch.empty_like(source, device="meta")
        return fn(source)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.storage is None:
            (source,) = ctx.saved_tensors
        else:
            source = ctx.storage.unpack(ctx.saved_tensors, ctx.source_like)
        with torch.enable_grad():
            source = source.detach().requires_grad_(True)
            out = ctx.fn(source)
        (grad_source,) = torch.autograd.grad(out, source, grad_out)
        return None, grad_source, None


def recompute_in_backward(fn, source: torch.Tensor, storage=None) -> torch.Tensor:
    """``fn(source)``, keeping only ``source`` for backward: backward re-runs ``fn`` on it and
    backpropagates through the re-run (the same ops, hence the same gradient bit for bit).

    ``fn`` must be a pure, deterministic function of one tensor without parameters (e.g. the
    SwiGLU product of ``[gate | up]``). Unlike ``torch.utils.checkpoint`` the kept tensor goes
    through ``save_for_backward``, so saved-tensor hooks (and the byte counters built on them)
    see it, and nothing about RNG state is stored. ``storage``: keep ``source`` packed by
    this 8-bit quantizer (:mod:`actcomp_dist.storage`) and re-run ``fn`` on its dequantised
    copy.
    """
    if not (torch.is_grad_enabled() and source.requires_grad):
        return fn(source)
    return _RecomputeInBackward.apply(fn, source, storage)
