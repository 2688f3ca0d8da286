"""A LLaMA decoder on megatron-core's tensor-parallel building blocks and our compressed layers.

Plain PyTorch modules, sequence-first like megatron-core (``[s, b, h]`` inside the model):

    tokens [b, s] -> VocabParallelEmbedding -> (SP: scatter along s) -> num_layers x block
      -> final RMSNorm -> (SP: gather along s) -> output layer [s, b, V/t]
      -> vocab-parallel cross-entropy -> per-token loss [b, s]

(megatron-core's computation over the model's TP group; with ``loss_chunk_tokens``, the output
layer and the cross-entropy run fused, a chunk of tokens at a time, and keep no logits: both in
:mod:`actcomp_dist.parallel.cross_entropy`)

    block(x, rope):  x = x + proj(attention(rope(qkv(norm(x)))))
                     x = x + fc2(silu(gate) * up),  [gate | up] = fc1(norm(x))

``qkv`` and ``fc1`` are column-parallel, ``proj`` and ``fc2`` row-parallel; all four are built
from the classes of the model's :class:`LlamaLayerSpec` (``LlamaModel(spec=...)``), by default
:class:`~actcomp_dist.parallel.CompressedColumnParallelLinear` /
:class:`~actcomp_dist.parallel.CompressedRowParallelLinear`. The sites named in
``CompressionConfig.sites`` (default ``qkv``, ``fc1``, ``fc2``) use the configured method;
the others use method ``none``, which is Megatron's own computation (the layers are still ours
because Megatron's sequence-parallel path needs CUDA). Site ``v`` (VeLoRA's ``v_proj``) is the
value rows of the fused QKV: the QKV stays exact (it keeps its input for q and k) and the v
rows' weight gradient is the method's (:mod:`actcomp_dist.compression.row_slice`,
``attention.value_rows``). Every compressed layer's ``layer_id``
is its block index in the whole model and all of them share one
:class:`~actcomp_dist.seeds.CompressionSchedule`, ``model.compression_schedule``. The input
embedding, the norms and the output layer are never compressed.

**Layer spec and parallel context.** :class:`LlamaLayerSpec` names the class built at every
column-parallel site (``column_linear``: ``qkv``, ``fc1``) and every row-parallel site
(``row_linear``: ``proj``, ``fc2``), as megatron-core's ``ModuleSpec`` does for its layers; a
replacement takes the same constructor arguments as ours (megatron's plus ``compression``,
``layer_id``, ``site``, ``schedule``; ``tp_group`` is always passed). The model receives its
tensor-parallel group and device as a :class:`~actcomp_dist.parallel.state.ParallelContext`
(``parallel=``; ``None``: :func:`~actcomp_dist.parallel.state.get_parallel_context`, read once
at build) and looks up no process group afterwards: megatron-core's layers are handed
``tp_group``, and both losses (chunked or not) run over it.
The submodule names a saved tensor is charged to map to the memory model's kinds in
:mod:`actcomp_dist.models.kinds`.

**Fused layouts.** Megatron's column-parallel layers shard their weight by contiguous output
rows, so the fused weights are laid out for that (the layout megatron-core's ``GPTModel`` uses,
so weights move between the two models by renaming):

- QKV, ``[(heads + 2 * groups) * head_dim, hidden]``: per key/value group ``g`` the rows are
  ``[q heads of group g | k_g | v_g]``, groups in order. A contiguous shard of rows is a set of
  whole groups, so a rank holds its query heads together with the key/value heads they read.
- FC1, ``[2 * ffn, hidden]``: the full weight is ``[gate; up]`` and the layer is built with
  Megatron's ``stride=2``: the weight is cut into ``2t`` row chunks and rank ``i`` holds chunks
  ``i`` and ``t + i``, i.e. its shard is ``[gate_i; up_i]``. The SwiGLU splits the local
  output in halves, so each rank pairs matching gate and up rows.

With megatron's ``use_cpu_initialization`` each layer draws its *full* weight (in the layout
above) and keeps its shard, so one ``init_seed`` gives the same full model at every TP size.
Initialisation uses its own ``torch.Generator``: normal(0, ``init_method_std``) for the
embeddings, QKV, FC1 and the output layer, ``init_method_std / sqrt(2 * num_layers)`` for the
two projections that write into the residual stream (``proj``, ``fc2``), as megatron-core does.
:mod:`actcomp_dist.models.weights` maps between these shards and the logical (Hugging Face
named) q/k/v and gate/up weights.

**Sequence parallelism** (``sequence_parallel=True``, TP > 1): the residual stream, the norms
and the embedding output are sharded along ``s``; the compressed layers all-gather their input
(saving only a compressed local shard) and reduce-scatter their output. A norm weight then sees
only its rank's tokens, so its gradient is completed by an all-reduce inside autograd
(identity forward, all-reduce backward); norm-weight gradients are final when ``backward``
returns, and these weights carry no ``sequence_parallel`` attribute for a later reduction.
At TP = 1 the flag is a no-op. Attention always sees the whole sequence.

**Activation checkpointing hooks**: each block is its own module, ``model.layers[i]``, with a
plain ``forward(hidden, rope)`` (``rope`` is the ``(cos, sin)`` pair of
:meth:`LlamaModel.rope`), so a wrapper can checkpoint it; :meth:`LlamaModel.embed` and
:meth:`LlamaModel.head` are the parts before and after the blocks.

**What a block keeps for backward** (``efficient_ops``, default ``True``): one tensor per op
(RMSNorm keeps its output and rstd, attention keeps no alias of the fused QKV output, FC2 takes
``[gate | up]`` and recomputes the SwiGLU product); ``efficient_ops=False`` is the naive block,
the same model bit for bit as before the option existed. Forward results are identical. See
:mod:`actcomp_dist.models.efficient_ops`. ``storage_policy`` (``memory.policy``) can keep
the block norms' outputs, attention's q, k, v, o and SwiGLU's ``[gate | up]`` in 8 bits, and
the block norms' outputs and ``[gate | up]`` as LoRAct low-rank factors; a packed norm output
is kept once, by the norm and the uncompressed qkv / fc1 that reads it
(:mod:`actcomp_dist.storage`). ``attention`` / ``swiglu`` ``recompute`` re-runs that whole
sublayer in backward from the norm output (:func:`actcomp_dist.autograd.checkpoint_sublayer`,
which sublayer activation checkpointing installs on both sublayers as
``LlamaDecoderLayer.checkpoint_sublayer``).

RMSNorm (fp32 statistics) and RoPE (rotate-half, precomputed cos/sin) follow Hugging Face's
``LlamaForCausalLM`` so logits can be compared with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from actcomp_dist.autograd import checkpoint_sublayer, recompute_in_backward
from actcomp_dist.compression import BlockLayout, build_compressor
from actcomp_dist.compression.row_slice import RowSliceGradient, fused_qkv_value_rows
from actcomp_dist.config import TRANSFORMER_SITES, CompressionConfig, check_model_sites
from actcomp_dist.models.configs import LlamaConfig, check_tensor_parallel, get_model_config
from actcomp_dist.models.efficient_ops import rms_norm, stored_rms_norm
from actcomp_dist.parallel import CompressedColumnParallelLinear, CompressedRowParallelLinear
from actcomp_dist.parallel import state as parallel_state
from actcomp_dist.parallel.collectives import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from actcomp_dist.parallel.cross_entropy import (
    VocabParallelOutputLayer,
    vocab_parallel_cross_entropy,
)
from actcomp_dist.parallel.megatron_layers import ModelParallelConfig, VocabParallelEmbedding
from actcomp_dist.parallel.state import ParallelContext
from actcomp_dist.seeds import CompressionSchedule
from actcomp_dist.storage import StoragePolicy, attention_with_stored_output

#: The linear sites of a block, in forward order.
SITES = TRANSFORMER_SITES

Rope = tuple[torch.Tensor, torch.Tensor]
#: ``run(fn, *args)``: how a block evaluates its recomputable parts (norms, attention core,
#: SwiGLU product); plain calls unless selective activation checkpointing installs a recompute.
Recompute = Callable[..., torch.Tensor]


def _call(fn, *args):
    return fn(*args)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _identity_vjp(source: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return source, grad


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[gate | up]`` tensor (split on the last dimension)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_vjp(gate_up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``swiglu(gate_up)`` and the gradient of ``gate_up`` for the product's gradient ``grad``,
    by the ops autograd runs for :func:`swiglu` (mul's backward, then ``silu_backward``), so the
    same values bit for bit, without recording a graph and calling the autograd engine again
    inside a backward (about 0.2 ms per call on a CPU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    activated = F.silu(gate)
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    return activated * up, torch.cat([grad_gate, grad * activated], dim=-1)


# The input recipes' gradients by hand (CompressedRowParallelLinear's ``input_fn.vjp``).
_identity.vjp = _identity_vjp
swiglu.vjp = swiglu_vjp


@functools.cache
def _apex_fused_rms_norm():
    """apex's fused RMSNorm kernel when NVIDIA apex is installed, else ``None``.

    apex is optional and never a pip dependency (the PyPI package named ``apex`` is an
    unrelated project): imported lazily, on CUDA inputs only, with the plain PyTorch
    implementation as the fallback.
    """
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` with the statistics in fp32 (as Hugging Face LLaMA).

    ``sequence_parallel_group``: set when the input is sharded along the sequence; the weight's
    gradient, a sum over this rank's tokens only, is then all-reduced over the group.
    ``efficient``: keep only the output and the fp32 ``rstd`` for backward
    (:func:`actcomp_dist.models.efficient_ops.rms_norm`; same forward result).
    ``storage``: the packer of ``memory.policy.norm`` (LoRAct factors or 8-bit; needs
    ``efficient``): keep ``rstd`` and the packed output instead; the output then carries
    ``y.stored_as = (packer, packed)`` for the linear that reads it.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        dtype: torch.dtype = torch.float32,
        sequence_parallel_group: dist.ProcessGroup | None = None,
        efficient: bool = False,
        storage=None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.sequence_parallel_group = sequence_parallel_group
        self.efficient = efficient
        self.storage = storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel_group is not None:
            weight = copy_to_tensor_parallel_region(weight, self.sequence_parallel_group)
        if self.storage is not None:
            y, packed = stored_rms_norm(x, weight, self.eps, self.storage)
            # The packed output travels with y to the linear that reads it (the same tensors
            # are kept once; see actcomp_dist.storage). A tensor attribute, not a second
            # output, so the norm stays a one-in, one-out module for hooks and checkpoints.
            y.stored_as = None if packed is None else (self.storage, packed)
            return y
        if self.efficient:
            return rms_norm(x, weight, self.eps)
        fused = _apex_fused_rms_norm() if x.is_cuda else None
        if fused is not None:
            return fused(x, weight, weight.shape, self.eps)
        # The statistic in at least fp32 (float64 stays float64, so the model replays in it).
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, efficient={self.efficient}"


def _rotary_tables(
    head_dim: int, max_positions: int, theta: float, dtype: torch.dtype, device
) -> Rope:
    """``(cos, sin)`` [max_positions, head_dim] with the angles computed in ``dtype``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))  # [d/2]
    positions = torch.arange(max_positions, dtype=dtype, device=device)
    angles = torch.outer(positions, inv_freq)  # [s, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [s, d]
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """Precomputed rotary tables for positions ``[0, max_positions)``.

    Frequencies as Hugging Face LLaMA: ``inv_freq[j] = theta ** (-2j / head_dim)``, the angle
    table duplicated over both halves of the head (``cat(freqs, freqs)``), applied with
    rotate-half (not interleaved pairs).

    ``forward(seq_len, dtype)`` returns the tables in ``dtype``; a cast copy of the fp32
    buffers is made once per (dtype, device) and cached here, so bf16 activations do not cast
    the tables on every call. (The cache is derived state: not in the state dict and rebuilt
    on first use after ``.to(device)``.)
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        cos, sin = _rotary_tables(head_dim, max_positions, theta, torch.float32, None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._cast_tables: dict[tuple[torch.dtype, torch.device], Rope] = {}

    def _tables(self, dtype: torch.dtype | None) -> Rope:
        wide = dtype is not None and torch.promote_types(dtype, torch.float32) != torch.float32
        if not wide and (dtype is None or dtype == self.cos.dtype):
            return self.cos, self.sin
        key = (dtype, self.cos.device)
        if key not in self._cast_tables:
            with torch.no_grad():
                if wide:
                    # float64: angles and cos / sin computed in float64, not the fp32 values
                    # widened (``model.double()`` casts the buffers, not their precision).
                    self._cast_tables[key] = _rotary_tables(
                        self.head_dim, self.cos.shape[0], self.theta, dtype, self.cos.device
                    )
                else:
                    self._cast_tables[key] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._cast_tables[key]

    def forward(self, seq_len: int, dtype: torch.dtype | None = None) -> Rope:
        if seq_len > self.cos.shape[0]:
            raise ValueError(
                f"sequence length {seq_len} exceeds the rotary table ({self.cos.shape[0]} "
                f"positions); raise LlamaConfig.seq_length"
            )
        cos, sin = self._tables(dtype)
        return cos[:seq_len], sin[:seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x`` [b, heads, s, d] by the angles of its positions (``rope`` tables [s, d])."""
    cos, sin = (t.to(x.dtype) for t in rope)
    return x * cos + rotate_half(x) * sin


