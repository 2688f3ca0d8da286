"""The vocab-parallel cross-entropy over a given TP group, plain or fused with the output layer.

The plain head computes the logits ``[s, b, V/t] = h W^T`` of this rank's vocabulary shard and
hands their fp32 copy to :func:`vocab_parallel_cross_entropy`: megatron-core's computation
(its ``VocabParallelCrossEntropy`` steps, in its order, so the losses and gradients are its
bits) over the process group it is handed instead of megatron's global TP group, so a model
built from its own :class:`~actcomp_dist.parallel.state.ParallelContext` needs no megatron
state. It keeps the fp32 softmax ``[N, V/t]`` for backward (``N = s * b`` tokens): with LLaMA's vocabularies that is the
largest single activation of a small model (4 bytes x 32000 per token, more than a whole
block of the 60m model). :func:`vocab_parallel_linear_cross_entropy` computes the same per-token
losses and gradients but keeps only

- ``h`` ``[N, h]``, the output layer's input (the final norm's output, which the plain head
  keeps too: its linear saves it),
- the per-token log-sum-exp ``[N]`` (fp32) and a copy of the labels ``[N]`` (int64),

and recomputes the logits of ``chunk_tokens`` tokens at a time in backward, as Liger-Kernel's
fused linear cross-entropy and the loss-parallel users of torchtitan do. Per chunk of rows
``h_c`` (``z`` the fp32 logits of this rank's shard, ``y`` the label):

forward
    ``z = float(h_c W^T)`` (the GEMM in the activation dtype, as the plain head), then this
    rank's ``m = max_v z``, ``s = sum_v exp(z - m)`` and ``z_y`` (0 when ``y`` is outside the
    shard). The chunk's logits die here. After the last chunk two collectives over the TP
    group, whatever the number of chunks: ``M = all-reduce-max(m)``, then one all-reduce-sum of
    ``[s exp(m - M); z_y]`` gives ``S`` and the target logit. ``loss = log S - (z_y - M)``
    (megatron's definition: ``log(sum exp(z - M)) - (z_y - M)``) and ``lse = M + log S``.
backward
    recompute ``z``; ``dz = g (exp(z - lse) - onehot(y))`` in fp32 (``g`` the upstream grad
    of each token's loss), cast to the activation dtype as the plain head's ``.float()``
    backward does; ``dh_c = dz W`` (this rank's partial sum over its vocabulary shard) and
    ``dW += dz^T h_c``, accumulated in fp32 when the weight is 16-bit (one rounding at the end,
    like the plain head's single GEMM; the accumulator is a ``[V/t, h]`` fp32 transient).

Cost: backward recomputes the logits, one GEMM more than the plain head's three (the head's
FLOPs grow by a third); the softmax is never written out at ``[N, V/t]`` in fp32.

The partial ``dh`` is summed over the TP group by the collective its input came through, as
for megatron's column-parallel layers: :class:`VocabParallelOutputLayer` puts an identity /
all-reduce pair in front of the function (megatron's ``allreduce_dgrad``), and under sequence
parallelism the caller's all-gather of ``h`` reduce-scatters it (the layer is built with
``disable_grad_reduce``).

Memory per chunk in backward (and forward): the logits in the activation dtype plus their fp32
copy, ``chunk_tokens * V/t * (e + 4)`` bytes. A chunk of 1024 - 2048 tokens keeps that at
0.2 - 0.4 GiB for a 32000-token vocabulary (0.75 - 1.5 GiB at 128256) while each GEMM is still
``chunk x h x V/t`` with every dimension in the thousands, large enough to run at full
throughput; smaller chunks save little more memory and add per-chunk launch overhead.

"fp32" above means at least fp32: float64 inputs (``model.double()``, a float64 replay of the
model) are computed in float64 throughout, by both functions.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from actcomp_dist.parallel.collectives import copy_to_tensor_parallel_region
from actcomp_dist.parallel.megatron_layers import ColumnParallelLinear, VocabParallelCrossEntropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """megatron-core's ``_VocabParallelCrossEntropy`` (no label smoothing) with the TP group
    passed in: the same steps in the same order, so bit for bit its losses and gradients."""

    @staticmethod
    def forward(ctx, logits, target, group):
        if logits.dtype == torch.float32:
            logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
        else:  # float64: megatron's step would cast to fp32; the same max in float64
            logits_max = torch.max(logits, dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        local_vocab = logits.shape[-1]
        start = _vocab_start(local_vocab, group)
        target_mask, masked_target, target_logit, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, start, start + local_vocab
            )
        )
        dist.all_reduce(target_logit, group=group)  # z_y lives on one rank, 0 on the others
        dist.all_reduce(sum_exp, group=group)
        softmax, losses = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, target_logit, sum_exp
        )
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_2d, rows, target_update, grad_logits = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        grad_logits = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, rows, masked_target, target_update, grad_logits, grad_losses
        )
        return grad_logits, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Per-token cross-entropy of logits whose vocabulary is sharded over ``group``.

    Args:
        logits: ``[s, b, V/t]`` fp32 (or float64), this rank's vocabulary ids ``[i V/t, (i + 1) V/t)``
            (megatron's layout); overwritten in place by the softmax, which is kept for
            backward (do not reuse them).
        target: ``[s, b]`` vocabulary ids in ``[0, V)``, the same on every rank of ``group``.
        group: the tensor-parallel group the vocabulary is sharded over.

    Returns the losses ``[s, b]`` in the logits' dtype; megatron-core's ``vocab_parallel_cross_entropy`` bit
    for bit when ``group`` is megatron's TP group. Three all-reduces over ``group``.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"vocab_parallel_cross_entropy takes fp32 or float64 logits, got {logits.dtype}"
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match the logits' leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
    return _VocabParallelCrossEntropy.apply(logits, target, group)


def _vocab_start(local_vocab: int, group: dist.ProcessGroup) -> int:
    # megatron's VocabUtility: rank i holds rows [i * V/t, (i + 1) * V/t) of the full weight.
    return dist.get_rank(group) * local_vocab


def _target_in_shard(target: torch.Tensor, start: int, local_vocab: int):
    """(local index of each target, clamped to 0 outside the shard; bool mask: in the shard)."""
    local = target - start
    inside = (local >= 0) & (local < local_vocab)
    return local.masked_fill(~inside, 0), inside


def _autocast_off(device_type: str):
    # Forward and backward must recompute the same logits: both run in the inputs' dtype.
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk_tokens):
        with _autocast_off(hidden.device.type):
            return _VocabParallelLinearCrossEntropy._forward(
                ctx, hidden, weight, labels, group, chunk_tokens
            )

    @staticmethod
    def _forward(ctx, hidden, weight, labels, group, chunk_tokens):
        width = hidden.shape[-1]
        h2d = hidden.view(-1, width)  # [N, h]
        n_tokens, local_vocab = h2d.shape[0], weight.shape[0]
        # A fresh copy: exactly N int64 whatever storage the caller's labels live in.
        target = torch.empty(n_tokens, dtype=torch.int64, device=labels.device)
        target.view(labels.shape).copy_(labels)
        start = _vocab_start(local_vocab, group)
        wide = torch.promote_types(hidden.dtype, torch.float32)  # float64 stays float64
        local_max = torch.empty(n_tokens, dtype=wide, device=hidden.device)
        local_sum = torch.empty(2, n_tokens, dtype=wide, device=hidden.device)
        for begin in range(0, n_tokens, chunk_tokens):
            rows = slice(begin, min(begin + chunk_tokens, n_tokens))
            logits = torch.matmul(h2d[rows], weight.t()).to(wide)  # [C, V/t]
            index, inside = _target_in_shard(target[rows], start, local_vocab)
            picked = logits.gather(1, index.unsqueeze(1)).squeeze(1)
            local_sum[1, rows] = picked.masked_fill(~inside, 0.0)  # z_y on the owning rank
            chunk_max = logits.max(dim=1).values
            local_max[rows] = chunk_max
            local_sum[0, rows] = logits.sub_(chunk_max.unsqueeze(1)).exp_().sum(dim=1)
        global_max = local_max
        if dist.get_world_size(group) > 1:
            global_max = local_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            local_sum[0].mul_((local_max - global_max).exp_())
            dist.all_reduce(local_sum, group=group)
        sum_exp, target_logit = local_sum
        log_sum = sum_exp.log()
        losses = log_sum - (target_logit - global_max)
        ctx.save_for_backward(hidden, weight, global_max.add_(log_sum), target)
        ctx.group, ctx.chunk_tokens = group, chunk_tokens
        return losses.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_losses):
        with _autocast_off(grad_losses.device.type):
            return _VocabParallelLinearCrossEntropy._backward(ctx, grad_losses)

    @staticmethod
    def _backward(ctx, grad_losses):
        hidden, weight, lse, target = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        width = hidden.shape[-1]
        h2d = hidden.view(-1, width)  # [N, h]
        n_tokens, local_vocab = h2d.shape[0], weight.shape[0]
        wide = lse.dtype  # fp32, float64 for float64 inputs
        grad = grad_losses.reshape(-1).to(wide)  # [N]
        start = _vocab_start(local_vocab, ctx.group)
        grad_hidden = torch.empty_like(h2d) if need_hidden else None
        grad_weight = None
        if need_weight:  # accumulated in at least fp32 (one rounding to a 16-bit weight)
            accumulate = torch.promote_types(weight.dtype, torch.float32)
            grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
        for begin in range(0, n_tokens, ctx.chunk_tokens):
            rows = slice(begin, min(begin + ctx.chunk_tokens, n_tokens))
            h_chunk = h2d[rows]
            logits = torch.matmul(h_chunk, weight.t()).to(wide)  # [C, V/t]
            probs = logits.sub_(lse[rows].unsqueeze(1)).exp_()  # the softmax, in place
            index, inside = _target_in_shard(target[rows], start, local_vocab)
            probs.scatter_add_(1, index.unsqueeze(1), -inside.to(wide).unsqueeze(1))
            grad_logits = probs.mul_(grad[rows].unsqueeze(1)).to(hidden.dtype)
            if need_hidden:
                torch.matmul(grad_logits, weight, out=grad_hidden[rows])
            if need_weight and grad_weight.dtype == grad_logits.dtype:
                grad_weight.addmm_(grad_logits.t(), h_chunk)  # [V/t, h]
            elif need_weight:
                grad_weight.add_(torch.matmul(grad_logits.t(), h_chunk))
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_hidden:
            grad_hidden = grad_hidden.view_as(hidden)
        return grad_hidden, grad_weight, None, None, None


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup,
    chunk_tokens: int,
) -> torch.Tensor:
    """Per-token cross-entropy of the logits ``hidden @ weight^T``, vocabulary-sharded over
    ``group``, without keeping the logits (see the module docstring).

    Args:
        hidden: ``[..., h]``, contiguous, the same on every rank of ``group``.
        weight: this rank's ``[V/t, h]`` rows of the output weight (rank ``i`` holds the
            vocabulary ids ``[i V/t, (i + 1) V/t)``), in ``hidden``'s dtype.
        labels: ``[...]`` (``hidden``'s leading shape) vocabulary ids in ``[0, V)``.
        group: the tensor-parallel group the vocabulary is sharded over.
        chunk_tokens: tokens whose logits exist at once.

    Returns the fp32 losses, shaped like ``labels``. The gradient with respect to ``hidden`` is
    this rank's partial sum (see the module docstring for how callers complete it). Everything
    runs in the inputs' dtype, ``torch.autocast`` or not (backward must recompute the logits
    of forward): cast the model, as DeepSpeed's bf16 engine does.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be an int >= 1")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and the output weight ({weight.dtype}) must have one dtype"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"the output weight's shape {tuple(weight.shape)} does not match hidden's "
            f"{tuple(hidden.shape)}: expected [V/t, {hidden.shape[-1]}]"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if not hidden.is_contiguous():
        raise ValueError("hidden must be contiguous (a copy would be kept for backward)")
    return _VocabParallelLinearCrossEntropy.apply(hidden, weight, labels, group, chunk_tokens)


