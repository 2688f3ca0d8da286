"""The single-device compressed linear autograd function, :func:`recompute_in_backward`
(keep a cheap function's input instead of its output; the memory-efficient block uses it), and
:func:`checkpoint_from_kept` / :func:`checkpoint_sublayer` (re-run a block or a pre-norm
sublayer in backward from a kept or packed input: packed full checkpointing, sublayer
checkpointing and the ``recompute`` storage policies).

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


def record_forward_state(ctx, like: torch.Tensor) -> None:
    """Remember the autocast state and the RNG streams (CPU and ``like``'s device) a forward
    runs with, on ``ctx``, so that a re-run in backward (:func:`as_in_forward`) computes what
    it computed and draws what it drew (an adapter's dropout), as torch.utils.checkpoint's
    ``preserve_rng_state`` does."""
    device = like.device.type
    ctx.autocast = (
        (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if torch.amp.is_autocast_available(device)
        else None
    )
    ctx.cpu_rng = torch.get_rng_state()
    ctx.device_rng = (
        torch.get_device_module(device).get_rng_state(like.device)
        if device not in ("cpu", "meta")
        else None
    )
    ctx.device = like.device


@contextlib.contextmanager
def as_in_forward(ctx):
    """Grad enabled, with the autocast state and RNG streams :func:`record_forward_state` kept;
    the global RNG streams are restored afterwards."""
    device = ctx.device.type
    devices = [ctx.device] if ctx.device_rng is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device):
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.device_rng is not None:
            torch.get_device_module(device).set_rng_state(ctx.device_rng, ctx.device)
        autocast = contextlib.nullcontext()
        if ctx.autocast is not None:
            autocast_device, enabled, dtype = ctx.autocast
            autocast = torch.autocast(autocast_device, dtype=dtype, enabled=enabled)
        with torch.enable_grad(), autocast:
            yield


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
        # RNG state as torch.utils.checkpoint preserves it (the block draws nothing today).
        record_forward_state(ctx, x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept = ctx.saved_tensors
        x_hat = kept[0] if ctx.packer is None else ctx.packer.unpack(kept, ctx.x_like)
        x_hat = x_hat.detach()
        x_hat.requires_grad_(ctx.needs_input_grad[3])
        with as_in_forward(ctx):
            out = ctx.run(x_hat, *ctx.args)
        # Parameters accumulate their gradients here, as in Megatron's and DeepSpeed's
        # (reentrant) checkpointing: partitioned (ZeRO-3) parameters are never Function inputs.
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        return None, None, None, x_hat.grad, None, *(None for _ in kept)


def checkpoint_from_kept(run, packer, x: torch.Tensor, args: tuple, kept) -> torch.Tensor:
    """``run(x, *args)`` keeping only the tensors ``kept`` for backward: ``x`` itself (``packer``
    ``None``) or ``packer``'s packed ``x``; backward rebuilds ``x`` from them, re-runs ``run``
    under autograd and backpropagates through the re-run (reentrant: the parameters ``run``
    reads accumulate their ``.grad`` there, as in Megatron's and DeepSpeed's checkpointing).
    ``args`` need no gradient (the RoPE tables)."""
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        raise ValueError("activation checkpointing: only the kept input may need a gradient")
    # A leaf that needs a gradient, so that backward runs (and reaches the parameters) even
    # when x does not need one (frozen embeddings).
    dummy = torch.empty((), device=x.device, requires_grad=True)
    return _CheckpointFromKept.apply(run, packer, args, x, dummy, *kept)


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
        return checkpoint_from_kept(run, None, y, (), (y,))
    packer, packed = stored
    return checkpoint_from_kept(run, packer, y, (), packed)
