"""The output layer and Hugging Face's causal-LM cross-entropy in one function that keeps no logits.

A transformers ``*ForCausalLM`` computes ``logits = lm_head(h)`` for every token and hands them
to ``ForCausalLMLoss``, which upcasts them to fp32 and runs ``F.cross_entropy``: autograd keeps
the fp32 log-probabilities ``[N, V]`` for backward (``N = b * s`` tokens), 4 bytes x the
vocabulary per token, the largest single activation of a small model (4 MiB of a 22 MiB
LoRA step at vocabulary 2048, batch 16 x 32 tokens; 16 bytes per vocabulary entry per token
for Llama-3's 128256 entries against 4 x hidden = 16 KiB per token of a norm output).

:func:`linear_cross_entropy` computes the same loss a chunk of ``chunk_tokens`` tokens at a time
and, because the loss is a scalar that ends the graph, forms its gradients in forward: per chunk
``z = float(h_c W^T + b)`` (the GEMM in the activation or autocast dtype, as ``lm_head``), the
loss terms ``logsumexp(z) - z_y`` and ``dz = (softmax(z) - onehot(y)) / n`` (``n`` the
normaliser: ``num_items_in_batch`` when given, else the number of labelled tokens, as
``fixed_cross_entropy``), cast to the GEMM dtype as the backward of ``.float()`` does; then
``dh_c = dz W`` and, when the weight is trainable, ``dW += dz^T h_c`` (fp32 accumulator, one
rounding at the end) and ``db += sum dz``. Backward only scales them by the upstream gradient
of the scalar loss (exact: the loss is linear in it). Tokens whose label is ``ignore_index``
(the prompt of a prompt/response row, padding) contribute nothing to the loss or gradients,
so their logits are never computed.

fp16 GEMMs (fp16 weights, or fp16 autocast): a loss scaler (``torch.amp.GradScaler``,
DeepSpeed's fp16 engine) multiplies the loss by ``S`` so that backward's fp16 gradients stay
in range, and here ``S`` arrives only in backward. So in fp16 ``dz`` is cast without the
``1 / n`` (``|dz| <= 1``: a probability over ``n`` tokens would fall below fp16's normal
range before ``S`` lifted it), ``dW`` and ``db`` stay in their fp32 accumulators, and
backward multiplies by ``upstream / n`` in fp32 before the cast to the parameter's dtype
(``S = 2^16``, both scalers' first scale, is not finite in fp16). bf16 and fp32 have fp32's
range: there ``dz / n`` is formed in forward. In every dtype backward forms the product with
the upstream factor in fp32 and rounds once (a bf16 ``1 / 3``, three accumulation steps, would
scale every gradient 0.2% off).

Kept for backward: ``dh`` of the labelled tokens ``[n_labelled, h]`` in ``h``'s dtype and a
bool mask ``[N]`` of where they go; with a trainable weight (full fine-tuning) also ``dW`` and
``db`` in the weight's dtype (fp32 under fp16; ``V h`` elements: fewer bytes than the fp32
log-probabilities whenever ``N > h``). Memory while running: the logits of one chunk in the
GEMM dtype plus their fp32 copy, ``chunk_tokens * V * (e + 4)`` bytes.

Compared with :mod:`actcomp_dist.parallel.cross_entropy` (the project's own LLaMA model): that
one keeps ``h`` (shared with the final norm's output) and recomputes the logits in backward,
one GEMM more than the plain head, because its loss is per token and scaled by a loss mask
afterwards. Here the loss is already reduced, so computing the gradients in forward costs no
extra GEMM (the head's FLOPs stay those of the plain head, minus the unlabelled tokens') at the
price of ``dh`` instead of a shared ``h``. Not served: double backward (``create_graph``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, normaliser, ignore_index, chunk_tokens):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        width = hidden.shape[-1]
        labelled = target.reshape(-1) != ignore_index  # [N]
        rows = hidden.reshape(-1, width)[labelled]  # [n, h], a transient copy
        labels = target.reshape(-1)[labelled]  # [n]
        n_rows = rows.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(rows) if need_hidden else None
        grad_weight = grad_bias = None
        # fp16 GEMMs (fp16 weights, fp16 autocast): the gradients are formed without the
        # 1 / normaliser and dW, db are kept in fp32; backward applies upstream / normaliser
        # in fp32 (see the module doc: a loss scaler's factor arrives only there).
        ctx.deferred = False
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_bias:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for begin in range(0, n_rows, chunk_tokens):
            chunk = slice(begin, min(begin + chunk_tokens, n_rows))
            logits = F.linear(rows[chunk], weight, bias)  # [C, V], lm_head's dtype (autocast)
            z = logits.float()
            lse = torch.logsumexp(z, dim=1)  # [C]
            picked = z.gather(1, labels[chunk].unsqueeze(1)).squeeze(1)
            total += (lse - picked).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad_z = z.sub_(lse.unsqueeze(1)).exp_()  # the softmax, in place of z
            grad_z.scatter_add_(
                1, labels[chunk].unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1)
            )
            ctx.deferred = logits.dtype == torch.float16
            if not ctx.deferred:
                grad_z.div_(normaliser)
            grad_logits = grad_z.to(logits.dtype)  # [C, V]
            if need_hidden:
                grad_rows[chunk] = grad_logits.matmul(weight.to(logits.dtype)).to(rows.dtype)
            if need_weight:
                grad_weight += grad_logits.t().matmul(rows[chunk].to(logits.dtype))
            if need_bias:
                grad_bias += grad_logits.sum(0)
        if need_weight and not ctx.deferred:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias and not ctx.deferred:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.hidden_like = torch.empty_like(hidden, device="meta")
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # An input, not an output: a ctx attribute holds it without a reference cycle.
        ctx.normaliser = normaliser if ctx.deferred else None
        ctx.save_for_backward(grad_rows, labelled, grad_weight, grad_bias)
        return total / normaliser

    @staticmethod
    def backward(ctx, grad_loss):
        grad_rows, labelled, grad_weight, grad_bias = ctx.saved_tensors
        # The factor in fp32: a loss scale of 2^16 (GradScaler's and DeepSpeed's first) is inf
        # in fp16, and 1 / 3 (3 accumulation steps) rounded to bf16 is 0.2% off.
        factor = grad_loss.float()
        if ctx.deferred:
            factor = factor / ctx.normaliser.float()

        def scale(grad, dtype):
            return _scaled(grad, factor, dtype)

        grad_hidden = None
        if grad_rows is not None:
            like = ctx.hidden_like
            grad_hidden = torch.zeros(
                labelled.shape[0], like.shape[-1], dtype=like.dtype, device=grad_rows.device
            )
            grad_hidden[labelled] = scale(grad_rows, grad_rows.dtype)
            grad_hidden = grad_hidden.view(like.shape)
        if grad_weight is not None:
            grad_weight = scale(grad_weight, ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = scale(grad_bias, ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


#: Rows of a stored gradient scaled per fp32 temporary in backward (bounds the temporary).
_SCALE_ROWS = 4096


def _scaled(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * factor`` formed in fp32 and rounded once to ``dtype``, ``_SCALE_ROWS`` rows
    at a time."""
    if grad.dtype == torch.float32 and dtype == torch.float32:
        return grad * factor
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    for begin in range(0, grad.shape[0], _SCALE_ROWS):
        rows = slice(begin, begin + _SCALE_ROWS)
        out[rows] = grad[rows].float().mul_(factor)
    return out


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    chunk_tokens: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``ForCausalLMLoss`` of ``F.linear(hidden, weight, bias)`` against the already shifted
    ``target`` (``[...]``, ``hidden``'s leading shape), keeping no logits (module docstring).

    The loss is the sum of the labelled tokens' cross-entropies divided by
    ``num_items_in_batch`` when given, else their mean (NaN when no token is labelled, as in
    transformers)."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"loss_chunk_tokens={chunk_tokens!r} must be an int >= 1")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(target.shape)} do not match the hidden states' leading "
            f"shape {tuple(hidden.shape[:-1])}"
        )
    target = target.to(hidden.device)
    if num_items_in_batch is None:
        normaliser = (target != ignore_index).sum().to(torch.float32)
    elif torch.is_tensor(num_items_in_batch):
        normaliser = num_items_in_batch.to(hidden.device)
    else:
        normaliser = torch.tensor(float(num_items_in_batch), device=hidden.device)
    return _LinearCrossEntropy.apply(
        hidden, weight, bias, target, normaliser, ignore_index, chunk_tokens
    )
