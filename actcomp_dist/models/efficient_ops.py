"""Memory-efficient exact block ops: what a LLaMA block keeps for backward, one tensor per op.

Compression shrinks what a *linear* keeps; the rest of a block (norms, attention core, SwiGLU)
is usually larger. Written the obvious way in PyTorch, those ops keep several copies of the
same activation (``LlamaModel(efficient_ops=False)``, the "naive" block that most published
activation-memory numbers are measured on):

- RMSNorm keeps ``x.float()`` (a new fp32 copy when ``x`` is bf16), the fp32 statistic and the
  normalised tensor, and the next linear keeps the norm's output as its input: three
  hidden-sized tensors per norm.
- The attention core's ``v`` is a view of the fused QKV output, so SDPA keeps the whole
  ``[N, (H + 2G) d]`` output alive besides ``q`` and ``k`` after RoPE; in bf16 RoPE casts the
  fp32 cos/sin tables on every call (and the products keep the casts).
- ``silu(gate) * up`` keeps ``gate`` (a view of the whole ``[gate | up]``), ``silu(gate)`` and
  ``up``; FC2 keeps its input ``silu(gate) * up`` again.

With ``efficient_ops=True`` (the default) every op keeps one tensor, which is what a Megatron
or Liger user's exact baseline keeps:

- :func:`rms_norm` keeps its *output* ``y`` (compute dtype) and the fp32 per-token ``rstd``.
  The following uncompressed linear keeps ``y`` as its input too: the same storage, counted
  once by :func:`actcomp_dist.memory.saved_activation_bytes`. Backward recovers the
  normalised input as ``x_hat = y / weight`` (apex's ``memory_efficient`` norm does the same).
  Keeping the input ``x`` instead would give exact recomputation but cost a second
  hidden-sized tensor whenever the next linear keeps ``y`` (``x`` is the residual stream,
  which nothing else keeps), and never less when it does not; so ``y`` it is.
  *Zero weights*: where ``weight[j] == 0`` the column ``y[:, j]`` is zero and ``x_hat[:, j]``
  is lost. Detecting that would need a host-device synchronisation per call; instead the
  division makes it ``0 / 0 = NaN``, so every gradient of that norm is NaN (loud, never
  silently wrong). A model whose norm weights can be exactly zero (a zero-initialised norm,
  say) must use ``memory.efficient_ops: false``. Trained RMSNorm weights start at one and
  are not decayed; none reach exactly zero in practice.
  On CUDA with NVIDIA apex installed, apex's fused kernel runs in its ``memory_efficient``
  form (it keeps the same two tensors).
- The attention core makes ``v`` contiguous (the fused QKV output is then freed: SDPA keeps
  ``q``, ``k`` after RoPE, ``v``, its output and its fp32 log-sum-exp), and RoPE uses cos/sin
  tables cached per (dtype, device) on the rotary module (see ``RotaryEmbedding``).
- The SwiGLU product is never kept: the row-parallel FC2 takes ``[gate | up]`` and the SwiGLU
  as its input recipe (``CompressedRowParallelLinear.forward(gate_up, input_fn=swiglu)``).
  Uncompressed, FC2 keeps only ``[gate | up]`` and recomputes ``silu(gate) * up`` in backward
  for its weight gradient and to backpropagate through the SwiGLU; compressed, it keeps its
  compressed ``Z`` and ``[gate | up]`` (:func:`actcomp_dist.autograd.recompute_in_backward`).

Under ``memory.policy`` ``norm: lowrank:R`` / ``int8`` / ``fp8`` the block norms run
:func:`stored_rms_norm` instead: the same forward and closed-form backward, with ``y`` kept as
LoRAct's low-rank factors ``(L, Q)`` (:class:`actcomp_dist.storage.LowRankStorage`) or in 8
bits, packed tensors that the next uncompressed linear keeps too; the backward then reads
``y ~= L Q^T`` or the dequantised ``y``.

Forward results are the naive block's bit for bit (same ops in the same order). Gradients:
the SwiGLU and FC2 recompute runs the same ops, so they match bit for bit; RMSNorm's backward
is the closed form ``rstd * (dn - x_hat * mean(dn * x_hat))`` with ``dn = g * weight`` and a
recovered ``x_hat`` (one rounding of ``y`` away from the forward's), so its input and weight
gradients agree with the naive block's autograd to rounding (tested against float64).

The statistics are in at least fp32: a float64 input keeps float64 throughout (as the naive
RMSNorm), so ``model.double()`` replays the model in float64.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _apex_memory_efficient_rms_norm():
    """apex's fused RMSNorm if it is installed and has the ``memory_efficient`` form, else
    ``None`` (apex is optional and only used for CUDA inputs)."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    if "memory_efficient" not in inspect.signature(fused_rms_norm_affine).parameters:
        return None
    return functools.partial(fused_rms_norm_affine, memory_efficient=True)


