"""Storage policies: how each kind of tensor a decoder block keeps for backward is stored.

``memory.policy`` maps a *kind* of saved tensor to a *policy* (defaults: ``keep`` everywhere).
Forward results never change: a policy only changes what backward reads.

Kinds: ``norm`` (the RMSNorm output), ``attention`` (q, k, v after RoPE and the attention
output that ``proj`` keeps), ``swiglu`` (``[gate | up]``, kept by ``fc2``), ``block_input``
(under full checkpointing) and the linear sites ``qkv``, ``proj``, ``fc1``, ``fc2``.

Policies implemented (:data:`IMPLEMENTED`):

- ``keep``: the tensor itself (the exact memory-efficient block).
- ``int8`` (``norm``, ``attention``, ``swiglu``, ``block_input``): per-group absmax. The last dimension is cut into
  groups of :data:`INT8_GROUP` elements (the whole last dimension when it is not a multiple);
  each group stores ``round(x / s)`` in int8 with one fp32 scale ``s = absmax / 127``.
  Per element ``|x - x_hat| <= s / 2``. Bytes: ``numel + 4 numel / group``. On CPU (float32,
  bfloat16) a fused C++ kernel packs and unpacks with the same values bit for bit
  (:mod:`actcomp_dist.cpu_kernels`).
- ``fp8`` (``norm``, ``attention``, ``swiglu``, ``block_input``): ``torch.float8_e4m3fn`` with one fp32 scale per row
  of the last dimension, ``s = absmax / 448`` (e4m3's largest finite value). e4m3 keeps 3
  mantissa bits: per element ``|x - x_hat| <= 2^-4 |x|`` for ``|x| / s >= 2^-6`` (normal
  range), and ``<= 2^-10 s`` below it (subnormal spacing 2^-9). Bytes: ``numel + 4 rows``.

Under tensor parallelism each rank packs its own shard (its heads' q, k, v; its
``[gate_i | up_i]``; its slice of the attention output), so an fp8 row scale covers the rank's
part of a row, and int8 groups are the TP = 1 groups whenever 64 divides the shard's halves.
The memory model (:mod:`actcomp_dist.memory_model`) counts the packed bytes exactly.

- ``lowrank:R`` (``norm``, ``swiglu``, ``block_input``; :class:`LowRankStorage`, also served by
  :mod:`actcomp_dist.hf`): LoRAct's online low-rank factors (Shi et al., "Memory-Efficient Fine-Tuning via Low-Rank Activation
  Compression", arXiv 2509.23472). For ``A`` [N, n] (the tensor as rows of its last dimension)
  and ``k = min(R, n)``: sample ``k`` feature columns ``S`` with a seeded generator (the same
  sample in every call; :mod:`actcomp_dist.hf` draws them afresh in every call from the global
  CPU generator, as the authors' code does: :class:`LowRankStorage` ``fresh_columns``), form
  ``Y = A^T A[:, S]`` [n, k] in ``A``'s dtype, orthonormalise ``Q = qr(Y)`` in float32 (float64
  for float64 inputs), keep ``L = A Q`` [N, k] and ``Q`` [n, k] in ``A``'s dtype
  (:func:`actcomp_dist.compression.lowrank.low_rank_factors`); backward reads
  ``A_hat = L Q^T = A Q Q^T``, the projection of every row onto ``range(Q)``. Hence
  ``||A - A_hat||_F = ||A (I - Q Q^T)||_F``: exact (to rounding) whenever the sampled columns
  span the column space of ``A`` (``rank(A[:, S]) = rank(A) <= k``), and never below the best
  rank-k error ``sqrt(sum_{i>k} sigma_i(A)^2)`` (Eckart-Young). Bytes: ``(N + n) k`` elements.
  No calibration, no state: the factors are computed in each forward. ``R`` is an absolute
  rank (an int, ``lowrank:64``) or a ratio of the factorised width with a decimal point
  (``lowrank:0.25``: ``k = ceil(0.25 n)``), spelled as ``compression.rank``. The width is the
  tensor's last dimension *on this rank*: under TP the ``[gate_i | up_i]`` shard.

- ``recompute`` (``attention``, ``swiglu``): the whole pre-norm sublayer (attention: qkv,
  RoPE + SDPA, proj; swiglu: fc1, SwiGLU, fc2) keeps nothing of its own and re-runs in
  backward from the norm output, which the norm keeps anyway
  (:func:`actcomp_dist.autograd.checkpoint_sublayer`; under a packed ``norm`` policy from the
  same packed tensors). Exact with ``norm: keep``. Cost: the sublayer's forward once more per
  backward (attention: the qkv and proj GEMMs and SDPA; swiglu: the fc1 and fc2 GEMMs).
  Removes q, k, v, o and the log-sum-exp (attention), ``[gate | up]`` (swiglu), and a
  compressed site's ``Z`` inside the sublayer. Refused where it removes nothing
  (:data:`RECOMPUTE_REFUSED`: ``norm``, ``block_input``, the linear sites).

- ``offload`` (``norm``, ``attention``, ``swiglu``, ``block_input``; :class:`HostOffload`):
  the tensor is copied to pinned host memory and the device copy is released; backward copies
  it back. Bitwise exact (a copy, not an encoding): losses and gradients equal ``keep``'s.
  Device bytes kept: 0 (a zero-element tensor remembers the device); host bytes: the tensor's
  ``numel * dtype bytes`` (:meth:`StoragePolicy.host_bytes`; the memory model reports them
  apart, as ``host_offload``). Wired exactly where ``int8`` / ``fp8`` are (below; an
  ``attention`` offload keeps q, k, v and proj's input on the host and re-runs SDPA in
  backward, as 8-bit attention does on CUDA). The stream discipline on CUDA:

  * ``pack`` makes a side stream (one per device) wait for the compute stream, so the copy
    starts after the tensor is written, and issues the device-to-host copy on it
    (``non_blocking``: forward does not wait for it). ``record_stream`` tells the caching
    allocator the side stream reads the tensor: when forward drops its last reference, the
    block is not handed out again before the copy has finished. The tensor must not be
    changed in place after ``pack`` (as for any tensor saved for backward).
  * ``unpack`` makes the compute stream wait for the side stream (the host copy is complete
    before it is read) and copies host -> device on the compute stream, so the ops of
    backward that read the result are ordered after it. The copy gets the saved tensor's
    strides back (a dense permuted view, as q and k after RoPE, stays one): backward's GEMMs
    see the layout they see under ``keep``. The pinned buffer is freed when
    autograd releases the saved tensors; PyTorch's pinned-memory allocator records the copy
    on its stream and does not reuse the buffer before the copy has run. That allocator
    rounds a block up to a power of two (below its ``pinned_max_round_threshold``), so the
    pinned memory held can exceed :meth:`StoragePolicy.host_bytes` (the tensors' own bytes)
    by up to 2x.

  Under activation checkpointing that re-runs the offloaded tensor's producer (``full``
  without a packed ``block_input``, ``selective`` for ``attention``), ``pack`` runs twice:
  in forward, where the checkpoint drops what was saved (a device-to-host copy for nothing),
  and in the re-run in backward, whose copy out and back is waited for at once. Correct,
  but only the blocks that are not checkpointed gain; offload the block input instead
  (``block_input: offload``).

  The host-to-device copies are not prefetched: each one runs when backward reaches the op
  that needs it (the cost model counts them as not overlapped, the forward copies as
  overlapped with forward compute; :mod:`actcomp_dist.cost_model`). On a CPU tensor ``pack``
  is an ordinary copy into unpinned memory and ``unpack`` a copy back: the same code runs,
  but host and device are one memory and nothing is saved, so a run config refuses
  ``offload`` without CUDA (:func:`actcomp_dist.training.config.validate_run`).

- ``compress`` (the linear sites ``qkv``, ``proj``, ``fc1``, ``fc2``): the site's input is
  compressed with ``compression.method`` (``keep``: not compressed). Another spelling of
  ``compression.sites``, resolved once at config load by :func:`resolve_compressed_sites`:
  without an explicit ``compression.sites`` the linear-site policies decide (the sites set to
  ``compress`` if any, else the default sites less those set to ``keep``); with an explicit
  list each linear-site policy must agree with it (``compress`` on a site outside the list,
  or ``keep`` on one inside it, is refused). ``compress`` with ``compression.method: none``
  is refused. The model builders read ``compression.sites`` only.

Named but not implemented yet (refused at start-up with that reason): ``lowrank:R`` of
``attention`` and the linear sites, 8-bit storage and ``offload`` of the linear sites (their
inputs are the tensors of the kinds above: set the policy there).

How the 8-bit kinds are wired (:mod:`actcomp_dist.models.llama`):

- ``block_input`` (``int8``, ``fp8``, ``lowrank:R``; needs ``activation_checkpointing.mode:
  full``): each checkpointed block keeps its input packed instead of the input itself, and
  backward re-runs the block from the unpacked copy. ``lowrank:R`` is LoRAct's layer mode.
  See :func:`actcomp_dist.training.activation_checkpointing.checkpoint_packed_input` for the
  gradient rule (every gradient inside the block at the reconstruction, the identity branch
  exact). Under SP each rank packs its own tokens ``[s/t, b, h]``.

- ``swiglu``: FC2 keeps the packed ``[gate | up]`` instead of the tensor and recomputes
  ``silu(gate) * up`` from its dequantised copy in backward (the same recompute it runs when
  keeping ``[gate | up]``); no extra compute.
- ``attention`` (:func:`attention_with_stored_output`): SDPA's backward needs q, k, v, the
  output o, the per-row log-sum-exp ``lse`` of the scores and dO: with
  ``P = exp(q k^T / sqrt(d) - lse)`` (causal), ``dV = P^T dO``,
  ``dS = P (dO V^T - rowsum(dO o))``, ``dQ = dS K / sqrt(d)``, ``dK = dS^T Q / sqrt(d)``
  (o enters only through ``rowsum(dO o)``). On the CPU flash kernel
  (:func:`stores_attention_output`) the attention runs the kernel's forward op, which
  returns ``lse``, and keeps packed q, k, v, the packed output ``[s, b, H d / t]`` (the layout
  proj reads) and the fp32 ``lse`` ``[b, H / t, s]``; backward runs the kernel's backward op
  on the dequantised q, k, v, o with that ``lse``. No forward again. An uncompressed proj
  keeps the *same* packed output (``out.stored_as``; one storage, counted once): its weight
  gradient reads the dequantised copy, so the output is dequantised twice. Against the
  forward again this is not the exact gradient at the dequantised point: the softmax
  ``exp(q_hat k_hat^T / sqrt(d) - lse)`` of the dequantised q, k with the exact ``lse`` sums to
  ``1 + O(packing error)`` per row, and ``rowsum(dO o_hat)`` is the dequantised output's, not the
  re-run's; both are first order in the packing error, bounded like it (tested against
  float64 through the Jacobian of the backward above), and with exact stored tensors the
  backward is SDPA's own bit for bit (the same two ops SDPA's autograd runs; the CPU kernel
  takes grouped k, v as they are, GQA included).
  Elsewhere (CUDA; a kernel other than flash chosen, e.g. under
  ``torch.nn.attention.sdpa_kernel``; ``offload``) :func:`attention_with_stored_inputs` runs
  SDPA without autograd in forward and keeps the packed q, k, v only (no output, no
  log-sum-exp); backward dequantises them, re-runs the SDPA forward under autograd and
  backpropagates through it (the exact backward at the dequantised point). Cost: one more
  attention forward per backward (as selective checkpointing of the attention core).
  ``proj`` then packs the attention output itself when it is uncompressed (its weight
  gradient reads it). Why not the kernel's ops on CUDA too: CUDA's SDPA picks among flash,
  memory-efficient and cuDNN kernels with different ops, ``lse`` layouts (padded in the
  memory-efficient kernel) and RNG state arguments, and the forward must stay SDPA's bit for
  bit; written without a GPU to run it, a wrong ``lse`` would silently give wrong gradients.
  The Hugging Face path (:mod:`actcomp_dist.hf.policy`) keeps the forward again on every
  device: its ``o_proj`` keeps its own input, so a packed output in the attention would add
  bytes there.
- ``swiglu: lowrank:R`` (LoRAct's act_fn mode): as the 8-bit ``swiglu``, FC2 keeps the factors
  of its shard ``[gate_i | up_i]`` (one factorisation of the fused tensor, ``(N + 2f/t) k``
  elements) and recomputes ``silu(gate) * up`` from ``L Q^T`` in backward.
- ``norm: lowrank:R`` (LoRAct's norm mode, on the two norms of each block; the final norm
  keeps its output): the norm keeps ``rstd`` and the factors of its output ``y``
  (:func:`actcomp_dist.models.efficient_ops.low_rank_rms_norm`), and an uncompressed qkv / fc1
  reading ``y`` keeps the *same* two tensors instead of ``y``: its input gradient ``g W`` is
  exact, its weight gradient is ``(g^T L) Q^T``, the gradient at the reconstruction (LoRAct's
  rule). The norm's own backward reads ``y ~= L Q^T``. A compressed qkv / fc1 keeps its own
  compressed input as always. With TP every rank factorises the same replicated ``y``; under
  sequence parallelism ``y`` is the rank's sequence shard: each rank factorises its own
  tokens, and the column-parallel layer all-gathers every rank's ``L`` and ``Q`` in backward
  (``(N/t) k + h k`` elements per rank instead of Megatron's ``(N/t) h``) and sums
  ``(g_i^T L_i) Q_i^T`` over the shards.
- ``norm: int8`` / ``fp8``: the same sharing with 8-bit codes and scales (the norm output is
  also the next uncompressed linear's input, so quantising it pays only because that linear
  keeps the same 8-bit copy): the norm's backward and the linear's weight gradient ``g^T y_hat``
  read the dequantised output, the linear's input gradient is exact. Under SP each rank
  dequantises its own tokens in backward before the all-gather Megatron does for ``y``.
  Groups and row scales lie within a token's ``h`` values, so packing does not depend on TP
  or SP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from actcomp_dist.compression.base import parse_rank_argument
from actcomp_dist.compression.lowrank import column_draw, low_rank_factors
from actcomp_dist.cpu_kernels import int8_ops_for
from actcomp_dist.seeds import seeded_generator

#: Kinds of saved tensor a policy can be set for.
KINDS = ("norm", "attention", "swiglu", "block_input", "qkv", "proj", "fc1", "fc2")
#: Every policy name (``lowrank:R`` takes a rank).
POLICIES = ("keep", "recompute", "int8", "fp8", "compress", "lowrank:R", "offload")
#: The policies each kind accepts today.
#: The linear sites (``compress`` / ``keep`` spell ``compression.sites``).
LINEAR_SITES = ("qkv", "proj", "fc1", "fc2")
IMPLEMENTED = {kind: ("keep", "compress") for kind in LINEAR_SITES} | {
    "norm": ("keep", "int8", "fp8", "lowrank:R", "offload"),
    "attention": ("keep", "int8", "fp8", "recompute", "offload"),
    "swiglu": ("keep", "int8", "fp8", "lowrank:R", "recompute", "offload"),
    "block_input": ("keep", "int8", "fp8", "lowrank:R", "offload"),
}
#: Why ``recompute`` is refused where it is: it would remove no bytes.
RECOMPUTE_REFUSED = {
    "norm": (
        "it would keep the norm's input instead of its output, the same N h bytes: the input "
        "(the residual stream) is kept by no other op, and an uncompressed qkv / fc1 keeps the "
        "output anyway; to recompute the norms use activation_checkpointing.mode 'full'"
    ),
    "block_input": (
        "the block input is what checkpointing keeps in order to recompute; use "
        "activation_checkpointing.mode 'none' or pack it (int8, fp8, lowrank:R)"
    ),
    **{
        site: (
            "a linear's input is the output of the op before it (a norm, the attention core, "
            "the SwiGLU); recompute that op's sublayer with memory.policy.attention or "
            "memory.policy.swiglu 'recompute'"
        )
        for site in ("qkv", "proj", "fc1", "fc2")
    },
}
#: Elements per int8 scale group (along the last dimension).
INT8_GROUP = 64
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Quantizer:
    """Packs a tensor into the tensors kept for backward and unpacks it in backward."""

    name: str

    def pack(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def unpack(self, packed: tuple[torch.Tensor, ...], like: torch.Tensor) -> torch.Tensor:
        """The dequantised tensor with ``like``'s shape and dtype (``like`` may be a meta
        tensor)."""
        raise NotImplementedError

    def saved_bytes(self, numel: int, last_dim: int) -> int:
        """Bytes :meth:`pack` keeps for a tensor of ``numel`` elements (last dim ``last_dim``)."""
        raise NotImplementedError


#: Absmax floor of a group / row: ``127 / x`` and ``448 / x`` stay finite in fp32 (an all-zero
#: group stores zero codes). A group whose absmax is below it keeps the floor's scale.
MIN_ABSMAX = 2.0**-100


def _scaled_rows(x: torch.Tensor, width: int, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as fp32 rows of ``width`` elements, each multiplied by ``limit / absmax`` of its
    row, and the absmax ``[rows, 1]`` (floored at :data:`MIN_ABSMAX`).

    One full-size fp32 temporary: the product is written into the fp32 copy of a non-fp32
    ``x`` (that copy is ours), and the absmax is ``max(amax, -amin)`` rather than
    ``abs().amax`` (no ``|x|`` tensor). The values are those of ``x.float()`` scaled the
    plain way, bit for bit; measured on the 2-core CPU (median of 120 interleaved calls with
    other allocations between them): bf16 ``[512, 2752]`` 1.7 vs 2.3 ms, fp32 and smaller
    tensors unchanged (``vector_norm(ord=inf)`` was 20x slower than either)."""
    rows = x.detach().reshape(-1, width)
    owned = rows.dtype != torch.float32
    if owned:
        rows = rows.float()
    absmax = torch.maximum(rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True).neg_())
    absmax.clamp_min_(MIN_ABSMAX)
    factor = limit / absmax
    return (rows.mul_(factor) if owned else rows * factor), absmax