@dataclasses.dataclass(frozen=True)
class LlamaLayerSpec:
    """The linear classes of a block (see the module docstring).

    Fields:
        column_linear: built at the column-parallel sites ``qkv`` and ``fc1``.
        row_linear: built at the row-parallel sites ``proj`` and ``fc2``.

    Each takes the constructor arguments of the default class (a subclass is the usual
    replacement) and returns ``(output, bias)`` from ``forward`` like it.
    """

    column_linear: type[nn.Module] = CompressedColumnParallelLinear
    row_linear: type[nn.Module] = CompressedRowParallelLinear


@dataclasses.dataclass
class _Builder:
    """What every layer of one model is built from: one place that picks the linear classes."""

    config: LlamaConfig
    compression: CompressionConfig
    schedule: CompressionSchedule
    megatron_config: ModelParallelConfig
    tp_group: dist.ProcessGroup
    tp_size: int
    sequence_parallel: bool
    init_method: Callable[[torch.Tensor], torch.Tensor]
    output_init_method: Callable[[torch.Tensor], torch.Tensor]
    efficient_ops: bool
    storage: StoragePolicy
    spec: LlamaLayerSpec

    def _compression_for(self, site: str) -> CompressionConfig:
        if site in self.compression.sites:
            return self.compression
        return self.compression.replace(method="none", grad_mode="lift")

    def column_parallel(self, in_features, out_features, *, site, layer_id, stride=1):
        return self.spec.column_linear(
            in_features,
            out_features,
            config=self.megatron_config,
            init_method=self.init_method,
            bias=False,
            gather_output=False,
            stride=stride,
            tp_group=self.tp_group,
            compression=self._compression_for(site),
            layer_id=layer_id,
            site=site,
            schedule=self.schedule,
        )

    def row_parallel(self, in_features, out_features, *, site, layer_id):
        return self.spec.row_linear(
            in_features,
            out_features,
            config=self.megatron_config,
            init_method=self.output_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
            compression=self._compression_for(site),
            layer_id=layer_id,
            site=site,
            schedule=self.schedule,
        )

    def norm(self, in_block: bool = True) -> RMSNorm:
        """A block's norm (``in_block``; stored by ``memory.policy.norm``) or the final norm,
        which keeps its output (the output layer reads it)."""
        return RMSNorm(
            self.config.hidden_size,
            self.config.rms_norm_eps,
            self.config.params_dtype,
            self.tp_group if self.sequence_parallel else None,
            efficient=self.efficient_ops,
            storage=self.storage.packer("norm") if in_block else None,
        )


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention on this rank's heads (fused QKV, see module doc)."""

    def __init__(self, config: LlamaConfig, layer_id: int, build: _Builder) -> None:
        super().__init__()
        self.heads = config.num_attention_heads // build.tp_size
        self.groups = config.query_groups // build.tp_size
        self.heads_per_group = config.heads_per_group
        self.head_dim = config.head_dim
        self.efficient_ops = build.efficient_ops
        self.storage = build.storage.quantizer("attention")  # None: q, k, v, o kept as they are
        qkv_width = (config.num_attention_heads + 2 * config.query_groups) * config.head_dim
        self.qkv = build.column_parallel(
            config.hidden_size, qkv_width, site="qkv", layer_id=layer_id
        )
        self.proj = build.row_parallel(
            config.num_attention_heads * config.head_dim,
            config.hidden_size,
            site="proj",
            layer_id=layer_id,
        )
        # Site ``v``: the method's weight gradient on the value rows of this rank's groups,
        # the q and k rows exact (actcomp_dist.compression.row_slice).
        self.value_rows = None
        if "v" in build.compression.sites:
            compressor = build_compressor(
                build.compression,
                BlockLayout(config.hidden_size),
                layer_id,
                "v",
                build.schedule,
            )
            rows = fused_qkv_value_rows(self.groups, self.heads_per_group, self.head_dim)
            self.value_rows = RowSliceGradient(compressor, rows).to(self.qkv.weight.device)
            self.value_rows.attach(self.qkv.weight)

    def forward(self, x: torch.Tensor, rope: Rope, run: Recompute = _call) -> torch.Tensor:
        if self.value_rows is not None:
            self.value_rows.maybe_initialize(x)
        # [s, b, groups * (heads_per_group + 2) * d], s = full sequence
        mixed, _ = self.qkv(x, stored=getattr(x, "stored_as", None))
        out = run(self.core, mixed, *rope)  # [s, b, heads * d]
        if self.storage is not None and self.proj.recomputes_input and not self._proj_adapters:
            # proj keeps the attention output packed (its input is the output itself): the
            # attention's own packed copy where it keeps one (``out.stored_as``), one storage.
            out, _ = self.proj(
                out,
                input_fn=_identity,
                storage=self.storage,
                stored=getattr(out, "stored_as", None),
            )
        else:
            out, _ = self.proj(out)  # [s(/t), b, h]
        return out

    @property
    def _proj_adapters(self) -> bool:
        return bool(getattr(self.proj, "adapters", None))

    def core(self, mixed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE and scaled-dot-product attention: the part selective recompute re-runs."""
        s, b = mixed.shape[:2]
        mixed = mixed.view(s, b, self.groups, self.heads_per_group + 2, self.head_dim)
        q, k, v = mixed.split([self.heads_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, self.heads, self.head_dim).permute(1, 2, 0, 3)  # [b, heads, s, d]
        k = k.squeeze(3).permute(1, 2, 0, 3)  # [b, groups, s, d]
        v = v.squeeze(3).permute(1, 2, 0, 3)  # [b, groups, s, d]
        if self.efficient_ops:
            # A view of ``mixed`` would keep the whole fused QKV output alive through SDPA.
            v = v.contiguous()
        q, k = apply_rotary(q, (cos, sin)), apply_rotary(k, (cos, sin))
        if self.storage is not None:
            # Keeps packed q, k, v (on the CPU flash kernel also the packed output and the
            # log-sum-exp; actcomp_dist.storage). [s, b, heads * d], with ``out.stored_as``.
            return attention_with_stored_output(q, k, v, self.storage, self.groups != self.heads)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.groups != self.heads
        )  # [b, heads, s, d]; query head i reads key/value group i // heads_per_group
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)


class SwiGLUMLP(nn.Module):
    """``fc2(silu(gate) * up)`` with ``[gate | up]`` one fused column-parallel FC1.

    With ``efficient_ops`` FC2 gets ``[gate | up]`` and the SwiGLU as its input recipe and the
    product is never kept (see :mod:`actcomp_dist.models.efficient_ops`); adapters on FC2
    read its real input, so then the product is formed first (keeping ``[gate | up]`` only).
    """

    def __init__(self, config: LlamaConfig, layer_id: int, build: _Builder) -> None:
        super().__init__()
        self.efficient_ops = build.efficient_ops
        # None: [gate | up] kept as it is; else 8-bit or LoRAct factors (actcomp_dist.storage)
        self.storage = build.storage.packer("swiglu")
        self.fc1 = build.column_parallel(
            config.hidden_size, 2 * config.ffn_hidden_size, site="fc1", layer_id=layer_id, stride=2
        )
        self.fc2 = build.row_parallel(
            config.ffn_hidden_size, config.hidden_size, site="fc2", layer_id=layer_id
        )

    def forward(self, x: torch.Tensor, run: Recompute = _call) -> torch.Tensor:
        # [s, b, 2 * ffn/t]: this rank's [gate_i | up_i]
        gate_up, _ = self.fc1(x, stored=getattr(x, "stored_as", None))
        if not self.efficient_ops:
            out, _ = self.fc2(run(swiglu, gate_up))  # [s(/t), b, h]
        elif getattr(self.fc2, "adapters", None):
            out, _ = self.fc2(recompute_in_backward(swiglu, gate_up, self.storage))
        else:
            out, _ = self.fc2(gate_up, input_fn=swiglu, storage=self.storage)
        return out


class LlamaDecoderLayer(nn.Module):
    """One pre-norm block; ``forward(hidden, rope)`` is all a checkpointing wrapper needs."""

    def __init__(self, config: LlamaConfig, layer_id: int, build: _Builder) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.efficient_ops = build.efficient_ops
        self.input_norm = build.norm()
        self.attention = LlamaAttention(config, layer_id, build)
        self.mlp_norm = build.norm()
        self.mlp = SwiGLUMLP(config, layer_id, build)
        # Set by selective activation checkpointing (actcomp_dist.training): re-runs the norms,
        # the attention core and the SwiGLU product in backward instead of keeping their results.
        # With efficient_ops only the attention core: the efficient norm and SwiGLU keep one
        # tensor that a consumer keeps anyway, which is less than a recompute keeps (its input
        # plus the consumer's copy of the output).
        self.recompute: Recompute | None = None
        # Set by sublayer activation checkpointing: ``checkpoint_sublayer(run, y)`` runs the
        # attention / MLP sublayer on its norm output ``y`` keeping only what the norm keeps.
        self.checkpoint_sublayer: Callable[..., torch.Tensor] | None = None
        # memory.policy attention / swiglu ``recompute``: that sublayer alone, the same way.
        self.recompute_attention = build.storage.recomputes("attention")
        self.recompute_mlp = build.storage.recomputes("swiglu")

    def forward(self, hidden: torch.Tensor, rope: Rope) -> torch.Tensor:
        checkpoint_attention = self.checkpoint_sublayer or (
            checkpoint_sublayer if self.recompute_attention else None
        )
        checkpoint_mlp = self.checkpoint_sublayer or (
            checkpoint_sublayer if self.recompute_mlp else None
        )
        run = self.recompute or _call
        run_cheap = _call if self.efficient_ops else run
        normed = run_cheap(self.input_norm, hidden)
        if checkpoint_attention is not None:
            attention = functools.partial(self.attention, rope=rope)
            hidden = hidden + checkpoint_attention(attention, normed)
        else:
            hidden = hidden + self.attention(normed, rope, run)
        normed = run_cheap(self.mlp_norm, hidden)
        if checkpoint_mlp is not None:
            return hidden + checkpoint_mlp(self.mlp, normed)
        return hidden + self.mlp(normed, run_cheap)


class LlamaModel(nn.Module):
    """The decoder with its vocab-parallel embedding, output layer and loss.

    Tensor-parallel over ``parallel.tp_group`` (by default the TP group of
    :func:`actcomp_dist.parallel.state.initialize_model_parallel`) and built on the CPU
    (megatron's ``use_cpu_initialization``): move it with ``.to(device)`` afterwards, or use
    :func:`build_llama`.

    Args:
        config: the model shape (:func:`~actcomp_dist.models.configs.get_model_config`).
        compression: method and sites; ``None`` = method ``none`` (exactly the uncompressed
            model).
        sequence_parallel: shard the residual stream along the sequence (no-op at TP = 1).
        init_seed: seed of the weight initialisation (the same full weights at any TP size).
        loss_chunk_tokens: with labels, compute the output layer and cross-entropy
            ``loss_chunk_tokens`` tokens at a time and keep no logits for backward (they are
            recomputed chunk by chunk;
            :func:`~actcomp_dist.parallel.cross_entropy.vocab_parallel_linear_cross_entropy`);
            1024 - 2048 balances memory and GEMM size. ``None``: the logits and megatron's
            vocab-parallel cross-entropy
            (:func:`~actcomp_dist.parallel.cross_entropy.vocab_parallel_cross_entropy`, over
            ``parallel.tp_group``), which keeps the fp32 softmax ``[b*s, V/t]``.
        efficient_ops: blocks keep one tensor per op for backward (memory-efficient RMSNorm,
            no QKV alias kept by attention, SwiGLU recomputed inside FC2; see
            :mod:`actcomp_dist.models.efficient_ops`); ``False`` is the naive block (what
            papers usually measure against), bit for bit the model before the option existed.
            Forward results are identical either way.
        storage_policy: how each kind of saved tensor is stored (:mod:`actcomp_dist.storage`;
            ``None``: kept as it is). Policies other than ``keep`` need ``efficient_ops``.
        spec: the linear classes of the blocks (:class:`LlamaLayerSpec`; ``None``: ours).
        parallel: the tensor-parallel group the model is sharded over (and the device
            :func:`build_llama` moves it to); ``None``: the global parallel state's
            (:func:`~actcomp_dist.parallel.state.get_parallel_context`), read once here.
    """

    def __init__(
        self,
        config: LlamaConfig,
        compression: CompressionConfig | None = None,
        *,
        sequence_parallel: bool = False,
        init_seed: int = 0,
        loss_chunk_tokens: int | None = None,
        efficient_ops: bool = True,
        storage_policy: StoragePolicy | None = None,
        spec: LlamaLayerSpec | None = None,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        storage_policy = storage_policy or StoragePolicy()
        if not efficient_ops and not storage_policy.is_exact:
            raise ValueError(
                f"memory.policy {storage_policy.changes()} needs the memory-efficient block "
                f"(efficient_ops=True); the naive block keeps every tensor as it is"
            )
        if loss_chunk_tokens is not None and (
            isinstance(loss_chunk_tokens, bool)
            or not isinstance(loss_chunk_tokens, int)
            or loss_chunk_tokens < 1
        ):
            raise ValueError(
                f"loss_chunk_tokens={loss_chunk_tokens!r} must be None (logits kept) or an "
                f"int >= 1 (tokens per chunk of the chunked loss)"
            )
        compression = compression or CompressionConfig()
        check_model_sites(compression)
        for site in SITES:
            if getattr(storage_policy, site) == "compress" and not (
                compression.method != "none" and site in compression.sites
            ):
                # The run config resolves the policy into compression.sites (one place that
                # decides what is compressed); a policy that disagrees is a caller's error.
                raise ValueError(
                    f"memory.policy.{site}='compress' but the compression (method "
                    f"{compression.method!r}, sites {list(compression.sites)}) does not compress "
                    f"{site!r}; resolve the policy into compression.sites "
                    f"(actcomp_dist.storage.resolve_compressed_sites)"
                )
        parallel = parallel or parallel_state.get_parallel_context()
        tp_group, tp_size = parallel.tp_group, parallel.tp_size
        check_tensor_parallel(config, tp_size)
        self.spec = spec or LlamaLayerSpec()
        self.parallel = parallel
        self.config = config
        self.compression = compression
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp_size > 1
        self.loss_chunk_tokens = loss_chunk_tokens
        self.efficient_ops = efficient_ops
        self.storage_policy = storage_policy
        self.compression_schedule = CompressionSchedule(compression.resample_every)

        megatron_config = ModelParallelConfig(
            tensor_model_parallel_size=tp_size,
            sequence_parallel=self.sequence_parallel,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=config.params_dtype,
            gradient_accumulation_fusion=False,
        )
        generator = torch.Generator().manual_seed(init_seed)
        init_method = functools.partial(
            nn.init.normal_, mean=0.0, std=config.init_method_std, generator=generator
        )
        output_init_method = functools.partial(
            nn.init.normal_,
            mean=0.0,
            std=config.init_method_std / math.sqrt(2.0 * config.num_layers),
            generator=generator,
        )
        build = _Builder(
            config=config,
            compression=compression,
            schedule=self.compression_schedule,
            megatron_config=megatron_config,
            tp_group=tp_group,
            tp_size=tp_size,
            sequence_parallel=self.sequence_parallel,
            init_method=init_method,
            output_init_method=output_init_method,
            efficient_ops=efficient_ops,
            storage=storage_policy,
            spec=self.spec,
        )

        self.embedding = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            init_method=init_method,
            config=megatron_config,
            tp_group=tp_group,
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.seq_length, config.rope_theta)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, layer_id, build) for layer_id in range(config.num_layers)
        )
        self.final_norm = build.norm(in_block=False)
        # Uncompressed, output kept vocab-parallel for the cross-entropy. Under SP its input
        # arrives through our all-gather, whose backward reduce-scatters; so the layer must
        # neither gather itself (Megatron's SP path is CUDA-only) nor all-reduce its dgrad.
        self.output_layer = VocabParallelOutputLayer(
            config.hidden_size,
            config.vocab_size,
            config=dataclasses.replace(megatron_config, sequence_parallel=False),
            init_method=init_method,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=config.tie_embeddings,
            disable_grad_reduce=self.sequence_parallel,
            tp_group=tp_group,
        )

    def rope(self, seq_len: int, dtype: torch.dtype | None = None) -> Rope:
        """The ``(cos, sin)`` tables the blocks take for a sequence of ``seq_len`` tokens; with
        ``efficient_ops`` in ``dtype`` (the activations'; cached), else the fp32 buffers (in
        float64, computed in float64, for float64 activations)."""
        wide = dtype is not None and torch.promote_types(dtype, torch.float32) != torch.float32
        return self.rotary(seq_len, dtype if self.efficient_ops or wide else None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] -> the residual stream [s, b, h] ([s/t, b, h] under SP)."""
        if self.sequence_parallel and tokens.shape[1] % self.parallel.tp_size:
            raise ValueError(
                f"sequence parallelism needs the sequence length {tokens.shape[1]} to be "
                f"divisible by the tensor-parallel size {self.parallel.tp_size}"
            )
        hidden = self.embedding(tokens.t())  # [s, b, h], summed over the vocab shards
        if self.sequence_parallel:
            hidden = scatter_to_sequence_parallel_region(hidden, self.tp_group)
        return hidden

    def head(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final norm, output layer and (with ``labels``) the per-token loss; see forward."""
        hidden = self.final_norm(hidden)
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, self.tp_group)  # [s, b, h]
        weight = self.embedding.weight if self.config.tie_embeddings else None
        if labels is not None and self.loss_chunk_tokens is not None:
            # Logits chunk by chunk, in forward and again in backward; none are kept.
            losses, _ = self.output_layer(
                hidden, weight=weight, labels=labels.t(), chunk_tokens=self.loss_chunk_tokens
            )
            losses = losses.t()
        else:
            logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V/t]
            if labels is None:
                return logits.transpose(0, 1)
            # The cross-entropy works in at least fp32 (float64 logits stay float64) and edits
            # its input in place (not saved).
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            losses = vocab_parallel_cross_entropy(wide, labels.t().contiguous(), self.tp_group).t()
        if loss_mask is not None:
            losses = losses * loss_mask
        return losses

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [b, s] -> per-token losses [b, s] (fp32; zero where ``loss_mask`` is 0)
        when ``labels`` [b, s] are given, else this rank's logits [b, s, V/t] (vocab shard
        ``tp_rank``; the full vocabulary at TP = 1)."""
        hidden = self.embed(tokens)
        rope = self.rope(tokens.shape[1], hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, rope)
        return self.head(hidden, labels, loss_mask)

    def loss(
        self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean per-token loss over the positions where ``loss_mask`` is 1 (all if ``None``)."""
        losses = self(tokens, labels, loss_mask)
        if loss_mask is None:
            return losses.mean()
        return losses.sum() / loss_mask.sum().clamp(min=1)


def build_llama(
    config: LlamaConfig | str,
    compression: CompressionConfig | None = None,
    *,
    sequence_parallel: bool = False,
    init_seed: int = 0,
    device: torch.device | str | None = None,
    loss_chunk_tokens: int | None = None,
    efficient_ops: bool = True,
    storage_policy: StoragePolicy | None = None,
    spec: LlamaLayerSpec | None = None,
    parallel: ParallelContext | None = None,
) -> LlamaModel:
    """Build a :class:`LlamaModel` (``config`` may be a name: ``tiny``, ``60m``, ... ``7b``)
    and move it to ``device`` (default: the device of ``parallel``, which defaults to the
    global parallel state's context, read once)."""
    if isinstance(config, str):
        config = get_model_config(config)
    parallel = parallel or parallel_state.get_parallel_context()
    model = LlamaModel(
        config,
        compression,
        sequence_parallel=sequence_parallel,
        init_seed=init_seed,
        loss_chunk_tokens=loss_chunk_tokens,
        efficient_ops=efficient_ops,
        storage_policy=storage_policy,
        spec=spec,
        parallel=parallel,
    )
    return model.to(device if device is not None else parallel.device)