def _rms_norm_backward(ctx, grad_y, y, weight, rstd):
    """The closed-form RMSNorm backward from the output ``y`` (kept, or reconstructed from
    low-rank factors): ``x_hat = y / weight``, ``dx = rstd (dn - x_hat mean(dn x_hat))`` with
    ``dn = g weight``, ``dw = sum(g x_hat)``."""
    wide = rstd.dtype  # fp32, float64 for float64 inputs
    x_hat = y.to(wide) / weight.to(wide)  # [..., h]; NaN in a column whose weight is 0
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_normed = (grad_y * weight).to(wide)  # as autograd through weight * normed
        dot = (grad_normed * x_hat).mean(-1, keepdim=True)
        grad_x = (rstd * (grad_normed - x_hat * dot)).to(ctx.x_dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (grad_y.to(wide) * x_hat).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)
    return grad_x, grad_w


def _rms_norm_forward(x, weight, eps):
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1] fp32 (or float64)
    return weight * (x32 * rstd).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rstd)`` keeping only the output and ``rstd`` (see the module doc)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(y, weight, rstd)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, weight, rstd = ctx.saved_tensors
        return *_rms_norm_backward(ctx, grad_y, y, weight, rstd), None


class _StoredRMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping ``rstd`` and its output packed by a storage policy's packer (LoRAct's
    factors ``L``, ``Q`` or 8-bit codes and scales); returns ``y`` and the packed tensors
    (non-differentiable outputs, for the linears that read ``y``)."""

    @staticmethod
    def forward(ctx, x, weight, eps, packer):
        y, rstd = _rms_norm_forward(x, weight, eps)
        packed = packer.pack(y)  # (L [N, k], Q [h, k]) or (codes, scales)
        ctx.save_for_backward(*packed, weight, rstd)
        ctx.packer, ctx.x_dtype = packer, x.dtype
        ctx.y_like = torch.empty_like(y, device="meta")
        ctx.mark_non_differentiable(*packed)
        return y, *packed

    @staticmethod
    def backward(ctx, grad_y, *_grad_packed):
        *packed, weight, rstd = ctx.saved_tensors
        y = ctx.packer.unpack(tuple(packed), ctx.y_like)  # y ~= L Q^T, or dequantised
        return *_rms_norm_backward(ctx, grad_y, y, weight, rstd), None, None


def stored_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, packer
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """RMSNorm (the forward of :func:`rms_norm`, bit for bit) that keeps ``rstd`` and its
    output packed by ``packer`` (a :mod:`actcomp_dist.storage` packer: LoRAct's factors
    ``(L, Q)`` or 8-bit codes and scales) instead of the output. Returns ``y`` and the packed
    tensors, which a linear reading ``y`` keeps instead of ``y`` (the same tensors); ``None``
    when autograd records nothing."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _rms_norm_forward(x, weight, eps)[0], None
    y, *packed = _StoredRMSNormFunction.apply(x, weight, eps, packer)
    return y, tuple(packed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics (as Hugging Face LLaMA) that keeps its output and the
    per-token ``rstd`` for backward, nothing else."""
    if x.is_cuda:
        fused = _apex_memory_efficient_rms_norm()
        if fused is not None:
            return fused(x, weight, weight.shape, eps)
    return _RMSNormFunction.apply(x, weight, eps)