def int8_group(last_dim: int) -> int:
    return INT8_GROUP if last_dim % INT8_GROUP == 0 else last_dim


class Int8Absmax(Quantizer):
    """Per-group absmax int8. On CPU float32 / bfloat16 tensors the fused kernels of
    :mod:`actcomp_dist.cpu_kernels` do the work (the same values bit for bit); elsewhere, or
    when they cannot be built, the PyTorch ops below."""

    name = "int8"

    def pack(self, x):
        width = int8_group(x.shape[-1])
        kernels = int8_ops_for(x)
        if kernels is not None:
            return tuple(kernels.int8_pack(x.detach(), width))
        return self.pack_with_torch_ops(x, width)

    def unpack(self, packed, like):
        codes, scale = packed
        kernels = int8_ops_for(codes, like.dtype)
        if kernels is not None:
            return kernels.int8_unpack(codes, scale, like.dtype).reshape(like.shape)
        return self.unpack_with_torch_ops(packed, like)

    @staticmethod
    def pack_with_torch_ops(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[numel / width, width]`` and scales ``[numel / width, 1]`` by PyTorch ops."""
        # [numel / group, group] scaled by 127 / absmax of each group
        scaled, absmax = _scaled_rows(x, width, 127.0)
        # |x * 127 / absmax| <= 127 (1 + 2u) rounds to at most 127: no clamp needed.
        codes = scaled.round_().to(torch.int8)
        return codes, absmax.div_(127.0)

    @staticmethod
    def unpack_with_torch_ops(packed, like) -> torch.Tensor:
        codes, scale = packed
        # In place after the cast: measured 20x faster on CPU than ``codes.float() * scale``.
        return codes.to(torch.float32).mul_(scale).to(like.dtype).reshape(like.shape)

    def saved_bytes(self, numel, last_dim):
        return numel + 4 * (numel // int8_group(last_dim))


class Fp8RowScaled(Quantizer):
    name = "fp8"

    def pack(self, x):
        scaled, absmax = _scaled_rows(x, x.shape[-1], _FP8_MAX)  # [numel / last, last]
        codes = scaled.to(torch.float8_e4m3fn)
        return codes, absmax.div_(_FP8_MAX)

    def unpack(self, packed, like):
        codes, scale = packed
        # In place after the cast: measured 20x faster on CPU than ``codes.float() * scale``.
        return codes.to(torch.float32).mul_(scale).to(like.dtype).reshape(like.shape)

    def saved_bytes(self, numel, last_dim):
        return numel + 4 * (numel // last_dim)


_QUANTIZERS = {"int8": Int8Absmax(), "fp8": Fp8RowScaled()}


class HostOffload(Quantizer):
    """``offload``: the tensor in host memory (pinned on CUDA), the device copy released (see
    the module doc for the stream discipline). ``pack`` returns ``(host copy, a zero-element
    tensor on the source device)``; the second only remembers where ``unpack`` copies back
    to (the ``like`` of :meth:`Quantizer.unpack` may be a meta tensor)."""

    name = "offload"

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, x):
        source = x.detach()
        anchor = source.new_empty(0)
        if source.device.type != "cuda":
            # One memory: a plain copy (nothing is saved; the run config refuses this case).
            return source.clone(memory_format=torch.contiguous_format), anchor
        host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        stream = self._stream(source.device)
        stream.wait_stream(torch.cuda.current_stream(source.device))
        with torch.cuda.stream(stream):
            host.copy_(source, non_blocking=True)
        # The allocator must not reuse the source's block before the side stream read it.
        source.record_stream(stream)
        return host, anchor

    def unpack(self, packed, like):
        host, anchor = packed
        device = anchor.device
        # ``like``'s strides (a dense permuted view stays one, as q after RoPE is): backward
        # gets the layout ``keep`` would have kept, so the GEMMs that read it (SDPA's re-run)
        # take the same kernels and give the same bits.
        out = torch.empty_like(like, dtype=host.dtype, device=device)
        if device.type != "cuda":
            return out.copy_(host.view(like.shape)).to(like.dtype)
        if device in self._streams:
            # The device-to-host copy has completed before the host buffer is read.
            torch.cuda.current_stream(device).wait_stream(self._streams[device])
        out.copy_(host.view(like.shape), non_blocking=True)
        return out.to(like.dtype)

    def saved_bytes(self, numel, last_dim):
        return 0  # device bytes; the host copy is :meth:`host_bytes`

    def host_bytes(self, numel: int, dtype_bytes: int) -> int:
        return numel * dtype_bytes


#: The element-wise packers (same shape back, no factorisation): 8-bit codes and host copies.
_ELEMENTWISE = _QUANTIZERS | {"offload": HostOffload()}


class LowRankStorage(Quantizer):
    """``lowrank:R``: LoRAct's sampled-column orthogonal factors ``L = A Q``, ``Q`` (see the
    module doc). ``rank``: an int ``R >= 1`` or a ratio of the width in ``(0, 1]`` (a float).
    ``seed`` fixes the sampled columns (a fresh generator per call, never the global RNG), so
    the same input always gives the same factors.

    ``fresh_columns=True`` (what :mod:`actcomp_dist.hf` uses): the columns are drawn afresh in
    every :meth:`pack`, as the authors' code does (github.com/shijxcs/meft, commit 78695c1,
    ``linalg/qb.py``: ``torch.randperm(n)[:k]`` from the global CPU generator in every
    compression), so each factorisation gets its own sample. ``seed`` is then unused. Like a
    dropout mask the draw consumes the global CPU RNG, and an activation-checkpoint re-run that
    restores the RNG state (Hugging Face's and ``torch.utils.checkpoint``'s, with
    ``preserve_rng_state``) redraws the same columns; :meth:`skip` takes the draw of a forward
    that does not pack (a no-grad training forward, which reentrant checkpointing runs)."""

    def __init__(self, rank: int | float, seed: int = 0, fresh_columns: bool = False) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int | float):
            raise ValueError(f"lowrank:R needs R an int >= 1 or a ratio in (0, 1], got {rank!r}")
        if isinstance(rank, int) and rank < 1 or isinstance(rank, float) and not 0 < rank <= 1:
            raise ValueError(f"lowrank:R needs R an int >= 1 or a ratio in (0, 1], got {rank}")
        self.rank, self.seed, self.fresh_columns = rank, seed, fresh_columns
        self.name = f"lowrank:{rank}"

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.fresh_columns:
            return torch.default_generator  # the global CPU generator, as the authors draw
        return seeded_generator(self.seed, device)

    def skip(self, n: int) -> None:
        """Take the draw :meth:`pack` would take for a tensor of width ``n`` (only
        ``fresh_columns`` draws)."""
        if self.fresh_columns:
            column_draw(n, torch.default_generator)

    def width(self, n: int) -> int:
        """``k``, the number of factor columns for a tensor whose last dimension is ``n``."""
        if isinstance(self.rank, int):
            return min(self.rank, n)
        return max(1, min(n, math.ceil(self.rank * n)))

    def pack(self, x):
        n = x.shape[-1]
        a = x.detach().reshape(-1, n)  # [N, n]; GEMMs in its dtype, the QR in float32
        return low_rank_factors(a, self.width(n), self._generator(x.device))

    def unpack(self, packed, like):
        low, q = packed
        return (low @ q.t()).to(like.dtype).reshape(like.shape)

    def saved_bytes(self, numel, last_dim, dtype_bytes: int = 4):
        return (numel // last_dim + last_dim) * self.width(last_dim) * dtype_bytes


def storage_for(policy: str) -> Quantizer | None:
    """The packer of one policy name: ``None`` for ``keep``, the 8-bit quantizers, the
    :class:`HostOffload` packer for ``offload``, a :class:`LowRankStorage` for ``lowrank:R``."""
    if policy == "keep":
        return None
    if policy in _ELEMENTWISE:
        return _ELEMENTWISE[policy]
    if _valid_policy_name(policy) and policy.startswith("lowrank:"):
        return LowRankStorage(parse_rank_argument(policy.partition(":")[2]))
    raise ValueError(
        f"storage policy {policy!r} has no packer; valid: keep, {list(_ELEMENTWISE)}, lowrank:R"
    )


def _valid_policy_name(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith("lowrank:"):
        try:
            LowRankStorage(parse_rank_argument(value.partition(":")[2]))
        except ValueError:
            return False
        return True
    return value in POLICIES


def policy_grammar(value: str) -> str:
    """The name a policy has in :data:`POLICIES` (``lowrank:64`` -> ``lowrank:R``)."""
    return "lowrank:R" if value.startswith("lowrank:") else value


@dataclasses.dataclass(frozen=True)
class StoragePolicy:
    """One policy per kind (see the module doc); ``StoragePolicy()`` keeps everything."""

    norm: str = "keep"
    attention: str = "keep"
    swiglu: str = "keep"
    block_input: str = "keep"
    qkv: str = "keep"
    proj: str = "keep"
    fc1: str = "keep"
    fc2: str = "keep"

    def __post_init__(self) -> None:
        for kind in KINDS:
            policy = getattr(self, kind)
            where = f"memory.policy.{kind}={policy!r}"
            if not _valid_policy_name(policy):
                raise ValueError(
                    f"{where} is not a policy; valid: {list(POLICIES)} (R an int >= 1 or a "
                    f"ratio in (0, 1] with a decimal point)"
                )
            if policy == "recompute" and kind in RECOMPUTE_REFUSED:
                raise ValueError(
                    f"{where} removes no bytes: {RECOMPUTE_REFUSED[kind]}; valid for "
                    f"{kind!r}: {list(IMPLEMENTED[kind])}"
                )
            if policy_grammar(policy) not in IMPLEMENTED[kind]:
                raise ValueError(
                    f"{where} is not implemented yet for kind {kind!r}; implemented: "
                    f"{list(IMPLEMENTED[kind])}"
                )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> StoragePolicy:
        """From ``memory.policy`` (kind -> policy); raises ``ValueError`` naming the field."""
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(KINDS))
        if unknown:
            raise ValueError(
                f"memory.policy has unknown kind(s) {unknown}; valid kinds: {list(KINDS)}"
            )
        return cls(**mapping)

    def changes(self) -> dict[str, str]:
        """The kinds whose policy is not ``keep``."""
        return {kind: getattr(self, kind) for kind in KINDS if getattr(self, kind) != "keep"}

    @property
    def is_exact(self) -> bool:
        return not self.changes()

    def recomputes(self, kind: str) -> bool:
        """``kind`` is ``recompute``: its sublayer re-runs in backward from the norm output."""
        return getattr(self, kind) == "recompute"

    def quantizer(self, kind: str) -> Quantizer | None:
        """The element-wise packer of ``kind`` (8-bit or :class:`HostOffload`), or ``None``
        when it is stored otherwise."""
        return _ELEMENTWISE.get(getattr(self, kind))

    def packer(self, kind: str) -> Quantizer | None:
        """The packer of ``kind`` (8-bit, :class:`HostOffload` or :class:`LowRankStorage`), or
        ``None`` for ``keep``, ``recompute`` and ``compress`` (a linear site's compression is
        its compressor's)."""
        if self.recomputes(kind) or kind in LINEAR_SITES:
            return None
        return storage_for(getattr(self, kind))

    @property
    def offloaded(self) -> tuple[str, ...]:
        """The kinds stored in host memory (``offload``)."""
        return tuple(kind for kind in KINDS if getattr(self, kind) == "offload")

    def host_bytes(self, kind: str, numel: int, dtype_bytes: int) -> int:
        """Host bytes kept for a tensor of ``kind`` (``numel`` elements of ``dtype_bytes``):
        the whole tensor under ``offload``, else 0."""
        return numel * dtype_bytes if getattr(self, kind) == "offload" else 0

    def saved_bytes(self, kind: str, numel: int, last_dim: int, dtype_bytes: int) -> int:
        """Bytes kept for a tensor of ``kind`` (``numel`` elements, last dimension
        ``last_dim``, ``dtype_bytes`` per element) under this policy."""
        packer = self.packer(kind)
        if packer is None:
            return numel * dtype_bytes
        if isinstance(packer, LowRankStorage):
            return packer.saved_bytes(numel, last_dim, dtype_bytes)
        return packer.saved_bytes(numel, last_dim)


def resolve_compressed_sites(
    policy: Mapping[str, Any], sites: tuple[str, ...] | None, method: str, default_sites
) -> tuple[str, ...]:
    """The compressed linear sites from ``memory.policy`` (its ``compress`` / ``keep`` entries
    on :data:`LINEAR_SITES`) and ``compression.sites`` (``sites``; ``None`` when the config
    does not set it, then ``default_sites`` apply), by the rule of the module doc. Raises
    ``ValueError`` naming the field for ``compress`` with ``method`` ``'none'`` and for a
    policy that contradicts an explicit ``compression.sites``."""
    named = {site: policy[site] for site in LINEAR_SITES if site in policy}
    compressed = [site for site in LINEAR_SITES if named.get(site) == "compress"]
    if compressed and method == "none":
        raise ValueError(
            f"memory.policy.{compressed[0]}='compress' compresses the site with "
            f"compression.method, which is 'none'; set compression.method to a compression "
            f"method or the policy to 'keep'"
        )
    if sites is not None:
        for site, value in named.items():
            if (value == "compress") != (site in sites):
                raise ValueError(
                    f"memory.policy.{site}={value!r} contradicts compression.sites="
                    f"{list(sites)}; list the compressed sites in one of the two (or make them "
                    f"agree: 'compress' exactly for the listed sites)"
                )
        return tuple(sites)
    if compressed:
        return tuple(compressed)
    return tuple(site for site in default_sites if named.get(site) != "keep")


def stores_attention_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool, quantizer: Quantizer
) -> bool:
    """Whether :func:`attention_with_stored_output` keeps the output and the log-sum-exp (the
    backward without the forward again): a ``quantizer`` other than ``offload`` and SDPA
    running these inputs on PyTorch's CPU flash kernel, whose forward returns the log-sum-exp
    and whose backward takes it (both take grouped ``k``, ``v`` as they are: GQA needs no
    expanded copy). Elsewhere backward runs the SDPA forward again: on CUDA (see the module
    doc), under a kernel other than flash (``torch.nn.attention.sdpa_kernel``), under CPU
    autocast, and for ``offload``, which runs on CUDA only (on a CPU tensor it stands in for
    the CUDA path, as the tests run it)."""
    return (
        not isinstance(quantizer, HostOffload)
        and q.device.type == "cpu"
        # Autocast casts SDPA's inputs but not the kernel's op: the forward would differ.
        and not torch.is_autocast_enabled("cpu")
        and torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        == int(SDPBackend.FLASH_ATTENTION.value)
    )


