"""Compressed Megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear``.

The layers subclass megatron-core's, so parameters, initialisation, sharding attributes
(``tensor_model_parallel``, ``partition_dim``, ``sequence_parallel``) and state dicts are
Megatron's own. Only ``forward`` changes: it runs :class:`_CompressedParallelLinear`, our
device-agnostic autograd function whose collectives are plain ``torch.distributed`` calls on
Megatron's process groups (Megatron's built-in path allocates its sequence-parallel buffers
with ``torch.cuda.current_device()``), so one source runs on CPU/gloo and GPU/NCCL.

Tensor-parallel rules:

- **Column-parallel** (QKV, FC1): every TP rank holds the whole input width, so all ranks
  build the *same* projection (one block). Rank i's ``G_hat_i = g_i^T Z`` is exactly the i-th
  row block of the single-device ``G_hat``.
  With sequence parallelism the forward all-gathers ``X`` (the output needs it), but the layer
  saves only the compressed *local* shard ``Z_loc = X_loc P``; backward all-gathers ``Z``
  (c/n of the bytes Megatron re-gathers for ``X``) and reduce-scatters ``dX``.
- **Row-parallel** (FC2, attention output): the input is sharded along the contracted
  features. What the layer saves is the method's ``row_parallel_layout``:

  - a *dense row shard* (``compact`` with ``row_parallel_projection="dense"``, the default):
    rank i computes the partial ``Z_i = X_i P_i`` with its rows of the single-device P; the
    partials are summed in the collective that sums the output: ``[Y_i | Z_i]`` goes into one
    all-reduce (one reduce-scatter along the sequence under SP, which leaves each rank the
    ``Z`` of its N/t tokens; backward all-gathers ``[dY | Z]`` in one collective, the
    all-gather Megatron does for ``dY`` anyway, r/m wider). Every rank then holds the full
    ``Z``, so ``G_hat`` [m, r] is the same on every rank and rank i's weight gradient is
    ``G_hat P_i^T``: exactly the single-device layer's columns. Cost: r/m more bytes in the
    output's collectives; ``Z`` is N x r per rank (N/t x r under SP).
  - block-diagonal (``compact`` with ``row_parallel_projection="block"``, and the other
    methods' one block per rank): each rank compresses its own features and saves its own
    ``Z_i``; no extra communication. ``compact`` uses K canonical blocks
    (``row_parallel_blocks``, independent of the TP size); a rank owning K/t blocks
    concatenates them. The output is all-reduced (or reduce-scattered under SP) as Megatron
    does.

Both give the same numbers at any TP size up to float reduction order; method ``none`` runs
the same operations as Megatron's layers and matches them bit for bit (TP without SP).

Each layer counts the bytes it communicates per phase in ``layer.comm["forward"]`` and
``layer.comm["backward"]`` (:class:`CommCounter`: the buffer this rank contributes to each
all-gather / reduce-scatter / all-reduce); :meth:`reset_comm` zeroes them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from actcomp_dist.autograd import accumulate_compressed_grad, recompute_in_backward
from actcomp_dist.compression import BlockLayout, build_compressor, layer_layout
from actcomp_dist.compression.base import Compressed, Compressor
from actcomp_dist.config import CompressionConfig
from actcomp_dist.layers import mark_subspace_parameter
from actcomp_dist.parallel.collectives import (
    CommCounter,
    all_gather_dim0,
    reduce_from_tensor_parallel_region,
    reduce_scatter_dim0,
    reduce_scatter_to_sequence_parallel_region,
)
from actcomp_dist.seeds import CompressionSchedule
from actcomp_dist.storage import LowRankStorage
from actcomp_dist.subspace import subspace_state

# How the input gradient of the local GEMM is completed across the TP group.
_DGRAD_NONE = "none"  # row-parallel: each rank's dX is already its own shard
_DGRAD_ALL_REDUCE = "all_reduce"  # column-parallel, replicated input
_DGRAD_SEQUENCE_PARALLEL = "sequence_parallel"  # column-parallel, sequence-sharded input

# Whether the autograd function itself sums its output over the TP group (dense row-parallel
# CompAct, whose partial Z travels in the same collective) or leaves that to the layer.
_REDUCE_NONE = "none"
_REDUCE_ALL = "all_reduce"
_REDUCE_SCATTER = "reduce_scatter"  # along the sequence: sequence parallelism


class _CompressedParallelLinear(torch.autograd.Function):
    """``Y = X W^T (+ b)`` on one TP shard, saving the compressed input.

    Inputs are Megatron's sequence-first [s, b, n]. Under sequence parallelism ``x`` is the
    local [s/t, b, n] shard and the output covers the whole sequence.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        proxy,
        compressor: Compressor,
        subspace: bool,
        group,
        dgrad: str,
        comm,
        output_reduce: str,
    ):
        if dgrad == _DGRAD_SEQUENCE_PARALLEL:
            total_x = all_gather_dim0(x, group, comm["forward"])  # [s, b, n]
        else:
            total_x = x
        out = torch.matmul(total_x, weight.t())
        if bias is not None:
            out = out + bias
        if ctx.needs_input_grad[1] or proxy is not None:
            packed = compressor.compress(x.reshape(-1, x.shape[-1]))  # local tokens only
            tokens = packed.tokens
            ctx.seeds = packed.seeds
        else:
            # A frozen weight (adapters on a frozen base): dX needs only W; save no input.
            packed, tokens = None, None
            ctx.seeds = ()
        if output_reduce != _REDUCE_NONE:
            # Dense row-parallel: the output and Z are both partial sums over the TP group.
            out, tokens = _reduce_output_and_tokens(
                out, tokens, group, output_reduce, comm["forward"]
            )
        if packed is not None:
            ctx.save_for_backward(weight, tokens, *packed.basis)
        else:
            ctx.save_for_backward(weight)
        ctx.compressor, ctx.subspace = compressor, subspace
        ctx.weight, ctx.group, ctx.dgrad, ctx.counter = weight, group, dgrad, comm["backward"]
        ctx.output_reduce = output_reduce
        ctx.has_bias = bias is not None
        ctx.has_proxy = proxy is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, *saved = ctx.saved_tensors
        tokens, basis = (saved[0], saved[1:]) if saved else (None, ())
        compressor, group, counter = ctx.compressor, ctx.group, ctx.counter
        if tokens is not None and hasattr(compressor, "unpack_saved"):
            tokens, basis = compressor.unpack_saved(tokens, basis)  # 8-bit input: dequantised
        sequence_parallel = ctx.dgrad == _DGRAD_SEQUENCE_PARALLEL
        grad_x = grad_w = grad_b = grad_proxy = None
        if ctx.output_reduce == _REDUCE_SCATTER:
            # The adjoint of the forward reduce-scatter, and the full Z, in one all-gather.
            grad_out, tokens = _gather_grad_and_tokens(grad_out, tokens, group, counter)

        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)  # [s, b, n], a partial sum over the TP group
            if sequence_parallel:
                grad_x = reduce_scatter_dim0(grad_x, group, counter)
            elif ctx.dgrad == _DGRAD_ALL_REDUCE:
                counter.record("all_reduce", grad_x)
                dist.all_reduce(grad_x, group=group)  # in place: grad_x is our own buffer

        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, m_local]
        if ctx.needs_input_grad[1] or ctx.has_proxy:
            if sequence_parallel:
                chunks_tokens = all_gather_dim0(tokens, group, counter).chunk(
                    dist.get_world_size(group)
                )
            if sequence_parallel and not compressor.basis_is_shared:
                # Each rank factorised its own tokens: lift every rank's chunk in its own basis.
                gathered_basis = []
                for b in basis:
                    gathered_basis.append(all_gather_dim0(b.unsqueeze(0), group, counter))
                grad_w = sum(
                    compressor.lift(
                        g.t().matmul(t), tuple(gb[i] for gb in gathered_basis), ctx.seeds
                    )
                    for i, (g, t) in enumerate(
                        zip(g2d.chunk(len(chunks_tokens)), chunks_tokens, strict=True)
                    )
                )
            else:
                if sequence_parallel:
                    tokens = torch.cat(chunks_tokens)
                ghat = g2d.t().matmul(tokens)  # [m_local, c]
                if ctx.has_proxy:
                    subspace_state(ctx.weight).record_seeds(ctx.seeds)
                    grad_proxy = ghat
                elif ctx.subspace:
                    accumulate_compressed_grad(ctx.weight, ghat, ctx.seeds)
                else:
                    grad_w = compressor.lift(ghat, tuple(basis), ctx.seeds)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(dim=0)
        return grad_x, grad_w, grad_b, grad_proxy, None, None, None, None, None, None


