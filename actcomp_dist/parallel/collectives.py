"""Tensor- and sequence-parallel collectives as small paired autograd functions.

Each autograd function is a collective in forward and its adjoint in backward, as in
megatron-core's ``tensor_parallel/mappings.py`` (t = size of the group; dimension 0 is the
sequence in megatron's ``[s, b, h]`` layout):

==========================================  =======================  =======================
function                                    forward                  backward
==========================================  =======================  =======================
``copy_to_tensor_parallel_region``          identity                 all-reduce
``reduce_from_tensor_parallel_region``      all-reduce               identity
``gather_from_sequence_parallel_region``    all-gather dim 0         reduce-scatter dim 0
``reduce_scatter_to_sequence_parallel_...`` reduce-scatter dim 0     all-gather dim 0
``scatter_to_sequence_parallel_region``     keep own dim-0 shard     all-gather dim 0
==========================================  =======================  =======================

How they differ from megatron-core's, and why:

- **Device-agnostic.** Outputs are allocated with ``torch.empty(..., device=t.device,
  dtype=t.dtype)``; megatron allocates on ``torch.cuda.current_device()`` (and its sequence
  parallel path uses a CUDA global buffer), so it cannot run on CPU with gloo. The same code
  runs on gloo and NCCL. torch 2.13's gloo implements ``all_gather_into_tensor`` and
  ``reduce_scatter_tensor`` for fp32/fp64/bf16/fp16, so no list-based fallback is needed.
- **Explicit process group.** Callers pass the group (from :mod:`.state`); nothing here reads
  global state.
- **Inputs are never modified.** Megatron all-reduces in place, which silently corrupts any
  other consumer of the same tensor (autograd hands the *same* gradient tensor to both
  branches of an addition, for example). The all-reduce here reduces a copy.
- **Communication accounting.** Every function takes an optional :class:`CommCounter`; see
  its docstring for what a "byte" is.

A group of one rank communicates nothing: the functions return their input unchanged and
record nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COMM_KINDS = ("all_gather", "reduce_scatter", "all_reduce")


@dataclass
class CommCounter:
    """Bytes and calls per collective kind issued by this rank.

    ``nbytes[kind]`` adds up the size of the buffer this rank *contributes* to each
    collective, in the dtype it is sent in:

    - ``all_gather``: the local shard (the input); the gathered output is t times larger.
    - ``reduce_scatter``: the full pre-reduction input; the output shard is t times smaller.
    - ``all_reduce``: the tensor.

    This is the message size that compression changes (all-gathering an N x r compressed
    activation instead of an N x n one shrinks it by r/n). The bytes a ring algorithm puts on
    the wire per rank follow from it: all-gather (t-1) x nbytes, reduce-scatter
    (t-1)/t x nbytes, all-reduce 2(t-1)/t x nbytes.
    """

    nbytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))

    def record(self, kind: str, contributed: torch.Tensor) -> None:
        """Count one ``kind`` collective to which this rank contributed ``contributed``."""
        if kind not in COMM_KINDS:
            raise ValueError(f"unknown collective kind {kind!r}; valid kinds: {COMM_KINDS}")
        self.nbytes[kind] += contributed.numel() * contributed.element_size()
        self.calls[kind] += 1

    @property
    def total_bytes(self) -> int:
        """Bytes contributed over all kinds."""
        return sum(self.nbytes.values())

    def reset(self) -> None:
        """Zero all counts."""
        for kind in COMM_KINDS:
            self.nbytes[kind] = 0
            self.calls[kind] = 0


def _record(counter: CommCounter | None, kind: str, contributed: torch.Tensor) -> None:
    if counter is not None:
        counter.record(kind, contributed)


def _check_dim0_divisible(t: torch.Tensor, world_size: int, what: str) -> None:
    if t.dim() == 0 or t.shape[0] % world_size != 0:
        raise ValueError(
            f"{what}: dimension 0 of a tensor of shape {tuple(t.shape)} must be divisible "
            f"by the group size {world_size}"
        )


def all_reduce_sum(
    t: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """Sum ``t`` over ``group`` into a new tensor (``t`` itself if the group has one rank).

    ``t`` is never modified, unlike ``dist.all_reduce``.
    """
    if dist.get_world_size(group) == 1:
        return t
    output = t.clone(memory_format=torch.contiguous_format)
    _record(counter, "all_reduce", output)
    dist.all_reduce(output, group=group)
    return output


def all_gather_dim0(
    t: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dimension 0, in group-rank order.

    ``[n, ...]`` on each of t ranks -> ``[t*n, ...]``.
    """
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return t
    if t.dim() == 0:
        raise ValueError("all_gather_dim0 needs a tensor with at least one dimension")
    t = t.contiguous()
    output = torch.empty((world_size * t.shape[0], *t.shape[1:]), device=t.device, dtype=t.dtype)
    _record(counter, "all_gather", t)
    dist.all_gather_into_tensor(output, t, group=group)
    return output


