"""Autograd functions behind the patched Hugging Face MLP: SwiGLU that keeps ``gate`` and ``up``.

A Hugging Face MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` and keeps, per
token, ``gate`` (for SiLU), ``silu(gate)`` and ``up`` (for the product) and the product ``h``
(for ``down_proj``'s weight gradient, or PEFT LoRA A's): four intermediate-sized tensors. The
functions here keep ``gate`` and ``up`` only (packed by an 8-bit quantizer of
:mod:`actcomp_dist.storage` when the ``swiglu`` policy asks) and recompute ``h`` in backward:

- :func:`swiglu_linear`: ``down_proj`` is a plain trainable ``nn.Linear``. One function
  computes ``F.linear(silu(gate) * up, W, b)``; backward recomputes ``h`` once and forms the
  weight gradient ``g^T h`` and the input gradient ``g W`` in closed form (the same products
  autograd's linear backward forms), then backpropagates through a re-run of the SwiGLU.
  No extra matmul.
- :func:`swiglu`: ``down_proj`` keeps nothing of its input (a frozen ``nn.Linear``, a
  compressing ``CompressedLinear``, a LoRA layer whose A is compressed): only the product is
  recomputed, ``down_proj`` is called as usual.
- A plain PEFT LoRA ``down_proj`` with ``gate`` / ``up`` kept as they are
  (:mod:`.policy`): the frozen base reads :func:`swiglu`'s product, LoRA A reads
  :func:`swiglu_linear` (the same two kept tensors).
- :func:`swiglu_then`: any other ``down_proj`` (LoRA with dropout or packed storage, other
  adapter types): forward runs ``down_proj(swiglu(gate, up))`` without autograd; backward re-runs it
  under autograd (same RNG state and autocast state, as reentrant activation checkpointing
  does) and backpropagates, accumulating the adapter's parameter gradients. Costs one more
  forward of ``down_proj``. Like reentrant checkpointing, parameter gradients arrive through
  ``.backward()``, not ``torch.autograd.grad``.

Every kept tensor goes through ``save_for_backward``, so saved-tensor hooks (the byte counter
of :mod:`actcomp_dist.memory`, HF's non-reentrant checkpointing) see exactly what is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from actcomp_dist.autograd import as_in_forward, record_forward_state
from actcomp_dist.models.efficient_ops import stored_rms_norm
from actcomp_dist.storage import Quantizer, load_packed, save_packed


def swiglu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the ops of a Hugging Face Llama MLP (``ACT2FN["silu"]``)."""
    return F.silu(gate) * up


def _save(ctx, storage: Quantizer | None, *tensors: torch.Tensor) -> None:
    ctx.storage = storage
    if storage is None:
        ctx.save_for_backward(*tensors)
    else:
        save_packed(ctx, storage, tensors)


def _load(ctx) -> list[torch.Tensor]:
    """The kept tensors (dequantised), detached and requiring grad for a re-run."""
    tensors = list(ctx.saved_tensors) if ctx.storage is None else load_packed(ctx)[0]
    return [t.detach().requires_grad_(True) for t in tensors]


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, storage):
        _save(ctx, storage, gate, up)
        return swiglu_product(gate, up)

    @staticmethod
    def backward(ctx, grad_h):
        gate, up = _load(ctx)
        with torch.enable_grad():
            h = swiglu_product(gate, up)
        grad_gate, grad_up = torch.autograd.grad(h, (gate, up), grad_h)
        return grad_gate, grad_up, None


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, storage):
        h = swiglu_product(gate, up)  # [..., intermediate]
        out = F.linear(h, weight, bias)  # under autocast: in the autocast dtype
        _save(ctx, storage, gate, up)
        ctx.weight, ctx.has_bias = weight, bias is not None
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = _load(ctx)
        weight = ctx.weight
        with torch.enable_grad():
            h = swiglu_product(gate, up)
        dtype = ctx.compute_dtype  # the dtype forward's linear ran in (autocast or not)
        grad_out = grad_out.to(dtype)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            h2d = h.detach().to(dtype).reshape(-1, h.shape[-1])  # [N, intermediate]
            grad_weight = g2d.t().matmul(h2d).to(weight.dtype)  # [out, intermediate]
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g2d.sum(0).to(weight.dtype)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_h = grad_out.matmul(weight.to(dtype)).to(h.dtype)  # [..., intermediate]
            grad_gate, grad_up = torch.autograd.grad(h, (gate, up), grad_h)
        return grad_gate, grad_up, grad_weight, grad_bias, None