def _heads_last(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[s, b, heads * d]`` (proj's layout) as ``[b, heads, s, d]`` (SDPA's), a view."""
    s, b, width = x.shape
    return x.view(s, b, heads, width // heads).permute(1, 2, 0, 3)


def _tokens_first(o: torch.Tensor) -> torch.Tensor:
    """``[b, heads, s, d]`` as ``[s, b, heads * d]``: the attention output as proj reads it."""
    b, heads, s, d = o.shape
    return o.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def save_packed(ctx, quantizer: Quantizer, tensors, *extra: torch.Tensor) -> list[tuple]:
    """Save each of ``tensors`` packed by ``quantizer`` on an autograd ``ctx`` (then ``extra``
    as they are), with what :func:`load_packed` needs: the count of packed tensors and a meta
    tensor of the shape, dtype and strides of each (the dequantised copies take the layout of
    the originals). Returns the packed tuples."""
    packed = [quantizer.pack(t) for t in tensors]
    ctx.save_for_backward(*(t for pair in packed for t in pair), *extra)
    ctx.packed_counts = [len(pair) for pair in packed]
    ctx.packed_likes = [
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in tensors
    ]
    ctx.packed_quantizer = quantizer
    return packed


def load_packed(ctx) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors :func:`save_packed` saved, dequantised, and its ``extra`` tensors."""
    saved, out = list(ctx.saved_tensors), []
    for count, like in zip(ctx.packed_counts, ctx.packed_likes, strict=True):
        packed, saved = tuple(saved[:count]), saved[count:]
        out.append(ctx.packed_quantizer.unpack(packed, like))
    return out, saved


class _AttentionWithStoredOutput(torch.autograd.Function):
    """Causal SDPA on the CPU flash kernel keeping packed ``q``, ``k``, ``v``, the packed
    output ``o`` (``[s, b, heads * d]``, the layout proj reads, so proj can keep the same
    tensors) and the fp32 log-sum-exp ``[b, heads, s]``. Returns the output and its packed
    tensors (non-differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, quantizer):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)
        out = _tokens_first(o)  # [s, b, heads * d]
        packed = save_packed(ctx, quantizer, (q, k, v, out), lse)
        ctx.heads = q.shape[1]
        ctx.mark_non_differentiable(*packed[3])
        return out, *packed[3]

    @staticmethod
    def backward(ctx, grad_out, *_grad_packed):
        (q, k, v, out), (lse,) = load_packed(ctx)
        # SDPA's backward on the dequantised copies with the forward's log-sum-exp: the
        # softmax is exp(q_hat k_hat^T / sqrt(d) - lse) and the output enters only through
        # rowsum(dO * o_hat) (see the module doc for what this changes against the forward
        # again).
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_last(grad_out.contiguous(), ctx.heads),
            q,
            k,
            v,
            _heads_last(out, ctx.heads),
            lse,
            0.0,
            True,
        )
        return (*grads, None)


class _AttentionWithStoredInputs(torch.autograd.Function):
    """Causal SDPA keeping packed ``q``, ``k``, ``v`` only; backward runs the SDPA forward
    again on the dequantised copies and backpropagates through it."""

    @staticmethod
    def forward(ctx, q, k, v, quantizer, enable_gqa):
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        save_packed(ctx, quantizer, (q, k, v))
        ctx.enable_gqa = enable_gqa
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs, _ = load_packed(ctx)
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=ctx.enable_gqa)
        grads = torch.autograd.grad(out, inputs, grad_out)
        return (*grads, None, None)


def attention_with_stored_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quantizer: Quantizer, enable_gqa: bool
) -> torch.Tensor:
    """Causal SDPA of ``q`` ``[b, heads, s, d]``, ``k``, ``v`` ``[b, groups, s, d]`` that keeps
    them packed by ``quantizer`` and nothing else; backward re-runs SDPA on the dequantised
    copies. Forward is SDPA's, ``[b, heads, s, d]``. (The Hugging Face path's 8-bit attention,
    whose ``o_proj`` keeps its own input: see :mod:`actcomp_dist.hf.policy`.)"""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    return _AttentionWithStoredInputs.apply(q, k, v, quantizer, enable_gqa)


def attention_with_stored_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quantizer: Quantizer, enable_gqa: bool
) -> torch.Tensor:
    """Causal SDPA of ``q`` ``[b, heads, s, d]``, ``k``, ``v`` ``[b, groups, s, d]`` keeping
    them packed by ``quantizer``, and where :func:`stores_attention_output` also the packed
    output and the log-sum-exp (backward without the forward again; see the module doc);
    elsewhere :func:`attention_with_stored_inputs`. Returns the output as proj reads it,
    ``[s, b, heads * d]``, the values of SDPA's, with ``out.stored_as = (quantizer, packed)``,
    the output's packed tensors for proj to keep instead of packing it again (``None`` where
    the attention keeps no output)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if stores_attention_output(q, k, v, enable_gqa, quantizer):
            out, *packed = _AttentionWithStoredOutput.apply(q, k, v, quantizer)
            out.stored_as = (quantizer, tuple(packed))
            return out
    out = _tokens_first(attention_with_stored_inputs(q, k, v, quantizer, enable_gqa))
    out.stored_as = None
    return out


