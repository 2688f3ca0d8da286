"""The single-device compressed linear autograd function.

Forward computes the output with the same call ``nn.Linear`` makes (so outputs are
bit-identical) and saves only what the compressor returns. Backward computes the exact input
gradient ``dX = g W`` and the compressed weight gradient ``G_hat = g^T T``; in ``lift`` mode it
returns ``lift(G_hat)`` as the weight's gradient, in ``subspace`` mode it accumulates ``G_hat``
on ``weight.compressed_grad`` (the weight's ``.grad`` stays ``None``).

The seeds the basis was built from are stored in the context at forward time and used in
backward; nothing is re-read from the schedule (that would break gradient accumulation across
an optimizer step and recompute inside activation checkpointing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actcomp_dist.compression.base import Compressor


def accumulate_compressed_grad(
    weight: torch.nn.Parameter, ghat: torch.Tensor, seeds: tuple[int, ...]
) -> None:
    """Add ``ghat`` [m, r] to ``weight.compressed_grad``; every micro-batch of a step must have
    used the same projection (same seeds), otherwise the sum would mix subspaces."""
    ghat = ghat.to(weight.dtype)
    if weight.compressed_grad is None:
        weight.compressed_grad = ghat
        weight.compressed_grad_seeds = seeds
        return
    if weight.compressed_grad_seeds != seeds:
        raise RuntimeError(
            "gradients of one optimizer step were computed with different projections; advance "
            "the CompressionSchedule only once per optimizer step, after the step"
        )
    weight.compressed_grad.add_(ghat)


class CompressedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compressor: Compressor, subspace: bool):
        out = F.linear(x, weight, bias)
        packed = compressor.compress(x.reshape(-1, x.shape[-1]))
        ctx.save_for_backward(weight, packed.tokens, *packed.basis)
        ctx.compressor = compressor
        ctx.seeds = packed.seeds
        ctx.subspace = subspace
        ctx.weight = weight  # the Parameter itself, for subspace accumulation (not a copy)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, tokens, *basis = ctx.saved_tensors
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