class _SwiGLUAndLinears(torch.autograd.Function):
    """``h = silu(gate) * up`` and ``F.linear(h, W_i, b_i)`` for each ``(W_i, b_i)``, keeping
    ``gate`` and ``up`` once (packed by ``storage``): the frozen base of a PEFT LoRA
    ``down_proj`` reads ``h`` (keeping nothing), every adapter's A reads it too."""

    @staticmethod
    def forward(ctx, gate, up, storage, *weights_and_biases):
        h = swiglu_product(gate, up)  # [..., intermediate]
        pairs = list(zip(weights_and_biases[::2], weights_and_biases[1::2], strict=True))
        outs = [F.linear(h, weight, bias) for weight, bias in pairs]
        _save(ctx, storage, gate, up)
        ctx.pairs = pairs
        ctx.compute_dtypes = [out.dtype for out in outs]
        return h, *outs

    @staticmethod
    def backward(ctx, grad_h, *grad_outs):
        gate, up = _load(ctx)
        with torch.enable_grad():
            h = swiglu_product(gate, up)
        grad_h = torch.zeros_like(h) if grad_h is None else grad_h.to(h.dtype)
        grads = []
        for (weight, bias), grad_out, dtype, needs_w, needs_b in zip(
            ctx.pairs,
            grad_outs,
            ctx.compute_dtypes,
            ctx.needs_input_grad[3::2],
            ctx.needs_input_grad[4::2],
            strict=True,
        ):
            if grad_out is None:
                grads += [None, None]
                continue
            grad_out = grad_out.to(dtype)
            g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
            h2d = h.detach().to(dtype).reshape(-1, h.shape[-1])  # [N, intermediate]
            grad_w = g2d.t().matmul(h2d).to(weight.dtype) if needs_w else None
            grad_b = g2d.sum(0).to(bias.dtype) if bias is not None and needs_b else None
            grads += [grad_w, grad_b]
            grad_h = grad_h + grad_out.matmul(weight.to(dtype)).to(h.dtype)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_gate, grad_up = torch.autograd.grad(h, (gate, up), grad_h)
        return grad_gate, grad_up, None, *grads


def swiglu_and_linears(
    gate: torch.Tensor,
    up: torch.Tensor,
    storage: Quantizer | None,
    linears: list[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, ...]:
    """``(h, F.linear(h, W_1, b_1), ...)`` with ``h = silu(gate) * up``, keeping ``gate`` and
    ``up`` once (packed by ``storage``); ``h``'s readers other than the ``linears`` must keep
    nothing of it (a frozen linear)."""
    flat = [t for pair in linears for t in pair]
    if not torch.is_grad_enabled():
        h = swiglu_product(gate, up)
        return h, *(F.linear(h, w, b) for w, b in linears)
    return _SwiGLUAndLinears.apply(gate, up, storage, *flat)


def _device_types(*tensors: torch.Tensor) -> list[str]:
    return sorted({t.device.type for t in tensors})


class _SwiGLUThen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, storage, gate, up):
        ctx.module = module
        _save(ctx, storage, gate, up)  # before the RNG state: packing may draw (lowrank)
        record_forward_state(ctx, gate)
        with torch.no_grad():
            return module(swiglu_product(gate, up))

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = _load(ctx)
        with as_in_forward(ctx):  # same RNG draws as forward (an adapter's dropout)
            out = ctx.module(swiglu_product(gate, up))
        torch.autograd.backward(out, grad_out)
        return None, None, gate.grad, up.grad