def reduce_scatter_dim0(
    t: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """Sum ``t`` over ``group`` and keep this rank's block of dimension 0.

    ``[t*n, ...]`` on each of t ranks -> ``[n, ...]``: group rank i gets rows
    ``[i*n, (i+1)*n)`` of the sum. Raises ``ValueError`` if dimension 0 is not divisible by t.
    """
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return t
    _check_dim0_divisible(t, world_size, "reduce_scatter_dim0")
    t = t.contiguous()
    output = torch.empty((t.shape[0] // world_size, *t.shape[1:]), device=t.device, dtype=t.dtype)
    _record(counter, "reduce_scatter", t)
    dist.reduce_scatter_tensor(output, t, group=group)
    return output


def split_dim0(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's block of dimension 0 (a view; no communication).

    ``[t*n, ...]`` -> ``[n, ...]``, group rank i gets rows ``[i*n, (i+1)*n)``. Raises
    ``ValueError`` if dimension 0 is not divisible by t.
    """
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return t
    _check_dim0_divisible(t, world_size, "split_dim0")
    return t.chunk(world_size, dim=0)[dist.get_rank(group)]


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return x

    @staticmethod
    def backward(ctx, grad_output):
        return all_reduce_sum(grad_output, ctx.group, ctx.counter), None, None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter):
        return all_reduce_sum(x, group, counter)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return all_gather_dim0(x, group, counter)

    @staticmethod
    def backward(ctx, grad_output):
        return reduce_scatter_dim0(grad_output, ctx.group, ctx.counter), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter, backward_counter):
        ctx.group, ctx.counter = group, backward_counter
        return reduce_scatter_dim0(x, group, counter)

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_dim0(grad_output, ctx.group, ctx.counter), None, None, None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        # A copy, not a view: in-place edits of a custom Function's view output are an error.
        return split_dim0(x, group).clone()

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_dim0(grad_output, ctx.group, ctx.counter), None, None


def copy_to_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward.

    Where a replicated activation enters a column-parallel layer: each rank's gradient with
    respect to it covers only its output columns, so the full gradient is their sum.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _CopyToTensorParallelRegion.apply(x, group, counter)


def reduce_from_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """All-reduce forward; identity backward.

    Where a row-parallel layer's partial products (one per input shard) are summed.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _ReduceFromTensorParallelRegion.apply(x, group, counter)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """All-gather along dimension 0 forward; reduce-scatter of the gradient backward.

    ``[s/t, b, h] -> [s, b, h]``: where a sequence-sharded activation enters a column-parallel
    layer under sequence parallelism. The backward *sums* the ranks' gradients, which is right
    only when what consumes the gathered tensor is tensor-parallel (each rank's gradient is a
    partial sum). If the consumer is replicated (every rank computes the same gradient), the sum
    double-counts; take this rank's rows of the gradient instead.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, counter)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    counter: CommCounter | None = None,
    backward_counter: CommCounter | None = None,
) -> torch.Tensor:
    """Reduce-scatter along dimension 0 forward; all-gather of the gradient backward.

    ``[s, b, h] -> [s/t, b, h]``: where a row-parallel layer's partial products are summed
    and re-sharded along the sequence under sequence parallelism. The backward all-gather is
    counted in ``backward_counter`` if given, else in ``counter``.
    """
    if dist.get_world_size(group) == 1:
        return x
    backward_counter = counter if backward_counter is None else backward_counter
    return _ReduceScatterToSequenceParallelRegion.apply(x, group, counter, backward_counter)


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter | None = None
) -> torch.Tensor:
    """Keep this rank's dimension-0 shard forward; all-gather of the gradient backward.

    ``[s, b, h] -> [s/t, b, h]``: where a replicated activation (the embedding output) becomes
    sequence-sharded.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _ScatterToSequenceParallelRegion.apply(x, group, counter)