class VocabParallelOutputLayer(ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` as the model's output layer, which can also
    return the cross-entropy of its logits without keeping them.

    ``forward(input_, weight)`` is megatron's, unchanged (logits ``[s, b, V/t]``).
    ``forward(input_, weight, labels=labels, chunk_tokens=c)`` returns ``(losses, None)``:
    the per-token losses ``[s, b]`` of :func:`vocab_parallel_linear_cross_entropy`. Both run in
    the layer's own forward, so DeepSpeed ZeRO-3 has gathered the weight and hooks backward as
    for the logits. The input gradient is reduced over the TP group as megatron's layer reduces
    it: an all-reduce, unless ``disable_grad_reduce`` (the input came through a
    sequence-parallel all-gather, whose backward reduce-scatters).
    """

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        *,
        labels: torch.Tensor | None = None,
        chunk_tokens: int | None = None,
    ):
        if labels is None:
            return super().forward(input_, weight, runtime_gather_output)
        if chunk_tokens is None:
            raise ValueError("VocabParallelOutputLayer: labels need chunk_tokens")
        if self.sequence_parallel:
            raise ValueError(
                "VocabParallelOutputLayer's loss needs the whole sequence: gather the input "
                "(gather_from_sequence_parallel_region) and build the layer without "
                "sequence_parallel, with disable_grad_reduce=True"
            )
        weight = self.weight if weight is None else weight
        if weight is None:
            raise ValueError(
                "VocabParallelOutputLayer was built with skip_weight_param_allocation: pass "
                "the (tied) weight"
            )
        if not self.disable_grad_reduce:
            input_ = copy_to_tensor_parallel_region(input_, self.tp_group)
        losses = vocab_parallel_linear_cross_entropy(
            input_, weight, labels, self.tp_group, chunk_tokens
        )
        return losses, None