def swiglu(gate: torch.Tensor, up: torch.Tensor, storage: Quantizer | None) -> torch.Tensor:
    """``silu(gate) * up`` keeping ``gate`` and ``up`` (packed by ``storage``) only."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return swiglu_product(gate, up)
    return _SwiGLU.apply(gate, up, storage)


def swiglu_linear(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    storage: Quantizer | None,
) -> torch.Tensor:
    """``F.linear(silu(gate) * up, weight, bias)`` keeping ``gate`` and ``up`` only."""
    if not torch.is_grad_enabled():
        return F.linear(swiglu_product(gate, up), weight, bias)
    return _SwiGLULinear.apply(gate, up, weight, bias, storage)


def swiglu_then(
    module: Callable[[torch.Tensor], torch.Tensor],
    gate: torch.Tensor,
    up: torch.Tensor,
    storage: Quantizer | None,
) -> torch.Tensor:
    """``module(silu(gate) * up)`` keeping ``gate`` and ``up`` only; backward re-runs it."""
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return module(swiglu_product(gate, up))
    return _SwiGLUThen.apply(module, storage, gate, up)


# -- LoRAct's norm mode: the norm output kept once, as low-rank factors, for every consumer ----


def low_rank_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, storage: Quantizer
) -> torch.Tensor:
    """RMSNorm keeping ``rstd`` and LoRAct factors ``L``, ``Q`` of its output ``y`` (backward
    reads ``y ~= L Q^T``): :func:`actcomp_dist.models.efficient_ops.stored_rms_norm`, the
    norm of the project's own model. ``y`` carries the factors as ``y.lowrank_factors``, so a
    linear that reads ``y`` (:func:`factored_input_linear`) keeps the same two tensors, not
    ``y``."""
    if not torch.is_grad_enabled():
        return stored_rms_norm(x, weight, eps, storage)[0]
    y, factors = stored_rms_norm(x, weight, eps, storage)
    if factors is None:
        # Nothing below needs the norm's own gradient (the first norm under PEFT: frozen
        # embeddings and norm weight), but the LoRA A that read y still keep its factors.
        factors = storage.pack(y)
    y.lowrank_factors = factors
    return y


class _FactoredInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, low, q):
        out = F.linear(x, weight, bias)  # under autocast: in the autocast dtype
        ctx.save_for_backward(low, q)  # the norm's factors: the same storage, counted once
        ctx.weight, ctx.has_bias, ctx.compute_dtype = weight, bias is not None, out.dtype
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        low, q = ctx.saved_tensors
        weight, dtype = ctx.weight, ctx.compute_dtype
        grad_out = grad_out.to(dtype)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # g^T (L Q^T) = (g^T L) Q^T: never forms the [N, in] reconstruction.
            grad_weight = (g2d.t().matmul(low.to(dtype))).matmul(q.to(dtype).t())
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2d.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None


def factored_input_linear(x, weight, bias, factors):
    """``F.linear(x, weight, bias)`` whose weight gradient reads ``x ~= L Q^T`` from
    ``factors = (L, Q)`` (kept by the norm that produced ``x``) instead of keeping ``x``."""
    return _FactoredInputLinear.apply(x, weight, bias, *factors)


# -- LoRAct's layer and pre-norm sublayer modes: a module re-run from its kept input ----------


def _tensor_leaves(args: tuple, kwargs: dict):
    """``(args, kwargs)`` flattened: the tensor leaves, and a rebuild from new tensor leaves."""
    leaves, spec = tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def rebuild(tensors):
        full = list(leaves)
        for i, tensor in zip(positions, tensors, strict=True):
            full[i] = tensor
        return tree_unflatten(full, spec)

    return [leaves[i] for i in positions], rebuild


class _RecomputeFromKept(torch.autograd.Function):
    """``run(x, *args, **kwargs)`` keeping only ``kept`` (``x`` itself, or tensors ``x`` is
    reconstructed from); backward rebuilds ``x_hat = unpack(kept)``, re-runs ``run`` from it
    under autograd (same RNG and autocast state, as reentrant checkpointing does) and
    backpropagates: every gradient is the one at ``x_hat``."""

    @staticmethod
    def forward(ctx, run, unpack, rebuild, n_kept, x, _dummy, *kept_and_leaves):
        kept, leaves = kept_and_leaves[:n_kept], kept_and_leaves[n_kept:]
        ctx.run, ctx.unpack, ctx.rebuild, ctx.n_kept = run, unpack, rebuild, n_kept
        ctx.x_like = torch.empty_like(x, device="meta")
        ctx.x_requires_grad = x.requires_grad
        ctx.leaf_requires_grad = [t.requires_grad for t in leaves]
        record_forward_state(ctx, x)
        ctx.save_for_backward(*kept, *leaves)
        args, kwargs = rebuild(list(leaves))
        out = run(x, *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"recompute_from_kept: {run} returned {type(out).__name__}, not a tensor"
            )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        kept, leaves = saved[: ctx.n_kept], saved[ctx.n_kept :]
        x_hat = ctx.unpack(kept, ctx.x_like).detach().requires_grad_(ctx.x_requires_grad)
        leaves = [
            t.detach().requires_grad_(flag)
            for t, flag in zip(leaves, ctx.leaf_requires_grad, strict=True)
        ]
        with as_in_forward(ctx):
            args, kwargs = ctx.rebuild(leaves)
            out = ctx.run(x_hat, *args, **kwargs)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grads = [
            t.grad if flag else None for t, flag in zip(leaves, ctx.leaf_requires_grad, strict=True)
        ]
        return None, None, None, None, x_hat.grad, None, *([None] * ctx.n_kept), *grads


def _unpack_kept_input(kept, like):
    return kept[0]


def recompute_from_kept(
    run: Callable[..., torch.Tensor],
    x: torch.Tensor,
    args: tuple,
    kwargs: dict,
    *,
    storage: Quantizer | None,
    factors: tuple[torch.Tensor, ...] | None = None,
    trainable: bool,
) -> torch.Tensor:
    """``run(x, *args, **kwargs)`` (a tensor) keeping for backward only ``x``'s factors
    ``factors`` (kept by whoever produced ``x``: one storage), else ``storage.pack(x)``, else
    (``storage is None``) ``x`` itself; backward re-runs ``run`` from the reconstruction.
    Tensor leaves of ``args`` / ``kwargs`` are kept as they are. ``trainable``: whether ``run``
    has parameters that need gradients (then backward runs even when no input requires
    grad, and their gradients accumulate through ``.backward()``, as under reentrant
    checkpointing)."""
    if not torch.is_grad_enabled():
        return run(x, *args, **kwargs)
    leaves, rebuild = _tensor_leaves(args, kwargs)
    if factors is not None or storage is not None:
        kept = factors if factors is not None else storage.pack(x)
        unpack = storage.unpack
    else:
        kept, unpack = (x,), _unpack_kept_input
    # A leaf requiring grad makes the output require grad when nothing else does (a first
    # layer over frozen embeddings under PEFT), so backward reaches the adapters.
    dummy = torch.empty(0, requires_grad=trainable)
    return _RecomputeFromKept.apply(run, unpack, rebuild, len(kept), x, dummy, *kept, *leaves)
