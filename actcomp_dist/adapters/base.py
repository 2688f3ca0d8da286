"""The low-rank adapter module and its autograd function, for plain and tensor-parallel linears.

An adapter adds ``delta = s * B (A x)`` to a linear's output, ``s = multiplier * alpha / r``,
``A`` [r, n], ``B`` [m, r]. Its autograd function saves the small ``Z = A x`` [N, r] (what B's
gradient ``s * g^T Z`` needs) and, for LoRA only, the (optionally compressed) input that A's
gradient needs. The input gradient ``s * (g B) A`` is exact.

**Tensor parallelism** follows the base layer's sharding (read from Megatron's parameter
attributes, so this module never imports megatron-core; t = TP size):

==============  ===================  ==============  ======================================
base layer      A (per rank)         B (per rank)    communication (forward / backward)
==============  ===================  ==============  ======================================
plain           [r, n]               [m, r]          none
column          [r, n] (same on      [m/t, r], rows  backward: all-reduce ``g B`` [N, r]
                every rank)          as the weight's  (not ``dX`` [N, n])
column + SP     same                 same            fwd: all-gather Z; bwd: reduce-scatter
                                                     ``g B``, all-gather Z (saved locally)
row             [r, n/t], the        [m, r]          fwd: all-reduce ``A_i x_i`` [N, r]
                rank's columns       (replicated)
row + SP        same                 same            fwd: reduce-scatter ``A_i x_i``; bwd:
                                                     all-gather ``g B``, all-reduce ``dB``
==============  ===================  ==============  ======================================

A column-parallel B shard holds exactly the rows of the weight shard it adapts (fused QKV
groups, Megatron's stride-2 gate/up chunks), so ``s * B_i A`` adds to the local weight shard
as is; every message is r wide, and the full ``A`` is the same at every TP size, so results
match TP = 1 up to reduction order.

**Masks** (LoRI-S): with ``mask`` set, the adapter uses ``B_eff = where(mask, B, frozen_B)``
(``frozen_B`` = 0 unless continual learning pinned earlier values) and B's gradient is zero
outside the mask. Entries outside the mask therefore cannot change the output however the
optimizer treats them, and with B = 0 there (and any Adam-type optimizer) they stay exactly 0.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.adapters.config import AdapterConfig
from actcomp_dist.parallel.collectives import (
    all_gather_dim0,
    all_reduce_sum,
    reduce_scatter_dim0,
)
from actcomp_dist.seeds import projection_seed, seeded_generator

PLAIN, COLUMN, ROW = "plain", "column", "row"


@dataclass(frozen=True)
class AdapterGeometry:
    """How the adapted linear is sharded; see the module docstring's table.

    ``in_features`` / ``out_features`` are the logical (unsharded) widths; ``in_offset`` the
    first input feature of this rank (row-parallel); ``stride`` Megatron's partition stride of a
    column-parallel weight's rows (2 for the fused gate/up).
    """

    mode: str
    in_features: int
    out_features: int
    in_local: int
    out_local: int
    in_offset: int = 0
    stride: int = 1
    sequence_parallel: bool = False
    group: dist.ProcessGroup | None = None
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def b_rows(self) -> int:
        """Rows of this rank's B: the weight shard's rows (column), else all outputs."""
        return self.out_local if self.mode == COLUMN else self.out_features

    @property
    def b_sharded(self) -> bool:
        """B differs across TP ranks (column-parallel); else it is replicated."""
        return self.mode == COLUMN and self.tp_size > 1


def geometry_of(linear: nn.Module) -> AdapterGeometry:
    """The geometry of ``nn.Linear`` or a Megatron column/row-parallel linear (ours included).

    Megatron tags its sharded weights with ``tensor_model_parallel`` and ``partition_dim``
    (0: column-parallel, 1: row-parallel) and its layers carry ``tp_group`` and
    ``sequence_parallel``.
    """
    weight = linear.weight
    m_local, n_local = weight.shape
    if not getattr(weight, "tensor_model_parallel", False):
        return AdapterGeometry(PLAIN, n_local, m_local, n_local, m_local)
    group = linear.tp_group
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    sequence_parallel = bool(getattr(linear, "sequence_parallel", False)) and size > 1
    if weight.partition_dim == 0:
        return AdapterGeometry(
            COLUMN,
            in_features=n_local,
            out_features=m_local * size,
            in_local=n_local,
            out_local=m_local,
            stride=getattr(weight, "partition_stride", 1),
            sequence_parallel=sequence_parallel,
            group=group,
            tp_rank=rank,
            tp_size=size,
        )
    return AdapterGeometry(
        ROW,
        in_features=n_local * size,
        out_features=m_local,
        in_local=n_local,
        out_local=m_local,
        in_offset=rank * n_local,
        sequence_parallel=sequence_parallel,
        group=group,
        tp_rank=rank,
        tp_size=size,
    )


def mark_tensor_parallel(
    parameter: torch.Tensor, sharded: bool, partition_dim: int = -1, partition_stride: int = 1
) -> None:
    """Tag an adapter factor with Megatron's tensor-parallel attributes, as megatron-core tags
    its layers' weights: ``tensor_model_parallel`` (this rank holds its own part of the
    logical tensor), ``partition_dim`` and ``partition_stride`` (-1 and 1 when replicated).

    Every global gradient norm reads ``tensor_model_parallel``: DeepSpeed's (ZeRO 0's
    ``clip_grad_norm_``, ZeRO 1/2's and 3's norm, through ``is_model_parallel_parameter``)
    adds a tagged parameter's squared norm on every model-parallel rank and an untagged one
    on model-parallel rank 0 only, then sums over the group; Megatron's optimizer does the
    same, and so does :mod:`actcomp_dist.optim.clip`. Untagged, a column-parallel B would
    count only rank 0's rows; tagged, a replicated factor (identical gradient on every TP
    rank) would count t times.
    """
    parameter.tensor_model_parallel = sharded
    parameter.partition_dim = partition_dim if sharded else -1
    parameter.partition_stride = partition_stride if sharded else 1


def adapter_seed(seed: int, layer_id: int, site: str, task: int = 0) -> int:
    """The seed of A for (adapter seed, layer, site, task): the pure seed function of
    actcomp_dist.seeds, in a namespace of its own so it never coincides with a compression
    projection's seed. The task index of a continual-learning sequence takes the block slot, so
    each task of one base seed draws its own A (task 0 is the single-task adapter's A)."""
    return projection_seed(seed, layer_id, "adapter/" + site, task, 0)


def generate_A(
    seed: int, rank: int, in_features: int, columns: slice | None = None
) -> torch.Tensor:
    """``A`` [r, n] (or its ``columns``), fp32 on the CPU, drawn as LoRA initialises A
    (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(n), 1/sqrt(n))).

    Always drawn on the CPU: a CUDA generator gives other numbers for the same seed, and A must
    be the same wherever an adapter is trained, reloaded or merged. Cheap: r x n per site.
    """
    generator = seeded_generator(seed, torch.device("cpu"))
    a = torch.rand((rank, in_features), generator=generator, dtype=torch.float32)
    a = a.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(in_features))
    return a if columns is None else a[:, columns].contiguous()