def element_error_bound(policy: str, x: torch.Tensor) -> torch.Tensor:
    """The per-element bound on ``|x - unpack(pack(x))|`` of an 8-bit policy (float64; before
    the final cast to ``x``'s dtype), from the scale of each element's group or row."""
    x64 = x.detach().double()
    if policy == "int8":
        group = int8_group(x.shape[-1])
        groups = x64.reshape(-1, group)
        scale = groups.abs().amax(-1, keepdim=True).clamp_min(MIN_ABSMAX) / 127.0
        # Half a quantisation step, plus fp32 rounding of x / s and of codes * s.
        bound = scale / 2 + 4 * 2.0**-24 * groups.abs()
        return bound.expand_as(groups).reshape(x.shape)
    if policy == "fp8":
        rows = x64.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(-1, keepdim=True).clamp_min(MIN_ABSMAX) / _FP8_MAX
        # Relative 2^-4 in the normal range, absolute 2^-10 s in the subnormal one; fp32
        # rounding of x / s and of codes * s.
        bound = 2.0**-4 * rows.abs() + 2.0**-10 * scale + 4 * 2.0**-24 * rows.abs()
        return bound.reshape(x.shape)
    raise ValueError(f"policy {policy!r} has no element bound; 8-bit policies: {list(_QUANTIZERS)}")


__all__ = [
    "HostOffload",
    "IMPLEMENTED",
    "LINEAR_SITES",
    "LowRankStorage",
    "INT8_GROUP",
    "KINDS",
    "POLICIES",
    "StoragePolicy",
    "attention_with_stored_inputs",
    "attention_with_stored_output",
    "element_error_bound",
    "load_packed",
    "policy_grammar",
    "resolve_compressed_sites",
    "save_packed",
    "storage_for",
    "stores_attention_output",
]