def _reduce_output_and_tokens(out, tokens, group, output_reduce: str, counter: CommCounter):
    """Sum the partial output [s, b, m] and partial ``Z`` [N, r] (N = s*b, or ``None``) over
    ``group`` in one collective: an all-reduce, or under sequence parallelism a reduce-scatter
    along the sequence. Returns this rank's output and ``Z`` ([s/t, b, m] and [N/t, r] under
    SP); rows of [N, .] are sequence-major, so splitting them splits the sequence."""
    s, b, m = out.shape
    parts = [out.reshape(s * b, m)]
    if tokens is not None:
        parts.append(tokens.to(out.dtype))
    buffer = torch.cat(parts, dim=1)  # [N, m + r]: our own buffer
    if output_reduce == _REDUCE_SCATTER:
        buffer = reduce_scatter_dim0(buffer, group, counter)  # [N/t, m + r]
    else:
        counter.record("all_reduce", buffer)
        dist.all_reduce(buffer, group=group)
    out = buffer[:, :m].reshape(buffer.shape[0] // b, b, m)
    if tokens is not None:
        # A copy: a view would keep the whole [N, m + r] buffer alive until backward.
        tokens = buffer[:, m:].to(tokens.dtype, copy=True, memory_format=torch.contiguous_format)
    return out, tokens


def _gather_grad_and_tokens(grad_out, tokens, group, counter: CommCounter):
    """All-gather the sequence-sharded output gradient [s/t, b, m] and saved ``Z`` [N/t, r]
    (or ``None``) in one collective: the full [s, b, m] gradient and [N, r] ``Z``."""
    s_local, b, m = grad_out.shape
    parts = [grad_out.reshape(s_local * b, m)]
    if tokens is not None:
        parts.append(tokens.to(grad_out.dtype))
    buffer = all_gather_dim0(torch.cat(parts, dim=1), group, counter)  # [N, m + r]
    grad_out = buffer[:, :m].reshape(buffer.shape[0] // b, b, m)
    if tokens is not None:
        tokens = buffer[:, m:].to(tokens.dtype)
    return grad_out, tokens


class _RecomputedInputParallelLinear(torch.autograd.Function):
    """``Y = f(R) W^T`` on one TP shard for an *uncompressed* layer whose input ``X = f(R)`` is
    recomputed from a tensor ``R`` that backward keeps anyway (FC2 after the SwiGLU: ``R`` is
    ``[gate | up]``, which the SwiGLU's own backward needs).

    Keeps ``R`` only. Backward re-runs ``f`` on it, takes the weight gradient ``g^T X`` exactly
    as the uncompressed layer does (same ``X``, same GEMM) and backpropagates ``dX = g W``
    through the re-run ``f`` (the same ops autograd would have recorded). No collective
    inside: the row-parallel output reduction stays where it is for every row-parallel layer.
    """

    @staticmethod
    def forward(ctx, source, weight, input_fn, storage, packed=None):
        x = input_fn(source)  # [s, b, n_local]
        # ``storage`` (an 8-bit or low-rank packer, actcomp_dist.storage) keeps ``R`` packed;
        # ``packed``: ``R`` as its producer already packed it with ``storage`` (kept as is).
        if packed is None:
            packed = (source,) if storage is None else storage.pack(source)
        ctx.save_for_backward(weight, *packed)
        ctx.input_fn, ctx.storage = input_fn, storage
        ctx.source_like = torch.empty_like(source, device="meta")
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad_out):
        weight, *packed = ctx.saved_tensors
        if ctx.storage is None:
            (source,) = packed
        else:
            source = ctx.storage.unpack(tuple(packed), ctx.source_like)
        grad_source = grad_w = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)  # [s, b, n_local]: this rank's shard of dX
        vjp = getattr(ctx.input_fn, "vjp", None)
        if vjp is not None and grad_x is not None:
            x, grad_source = vjp(source, grad_x)
        else:
            with torch.enable_grad():
                source = source.detach().requires_grad_(grad_x is not None)
                x = ctx.input_fn(source)
            if grad_x is not None:
                (grad_source,) = torch.autograd.grad(x, source, grad_x)
        if ctx.needs_input_grad[1]:
            g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, m]
            grad_w = g2d.t().matmul(x.detach().reshape(-1, x.shape[-1]))
        return grad_source, grad_w, None, None, None