def _compute_dtype(x: torch.Tensor) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """The dtype to run in and a context that disables autocast (autocast never reaches
    backward, so forward casts explicitly, as ``actcomp_dist.autograd`` does)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type), torch.autocast(device_type, enabled=False)
    return x.dtype, contextlib.nullcontext()


class _LowRankAdapterFunction(torch.autograd.Function):
    """``s * B_eff (A x)`` saving ``Z = A x`` (and, for a trained A, the compressed input)."""

    @staticmethod
    def forward(ctx, x, a, b, adapter: LowRankAdapter):
        geometry, group = adapter.geometry, adapter.geometry.group
        dtype, autocast_off = _compute_dtype(x)
        with autocast_off:
            x = x.to(dtype)
            z = torch.matmul(x, a.to(dtype).t())  # [..., r] (a partial sum when row-parallel)
            if geometry.mode == COLUMN and geometry.sequence_parallel:
                z_full, z_saved = all_gather_dim0(z, group), z  # [s, b, r], keep [s/t, b, r]
            elif geometry.mode == ROW:
                if geometry.sequence_parallel:
                    z = reduce_scatter_dim0(z, group)  # [s/t, b, r]
                else:
                    z = all_reduce_sum(z, group)
                z_full = z_saved = z
            else:
                z_full = z_saved = z
            out = torch.matmul(z_full, adapter.effective_B(b).to(dtype).t()).mul_(adapter.scale)
            saved = [z_saved, b]
            trains_a = ctx.needs_input_grad[1]
            if trains_a:
                packed = adapter.compressor.compress(x.reshape(-1, x.shape[-1]))
                saved += [a, packed.tokens, *packed.basis]
                ctx.seeds = packed.seeds
        ctx.save_for_backward(*saved)
        ctx.trains_a = trains_a
        # A frozen (LoRI): module state, not an activation. A cached A is kept by reference;
        # an uncached one is regenerated from the seed in backward.
        ctx.frozen_a = None if trains_a or not adapter.cache_A else a
        ctx.adapter, ctx.dtype = adapter, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        adapter = ctx.adapter
        geometry, group, scale = adapter.geometry, adapter.geometry.group, adapter.scale
        z_saved, b, *rest = ctx.saved_tensors
        if ctx.trains_a:
            a, tokens, *basis = rest
        else:
            a = ctx.frozen_a if ctx.frozen_a is not None else adapter.frozen_A(b.device)
        a = a.to(ctx.dtype)
        g = grad_out.to(ctx.dtype)
        grad_x = grad_a = grad_b = None

        dz = torch.matmul(g, adapter.effective_B(b).to(ctx.dtype)).mul_(scale)  # [..., r]
        # dz for the tokens of x, complete over the TP group.
        if geometry.mode == COLUMN:
            if geometry.sequence_parallel:
                dz_x = reduce_scatter_dim0(dz, group)
            else:
                dz_x = all_reduce_sum(dz, group)
        elif geometry.mode == ROW and geometry.sequence_parallel:
            dz_x = all_gather_dim0(dz, group)
        else:
            dz_x = dz
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(dz_x, a)

        if ctx.needs_input_grad[2]:
            z = z_saved
            if geometry.mode == COLUMN and geometry.sequence_parallel:
                z = all_gather_dim0(z_saved, group)
            g2d, z2d = g.reshape(-1, g.shape[-1]), z.reshape(-1, z.shape[-1])
            grad_b = g2d.t().matmul(z2d).mul_(scale)  # [m_local, r]
            if geometry.mode == ROW and geometry.sequence_parallel:
                grad_b = all_reduce_sum(grad_b, group)  # each rank saw its tokens only
            if adapter.mask is not None:
                grad_b = grad_b.masked_fill(~adapter.mask, 0)

        if ctx.trains_a and ctx.needs_input_grad[1]:
            ghat = dz_x.reshape(-1, dz_x.shape[-1]).t().matmul(tokens)  # [r, c]
            grad_a = adapter.compressor.lift(ghat, tuple(basis), ctx.seeds)  # [r, n_local]
            if geometry.mode == COLUMN and geometry.sequence_parallel:
                grad_a = all_reduce_sum(grad_a, group)  # each rank saw its tokens only
        return grad_x, grad_a, grad_b, None


class LowRankAdapter(nn.Module):
    """Base class of the adapters: B, its optional mask, the scale and the forward.

    Subclasses (registered with ``@register_adapter``) provide ``A`` through
    :meth:`current_A`. Built by :func:`actcomp_dist.adapters.apply_adapters`, which attaches
    them to a linear and adds their output to the linear's.

    Attributes:
        B: [b_rows, r] parameter, zero-initialised (the adapter starts as the identity).
        mask: ``None`` (dense) or a bool buffer of B's shape (LoRI-S).
        frozen_B: ``None`` (0) or B's values outside the mask, kept fixed (continual learning).
        multiplier: a per-adapter weight on the output (combining adapters; default 1).
        enabled: whether the forward includes this adapter.

    ``schedule``: the model's :class:`~actcomp_dist.seeds.CompressionSchedule`, for methods
    that compress their input (LoRA's ``input_compression``).
    """

    method = ""

    def __init__(
        self,
        config: AdapterConfig,
        geometry: AdapterGeometry,
        layer_id: int,
        site: str,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        schedule=None,
    ) -> None:
        super().__init__()
        self.config = config
        self.geometry = geometry
        self.layer_id, self.site = layer_id, site
        self.rank = config.rank
        self.cache_A = config.cache_A
        self.multiplier = 1.0
        self.enabled = True
        self.B = nn.Parameter(
            torch.zeros((geometry.b_rows, config.rank), device=device, dtype=dtype)
        )
        # A column-parallel B is this rank's rows of the logical B, in the weight's row order.
        mark_tensor_parallel(
            self.B, geometry.b_sharded, partition_dim=0, partition_stride=geometry.stride
        )
        self.register_buffer("mask", None)
        self.register_buffer("frozen_B", None)

    @property
    def seed(self) -> int:
        return adapter_seed(self.config.seed, self.layer_id, self.site, self.config.task)

    @property
    def scale(self) -> float:
        return self.multiplier * self.config.scale

    @property
    def A_columns(self) -> slice:
        """This rank's columns of the full A."""
        start = self.geometry.in_offset
        return slice(start, start + self.geometry.in_local)

    def current_A(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """This rank's A [r, n_local] for a forward."""
        raise NotImplementedError

    def frozen_A(self, device: torch.device) -> torch.Tensor:
        """A for a backward that was not handed one (an uncached frozen A), without grad."""
        raise NotImplementedError

    def effective_B(self, b: torch.Tensor | None = None) -> torch.Tensor:
        """The B the adapter computes with: ``where(mask, B, frozen_B or 0)``."""
        b = self.B if b is None else b
        if self.mask is None:
            return b
        outside = b.new_zeros(()) if self.frozen_B is None else self.frozen_B.to(b.dtype)
        return torch.where(self.mask, b, outside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the base linear receives it -> the adapter's addition to its output."""
        a = self.current_A(x.device, self.B.dtype)
        return _LowRankAdapterFunction.apply(x, a, self.B, self)

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{self.method}, layer_id={self.layer_id}, site={self.site!r}, rank={self.rank}, "
            f"in={g.in_features}, out={g.out_features}, mode={g.mode}"
            f"{', sp' if g.sequence_parallel else ''}, masked={self.mask is not None}"
        )