class _CompressedParallelMixin:
    """Shared set-up of the compressor on a Megatron parallel linear."""

    def _setup_compression(
        self,
        compression: CompressionConfig | None,
        layer_id: int,
        site: str,
        schedule: CompressionSchedule | None,
        layout: BlockLayout,
    ) -> None:
        compression = compression or CompressionConfig()
        self.compression = compression
        self.layer_id, self.site = layer_id, site
        self.schedule = schedule or CompressionSchedule(compression.resample_every)
        self.compressor = build_compressor(compression, layout, layer_id, site, self.schedule)
        self.compressor.to(self.weight.device)
        self.subspace = compression.grad_mode == "subspace"
        if self.subspace:
            mark_subspace_parameter(self.weight, self.compressor)
        self.comm = {"forward": CommCounter(), "backward": CommCounter()}

    def reset_comm(self) -> None:
        for counter in self.comm.values():
            counter.reset()

    @property
    def recomputes_input(self) -> bool:
        """Whether the layer is uncompressed with ``lift`` gradients, so its weight gradient
        reads its exact input: a row-parallel ``forward(source, input_fn=f)`` then keeps only
        ``source`` and recomputes ``f(source)``, and a column-parallel ``forward(x,
        stored=...)`` keeps the given packed ``x`` instead of ``x``. A compressed layer keeps
        its own compressed input."""
        return (
            self.compressor.is_identity
            and not self.subspace
            and getattr(self, "subspace_proxy", None) is None
        )

    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if self.training and torch.is_grad_enabled():
            self.compressor.maybe_initialize(x.reshape(-1, x.shape[-1]), _world_all_reduce)

    def _compressed_forward(
        self, x, bias, dgrad: str, output_reduce: str = _REDUCE_NONE, compressor=None
    ):
        self._maybe_initialize(x)
        return _CompressedParallelLinear.apply(
            x,
            self.weight,
            bias,
            getattr(self, "subspace_proxy", None),
            compressor or self.compressor,
            self.subspace,
            self.tp_group,
            dgrad,
            self.comm,
            output_reduce,
        )


class _GivenFactors:
    """The compressor of an uncompressed layer whose input ``x`` arrives with LoRAct factors
    ``x ~= L Q^T`` that its producer keeps anyway (``norm: lowrank:R``,
    :mod:`actcomp_dist.storage`): the layer keeps the same ``L`` [N, k] and ``Q`` [n, k]
    instead of ``x``, and its weight gradient is ``(g^T L) Q^T``, the gradient at the
    reconstruction. ``Q`` is per rank (under SP each rank factorised its own tokens)."""

    basis_is_shared = False

    def __init__(self, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.low, self.q = factors

    def compress(self, x2d: torch.Tensor) -> Compressed:
        assert self.low.shape[0] == x2d.shape[0] and self.q.shape[0] == x2d.shape[1]
        return Compressed(self.low, (self.q,))

    def lift(self, ghat, basis, seeds):
        (q,) = basis
        return ghat.matmul(q.t())  # [m, n]


class _GivenPacked:
    """The compressor of an uncompressed layer whose input ``x`` arrives packed in 8 bits by
    its producer (``norm: int8`` / ``fp8``): the layer keeps the same codes and scales instead
    of ``x`` and dequantises them in backward (before the sequence-parallel all-gather, which
    then moves what Megatron's moves); its weight gradient is ``g^T x_hat``."""

    basis_is_shared = True

    def __init__(self, packer, packed: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.packer, self.packed = packer, packed

    def compress(self, x2d: torch.Tensor) -> Compressed:
        self.like = torch.empty_like(x2d, device="meta")
        codes, scales = self.packed
        return Compressed(codes, (scales,))

    def unpack_saved(self, tokens, basis):
        return self.packer.unpack((tokens, *basis), self.like), ()

    def lift(self, ghat, basis, seeds):
        return ghat


def _given_input(stored):
    """The compressor that keeps a producer's packed input: ``stored = (packer, packed)``."""
    packer, packed = stored
    return _GivenFactors(packed) if isinstance(packer, LowRankStorage) else _GivenPacked(*stored)


def _world_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over every rank: sub-token vectors must agree across all TP and DP ranks."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class CompressedColumnParallelLinear(_CompressedParallelMixin, ColumnParallelLinear):
    """Megatron ``ColumnParallelLinear`` whose weight gradient uses a compressed input.

    Same constructor as Megatron's, plus ``compression``, ``layer_id``, ``site`` and
    ``schedule`` (the model-wide step counter). ``forward`` returns ``(output, bias)`` like
    Megatron's. Not supported: ``gather_output`` at runtime changes, expert layers,
    ``skip_weight_param_allocation`` / external weights, deferred embedding wgrad.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        compression: CompressionConfig | None = None,
        layer_id: int = 0,
        site: str = "column",
        schedule: CompressionSchedule | None = None,
        **megatron_kwargs,
    ) -> None:
        super().__init__(input_size, output_size, **megatron_kwargs)
        if self.weight is None or self.is_expert or self.config.defer_embedding_wgrad_compute:
            raise ValueError(
                "CompressedColumnParallelLinear does not support skip_weight_param_allocation, "
                "expert layers or deferred embedding wgrad"
            )
        if self.config.gradient_accumulation_fusion:
            raise ValueError(
                "CompressedColumnParallelLinear computes its own weight gradient; set "
                "gradient_accumulation_fusion=False"
            )
        self._setup_compression(compression, layer_id, site, schedule, BlockLayout(input_size))

    def forward(
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output=None,
        stored=None,
    ):
        """Megatron's forward. ``stored``: ``(packer, packed)``, ``input_`` (this rank's
        tokens) as its producer keeps it, packed by a :mod:`actcomp_dist.storage` packer
        (LoRAct's factors ``(L, Q)`` or 8-bit codes and scales). An uncompressed layer
        (:attr:`recomputes_input`) keeps the same tensors instead of ``input_``; its weight
        gradient reads ``L Q^T`` (as ``(g^T L) Q^T``) or the dequantised input, its input
        gradient stays exact. A compressed layer ignores them and keeps its own tensor."""
        if weight is not None and weight is not self.weight:
            raise ValueError("CompressedColumnParallelLinear does not take an external weight")
        bias = self.bias if not self.skip_bias_add else None
        tp_size = dist.get_world_size(self.tp_group)
        if self.sequence_parallel:
            dgrad = _DGRAD_SEQUENCE_PARALLEL
        else:
            dgrad = _DGRAD_ALL_REDUCE if tp_size > 1 else _DGRAD_NONE
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and tp_size > 1:
            raise ValueError(
                "CompressedColumnParallelLinear does not gather its output; its consumers "
                "(attention, SwiGLU) work on the local shard"
            )
        given = _given_input(stored) if stored is not None and self.recomputes_input else None
        output = self._compressed_forward(input_, bias, dgrad, compressor=given)
        return output, (self.bias if self.skip_bias_add else None)


class CompressedRowParallelLinear(_CompressedParallelMixin, RowParallelLinear):
    """Megatron ``RowParallelLinear`` whose weight gradient uses a compressed input.

    The layout of the sharded input is the method's ``row_parallel_layout`` (``compact``: the
    dense single-device projection, or with ``row_parallel_projection="block"`` one
    block-diagonal over ``compression.row_parallel_blocks`` canonical blocks K, which the TP
    size must divide). Same constructor as Megatron's plus ``compression``,
    ``layer_id``, ``site`` and ``schedule``. Requires ``input_is_parallel=True``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        compression: CompressionConfig | None = None,
        layer_id: int = 0,
        site: str = "row",
        schedule: CompressionSchedule | None = None,
        **megatron_kwargs,
    ) -> None:
        super().__init__(input_size, output_size, **megatron_kwargs)
        if not self.input_is_parallel or self.is_expert:
            raise ValueError(
                "CompressedRowParallelLinear needs input_is_parallel=True and no expert layers"
            )
        compression = compression or CompressionConfig()
        tp_size = dist.get_world_size(self.tp_group)
        tp_rank = dist.get_rank(self.tp_group)
        layout = layer_layout(
            compression, input_size, row_parallel=True, tp_rank=tp_rank, tp_size=tp_size
        )
        self._setup_compression(compression, layer_id, site, schedule, layout)

    def forward(self, input_: torch.Tensor, input_fn=None, storage=None, stored=None):
        """``input_fn``: the layer's input is ``input_fn(input_)``, a pure function of one
        tensor that backward needs anyway (FC2: ``swiglu`` of ``[gate | up]``). The layer then
        never keeps ``input_fn(input_)`` itself: uncompressed it keeps ``input_`` and
        recomputes; compressed it keeps its compressed tensor and ``input_`` for
        ``input_fn``'s backward. ``input_fn.vjp``, where given, is ``(source, grad_x) ->
        (input_fn(source), grad of source)`` by hand, the values of autograd's (backward then
        calls no autograd inside; :func:`actcomp_dist.models.llama.swiglu_vjp`).
        Forward hooks see ``input_`` (not ``input_fn(input_)``), so
        callers with hooks that read the layer's input (adapters) must pass the input itself.
        ``storage``: with ``input_fn``, keep ``input_`` packed by this 8-bit or low-rank packer
        (:mod:`actcomp_dist.storage`); backward reads its dequantised copy. ``stored``:
        ``(storage, packed)``, ``input_`` already packed by ``storage`` by its producer (the
        attention's packed output); an uncompressed layer keeps those tensors instead of
        packing ``input_`` again (one storage), a compressed one ignores them.
        """
        tp_size = dist.get_world_size(self.tp_group)
        # A dense row-parallel projection sums the partial Z with the output, in one collective.
        # An identity compressor on that layout (``compression_disabled``) keeps X_i itself.
        fused = self.compressor.layout.partial_sum and not self.compressor.is_identity
        if not fused:
            reduce = _REDUCE_NONE
        else:
            reduce = _REDUCE_SCATTER if self.sequence_parallel else _REDUCE_ALL
        if input_fn is None:
            output_parallel = self._compressed_forward(input_, None, _DGRAD_NONE, reduce)
        elif self.recomputes_input:
            packed = None
            if stored is not None:
                assert stored[0] is storage, "stored input packed by another packer"
                packed = stored[1]
            output_parallel = _RecomputedInputParallelLinear.apply(
                input_, self.weight, input_fn, storage, packed
            )
        else:
            output_parallel = self._compressed_forward(
                recompute_in_backward(input_fn, input_, storage), None, _DGRAD_NONE, reduce
            )
        if fused:
            output = output_parallel
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(
                output_parallel, self.tp_group, self.comm["forward"], self.comm["backward"]
            )
        elif tp_size > 1:
            output = reduce_from_tensor_parallel_region(
                output_parallel, self.tp_group, self.comm["forward"]
            )
        else:
            output = output_parallel
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
