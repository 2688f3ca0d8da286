"""Analytic memory model: what a LLaMA training step keeps on each GPU.

Two parts, both closed-form and per tensor-parallel rank:

1. **Saved activations per micro-batch** (:func:`predict_saved_activations`): the bytes of the
   tensors autograd keeps for backward, exactly as
   :func:`actcomp_dist.memory.saved_activation_bytes` counts them (each storage once, parameters
   excluded). The formulas were read off the real model, op by op (tiny config, measured with
   :func:`~actcomp_dist.memory.saved_activation_bytes_by_module`), and are asserted equal to
   the measurement for every method and checkpointing mode in ``tests/integration/test_memory_plan.py``.
2. **Model states** (:func:`predict_model_states`): parameters, gradients and optimizer state
   under DeepSpeed ZeRO stages 0-3 and CompAct's ``subspace`` mode, plus DeepSpeed's gradient
   bucket. :func:`plan_memory` adds the two, a transient estimate, and says whether it fits.

What one decoder block saves (``N = b*s`` tokens, ``e`` bytes per activation element: 4 fp32,
2 bf16; ``h`` hidden, ``H``/``G`` query/key-value heads of width ``d``, ``f`` FFN width; per
rank under TP = t the head counts, ``f`` and the vocabulary are divided by t; under sequence
parallelism the residual stream (norms, column-parallel inputs) holds ``N/t`` tokens).

With ``efficient_ops`` (the default; :mod:`actcomp_dist.models.efficient_ops`), one tensor per
op:

- each of the two RMSNorms: ``N h e + N 4`` (its output, which an uncompressed qkv / fc1 keeps
  as its input too: the same storage, so those sites add nothing; and the fp32 ``rstd``);
- attention core: ``N H d e + N G d e`` (q and k after RoPE) ``+ N G d e`` (``v``, a copy)
  ``+ N H d e`` (the output, which is also the uncompressed proj input) ``+ b H s 4`` (the
  fp32 log-sum-exp); plus the RoPE tables in the activation dtype, ``2 S d e`` once per model;
- SwiGLU and fc2: ``2 N f e`` (``[gate | up]``, kept by fc2, which recomputes
  ``silu(gate) * up``), charged to ``fc2``;
- storage policies (:mod:`actcomp_dist.storage`) replace a kept tensor by its packed bytes:
  8-bit ``attention`` / ``swiglu`` as :meth:`~actcomp_dist.storage.Quantizer.saved_bytes`
  (8-bit ``attention``: q, k, v packed; on CPU also the packed output, kept once for the
  attention and an uncompressed proj, and the fp32 log-sum-exp ``b H s 4``; on CUDA the packed
  output only for an uncompressed proj, charged to it; :attr:`ActivationSetting.device_type`);
  ``lowrank:R`` of ``swiglu`` keeps ``(N + 2f/t) k e`` for ``[gate | up]``, of ``norm``
  ``(N + h) k e`` per block norm instead of ``N h e``, 8-bit ``norm`` the 8-bit bytes of
  ``N h`` (``N/t`` tokens under SP; an uncompressed qkv / fc1 keeps the same packed tensors);
  the final norm always keeps its output; ``offload`` keeps the structure of the 8-bit
  policies with 0 device bytes per offloaded tensor, and the tensor whole (``numel e``) in host
  memory, reported apart (:attr:`ActivationPrediction.host_offload`, not in ``total``);
- a compressed site adds its compressed tensor (below);
- ``selective`` checkpointing recomputes only the attention core (the rest already keeps one
  tensor): the fused QKV output instead of the core's tensors, and the proj input
  ``N H d e`` (unless compressed) as a tensor of its own;
- ``recompute`` of ``attention`` / ``swiglu``: that sublayer keeps nothing (qkv, the core,
  proj / fc1, fc2, compressed sites included; no RoPE tables), it re-runs from the norm output;
- ``sublayer`` (pre-norm sublayer checkpointing): the two norms only, as above (their outputs,
  or under a packed ``norm`` policy the packed outputs, and ``rstd``); the sublayers are
  recomputed from them (no RoPE tables kept);
- ``full``: as without ``efficient_ops``; ``memory.policy.block_input`` packs the kept block
  input: ``(N + h) k e`` under ``lowrank:R`` (``k`` from ``h``), ``N h + 4 N h / 64`` under
  ``int8`` (``h`` a multiple of 64), ``N h + 4 N`` under ``fp8`` (``N/t`` tokens under SP);
- once per model: the final norm ``N h e + N 4`` and, under sequence parallelism only, the
  output layer's gathered input ``N h e`` (otherwise it is the final norm's output).

Without ``efficient_ops`` (the naive block):

- each of the two RMSNorms: ``N h 4 + N 4 + N h e`` (its fp32 input copy, which in fp32 is
  the input itself; the fp32 rsqrt; the normalised tensor);
- qkv and fc1 inputs: ``N h e`` each (the norm outputs);
- attention core: ``N H d e + N G d e`` (q and k after RoPE) ``+ N (H + 2G) d e`` (``v`` is a
  view of the fused QKV output and keeps all of it alive) ``+ N H d e`` (the output)
  ``+ b H s 4`` (the fp32 log-sum-exp); plus the RoPE tables: in fp32 the cos/sin buffers
  themselves, ``2 S d 4`` once per model (``S`` rows); in bf16 a cast copy per use,
  ``4 s d e`` per block;
- proj input: nothing more (it *is* the attention output);
- SwiGLU: ``2 N f e`` (``[gate | up]``) ``+ N f e`` (``silu(gate)``);
- fc2 input: ``N f e`` (``silu(gate) * up``).

A compressed site saves instead ``N c e`` plus a per-call basis, as its method declares in
``Compressor.saved_width`` (``compact``: ``c`` = rank; ``subtoken``: ``c`` = groups;
``lowrank``: ``c`` = rank and its basis ``n c e``; a plugin's method the same way). Only the linear's *input* shrinks: the norms,
the attention core and the SwiGLU keep what they save, so compressing qkv/fc1/fc2 at r = n/4
leaves far more than a quarter of a block (see the results section of the README).

``selective`` checkpointing keeps per block: both norm inputs (``2 N h e``), the fused QKV
output, the attention output (the ``proj`` input) unless ``proj`` is compressed, ``[gate|up]``
and the site inputs (``Z`` where compressed, the norm / SwiGLU outputs where not).
``full`` keeps only each block's input ``N h e``; inside the recompute the layers save their
compressed tensors, which only lowers the transient of one block.

Once per model: the token ids (``N 8``; ``N 9`` at TP > 1), the final norm, the output
layer's input ``N h e``, the fp32 softmax of the cross-entropy ``N V 4`` (+ a bool and an
int64 per token) and, with a loss mask, the mask ``N 4`` and its sum. With the chunked loss
(``loss_chunk_tokens``, :mod:`actcomp_dist.parallel.cross_entropy`) the output layer keeps,
besides its input, only an fp32 log-sum-exp and an int64 label per token (``N 12``) in place
of the ``N (4 V + 9)`` of the softmax: the logits are recomputed chunk by chunk in backward.

Assumptions: the attention kernel keeps no s x s matrix (PyTorch's CPU flash kernel and the
CUDA flash / memory-efficient kernels; on a GPU without them the math path also keeps the
attention probabilities); DeepSpeed casts parameters, not buffers, to bf16 (measured).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from actcomp_dist.compression import BlockLayout, get_compressor_class, layer_layout
from actcomp_dist.config import CompressionConfig
from actcomp_dist.storage import StoragePolicy

AC_MODES = ("none", "selective", "full", "sublayer")
_ROW_SITES = ("proj", "fc2")

#: Per-layer kinds, in forward order; model-wide kinds follow. Which of the model's submodules
#: is which kind is the model package's knowledge (:mod:`actcomp_dist.models.kinds`).
LAYER_KINDS = (
    "block_input",
    "norm",
    "qkv",
    "attention_core",
    "proj",
    "fc1",
    "swiglu",
    "fc2",
)
MODEL_KINDS = ("embedding", "final_norm", "output_layer", "loss")


class ModelShape(Protocol):
    """What the formulas need of :class:`actcomp_dist.models.LlamaConfig`."""

    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int

    @property
    def query_groups(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


@dataclass(frozen=True)
class ActivationSetting:
    """The shape of one micro-batch on one rank.

    Fields:
        micro_batch_size: sequences per micro-batch (``b``).
        seq_length: tokens per sequence (``s``).
        dtype_bytes: bytes per activation element: 4 (fp32) or 2 (bf16 / fp16).
        tensor_parallel: TP size ``t``.
        sequence_parallel: residual stream sharded along the sequence (TP > 1 only).
        loss_mask: the loss is masked (the trainer always passes a mask).
        rope_positions: rows of the rotary tables (the model's ``seq_length``; default ``s``).
        tp_rank: which tensor-parallel rank (row-parallel ranks may differ by one rank column).
        efficient_ops: the model's ``efficient_ops`` (one tensor per op; ``False``: the naive
            block).
        loss_chunk_tokens: the model's chunked loss (``LlamaModel(loss_chunk_tokens=...)``;
            ``None``: the logits and megatron's cross-entropy).
        storage: the model's storage policy (``memory.policy``; :mod:`actcomp_dist.storage`).
        device_type: where the model runs, ``"cpu"`` or ``"cuda"``: an 8-bit ``attention``
            keeps its packed output and the log-sum-exp on CPU (PyTorch's CPU flash kernel;
            :func:`actcomp_dist.storage.stores_attention_output`) and re-runs the SDPA
            forward on CUDA instead.
    """

    micro_batch_size: int
    seq_length: int
    dtype_bytes: int = 4
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    loss_mask: bool = True
    rope_positions: int | None = None
    tp_rank: int = 0
    efficient_ops: bool = True
    loss_chunk_tokens: int | None = None
    storage: StoragePolicy = field(default_factory=StoragePolicy)
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(
                f"ActivationSetting.device_type={self.device_type!r} must be 'cpu' or 'cuda'"
            )
        for name in ("micro_batch_size", "seq_length", "tensor_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ActivationSetting.{name}={value!r} must be an int >= 1")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"ActivationSetting.dtype_bytes={self.dtype_bytes} must be 2 or 4")

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_length

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tensor_parallel > 1


@dataclass
class ActivationPrediction:
    """Predicted saved-activation bytes of one micro-batch on one rank."""

    by_kind: dict[str, int]
    per_layer: list[int]  # bytes charged to each decoder block (layer-scoped kinds)
    #: Bytes kept in host memory (``memory.policy`` ``offload``), by kind and per block; not
    #: in ``total`` or ``per_layer``.
    host_offload: dict[str, int] = field(default_factory=dict)
    host_per_layer: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Device bytes."""
        return sum(self.by_kind.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_offload.values())

    @property
    def layers_total(self) -> int:
        return sum(self.per_layer)


def _site_width(
    site: str, compression: CompressionConfig, width: int, setting: ActivationSetting
) -> tuple[int, int]:
    """``(c, basis)``: the per-token width a linear at ``site`` (full input width ``width``)
    saves on this rank, and the elements of its saved per-call basis (the method's own
    :meth:`~actcomp_dist.compression.Compressor.saved_width`)."""
    compression, layout = _site_layout(site, compression, width, setting)
    return tuple(get_compressor_class(compression.method).saved_width(compression, layout))


def _site_layout(
    site: str, compression: CompressionConfig, width: int, setting: ActivationSetting
) -> tuple[CompressionConfig, BlockLayout]:
    """The compression a linear at ``site`` runs (``none`` off its sites) and its layout."""
    if site not in compression.sites:
        compression = compression.replace(method="none", grad_mode="lift")
    layout = layer_layout(
        compression,
        width,
        row_parallel=site in _ROW_SITES,
        tp_rank=setting.tp_rank,
        tp_size=setting.tensor_parallel,
    )
    return compression, layout


def _site_saved(
    site: str,
    compression: CompressionConfig,
    width: int,
    tokens: int,
    setting: ActivationSetting,
) -> int:
    """Bytes a linear at ``site`` saves for ``tokens`` tokens (the tokens of its input).

    A dense row-parallel projection keeps ``Z`` after the reduction that sums it with the
    output: under sequence parallelism that is a reduce-scatter, leaving tokens/t."""
    if setting.sp and _site_layout(site, compression, width, setting)[1].partial_sum:
        tokens //= setting.tensor_parallel
    c, basis = _site_width(site, compression, width, setting)
    return (tokens * c + basis) * setting.dtype_bytes


def _norm_saved(
    tokens: int, hidden: int, e: int, efficient_ops: bool, storage: StoragePolicy | None = None
) -> int:
    if efficient_ops:
        # The output in the input dtype (or its LoRAct factors [N, k] and [h, k] under
        # ``norm: lowrank:R``) and the fp32 rstd [N, 1].
        kept = (storage or StoragePolicy()).saved_bytes("norm", tokens * hidden, hidden, e)
        return kept + tokens * 4
    # x.float() (the input itself in fp32), rsqrt [N, 1] fp32, normed in the input dtype.
    return tokens * hidden * 4 + tokens * 4 + tokens * hidden * e


class _RankShape(NamedTuple):
    """A decoder block's sizes on one tensor-parallel rank."""

    e: int  # bytes per activation element
    n_all: int  # tokens attention and the row-parallel layers see: the whole sequence
    n_res: int  # tokens of the residual stream and the column-parallel inputs (N/t under SP)
    heads: int  # query heads on this rank
    groups: int  # key/value groups on this rank
    ffn: int  # FFN width on this rank


def _rank_shape(model: ModelShape, setting: ActivationSetting) -> _RankShape:
    t, n_all = setting.tensor_parallel, setting.tokens
    return _RankShape(
        e=setting.dtype_bytes,
        n_all=n_all,
        n_res=n_all // t if setting.sp else n_all,
        heads=model.num_attention_heads // t,
        groups=model.query_groups // t,
        ffn=model.ffn_hidden_size // t,
    )


def _compressed(site: str, compression: CompressionConfig) -> bool:
    return compression.method != "none" and site in compression.sites


def _layer_saved(
    model: ModelShape,
    compression: CompressionConfig,
    mode: str,
    setting: ActivationSetting,
) -> dict[str, int]:
    """Bytes one decoder block saves, by kind (rope tables excluded: see the caller)."""
    e, n_all, n_res, heads, groups, ffn = _rank_shape(model, setting)
    b, s = setting.micro_batch_size, setting.seq_length
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    attn_width = model.num_attention_heads * d
    qkv_out = n_all * (heads + 2 * groups) * d * e
    attn_out = n_all * heads * d * e
    out: dict[str, int] = defaultdict(int)
    if mode == "full":
        # The block input [N, h] (N/t tokens under SP), or its packed form under
        # memory.policy.block_input (LoRAct's layer mode: (N + h) k e; 8-bit codes and scales).
        out["block_input"] = setting.storage.saved_bytes("block_input", n_res * h, h, e)
        return dict(out)
    if mode == "sublayer":
        # Both sublayers re-run from the norm outputs: the norms' saved tensors are all a
        # block keeps (their outputs or packed outputs, and rstd).
        if not setting.efficient_ops:
            raise ValueError("activation checkpointing mode 'sublayer' needs efficient_ops")
        out["norm"] = 2 * _norm_saved(n_res, h, e, True, setting.storage)
        return dict(out)
    if setting.efficient_ops:
        return _efficient_layer_saved(model, compression, mode, setting)
    if mode == "none":
        out["norm"] = 2 * _norm_saved(n_res, h, e, False)
        out["qkv"] = _site_saved("qkv", compression, h, n_res, setting)
        # q and k after RoPE, v (a view of the fused QKV output, which it keeps whole), the
        # attention output and its fp32 log-sum-exp.
        out["attention_core"] = (
            n_all * heads * d * e + n_all * groups * d * e + qkv_out + attn_out + b * heads * s * 4
        )
        # Uncompressed, proj's input is the attention output itself (already counted).
        out["proj"] = (
            _site_saved("proj", compression, attn_width, n_all, setting)
            if _compressed("proj", compression)
            else 0
        )
        out["fc1"] = _site_saved("fc1", compression, h, n_res, setting)
        out["swiglu"] = 2 * n_all * ffn * e + n_all * ffn * e
        out["fc2"] = _site_saved("fc2", compression, f, n_all, setting)
        return dict(out)
    if mode == "selective":
        # The recomputed parts keep their inputs: both norm inputs, the fused QKV output and
        # [gate | up]; what they produce is saved only by a consumer that is not recomputed.
        out["block_input"] = 2 * n_res * h * e
        out["qkv"] = _site_saved("qkv", compression, h, n_res, setting)
        out["attention_core"] = qkv_out
        out["proj"] = _site_saved("proj", compression, attn_width, n_all, setting)
        out["fc1"] = _site_saved("fc1", compression, h, n_res, setting)
        out["swiglu"] = 2 * n_all * ffn * e
        out["fc2"] = _site_saved("fc2", compression, f, n_all, setting)
        return dict(out)
    raise ValueError(f"activation checkpointing mode {mode!r} is not one of {list(AC_MODES)}")


def _efficient_layer_saved(
    model: ModelShape,
    compression: CompressionConfig,
    mode: str,
    setting: ActivationSetting,
) -> dict[str, int]:
    """:func:`_layer_saved` of the ``efficient_ops`` block (modes ``none`` and ``selective``)."""
    e, n_all, n_res, heads, groups, ffn = _rank_shape(model, setting)
    b, s = setting.micro_batch_size, setting.seq_length
    h, d = model.hidden_size, model.head_dim
    attn_width = model.num_attention_heads * d
    attn_out = n_all * heads * d * e

    def compressed_bytes(site: str, width: int, tokens: int) -> int:
        # Uncompressed sites keep a tensor another op already keeps (counted there).
        if not _compressed(site, compression):
            return 0
        return _site_saved(site, compression, width, tokens, setting)

    storage = setting.storage
    attention_packed = storage.quantizer("attention") is not None  # 8-bit or offload
    out: dict[str, int] = defaultdict(int)
    # An uncompressed qkv / fc1 keeps the norm's output, or under ``norm: lowrank:R`` the same
    # factors: nothing of its own.
    out["norm"] = 2 * _norm_saved(n_res, h, e, True, storage)
    out["qkv"] = compressed_bytes("qkv", h, n_res)
    out["fc1"] = compressed_bytes("fc1", h, n_res)
    # [gate | up] [N, 2f/t] (packed under an 8-bit ``swiglu`` policy, scales per row of 2f/t;
    # LoRAct factors [N, k] and [2f/t, k] under ``lowrank:R``, k from the local width 2f/t).
    gate_up = storage.saved_bytes("swiglu", n_all * 2 * ffn, 2 * ffn, e)
    out["fc2"] = gate_up + compressed_bytes("fc2", model.ffn_hidden_size, n_all)
    # The attention output as proj's input [N, H d / t]; packed by proj itself under an 8-bit
    # ``attention`` policy when proj is uncompressed.
    proj_input = storage.saved_bytes("attention", n_all * heads * d, heads * d, e)
    if mode == "none" and attention_packed:
        # q, k, v packed (rows of d). On CUDA (and under ``offload``) neither the output nor
        # the log-sum-exp is kept: backward runs the SDPA forward again, and an uncompressed
        # proj packs the output itself. On CPU 8-bit the attention keeps the fp32
        # log-sum-exp [b, H/t, s] and the packed output, which an uncompressed proj keeps too
        # (the same tensors, counted where first saved: at the attention).
        q_and_kv = n_all * heads * d, n_all * groups * d
        out["attention_core"] = storage.saved_bytes(
            "attention", q_and_kv[0], d, e
        ) + 2 * storage.saved_bytes("attention", q_and_kv[1], d, e)
        keeps_output = setting.device_type == "cpu" and storage.attention != "offload"
        if keeps_output:
            out["attention_core"] += b * heads * s * 4 + proj_input
        if _compressed("proj", compression):
            out["proj"] = compressed_bytes("proj", attn_width, n_all)
        elif not keeps_output:
            out["proj"] = proj_input
    elif mode == "none":
        # q, k after RoPE, v (contiguous), the output (also proj's input), the fp32 LSE.
        out["attention_core"] = n_all * (heads + 2 * groups) * d * e + attn_out + b * heads * s * 4
        out["proj"] = compressed_bytes("proj", attn_width, n_all)
    elif mode == "selective":
        out["attention_core"] = n_all * (heads + 2 * groups) * d * e  # the fused QKV output
        out["proj"] = (
            _site_saved("proj", compression, attn_width, n_all, setting)
            if _compressed("proj", compression)
            else proj_input
        )
    else:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {list(AC_MODES)}")
    # ``recompute``: the sublayer re-runs from the norm output (kept by the norm): nothing of
    # its own, compressed sites included.
    if storage.recomputes("attention"):
        out["qkv"] = out["attention_core"] = out["proj"] = 0
    if storage.recomputes("swiglu"):
        out["fc1"] = out["fc2"] = 0
    return dict(out)


def _layer_host_offload(
    model: ModelShape, compression: CompressionConfig, mode: str, setting: ActivationSetting
) -> dict[str, int]:
    """Host bytes one decoder block keeps under ``offload`` policies, by kind: the tensors the
    device formulas above count as 0 bytes for an offloaded kind, whole, in their dtype."""
    storage = setting.storage
    if not storage.offloaded:
        return {}
    e, n_all, n_res, heads, groups, ffn = _rank_shape(model, setting)
    h, d = model.hidden_size, model.head_dim
    out: dict[str, int] = defaultdict(int)
    if mode == "full":
        out["block_input"] = storage.host_bytes("block_input", n_res * h, e)
        return dict(out)
    out["norm"] = 2 * storage.host_bytes("norm", n_res * h, e)  # both block norms' outputs
    if mode == "sublayer":
        return dict(out)
    if not storage.recomputes("swiglu"):
        out["fc2"] = storage.host_bytes("swiglu", n_all * 2 * ffn, e)  # [gate | up]
    if not storage.recomputes("attention"):
        proj_input = 0 if _compressed("proj", compression) else n_all * heads * d
        if mode == "none":
            # q, k, v (the attention core) and the attention output (proj's input).
            out["attention_core"] = storage.host_bytes(
                "attention", n_all * (heads + 2 * groups) * d, e
            )
        out["proj"] = storage.host_bytes("attention", proj_input, e)
    return {kind: nbytes for kind, nbytes in out.items() if nbytes}


def predict_saved_activations(
    model: ModelShape,
    compression: CompressionConfig | None,
    setting: ActivationSetting,
    ac_mode: str = "none",
    ac_num_layers: int | None = None,
) -> ActivationPrediction:
    """Saved-activation bytes of one micro-batch on one rank, by kind and per block.

    ``model`` is a :class:`~actcomp_dist.models.LlamaConfig` with the vocabulary the model is
    really built with (the trainer pads it to a multiple of 128 * TP). ``ac_num_layers``: the
    first N blocks are checkpointed (``None`` = all), as ``activation_checkpointing.num_layers``.
    """
    compression = compression or CompressionConfig()
    if ac_mode not in AC_MODES:
        raise ValueError(
            f"activation checkpointing mode {ac_mode!r} is not one of {list(AC_MODES)}"
        )
    e, n_all, n_res, *_ = _rank_shape(model, setting)
    t = setting.tensor_parallel
    h, d = model.hidden_size, model.head_dim
    layers = model.num_layers
    if ac_mode == "none":
        checkpointed = 0
    else:
        checkpointed = layers if ac_num_layers is None else min(ac_num_layers, layers)

    by_kind: dict[str, int] = defaultdict(int)
    host: dict[str, int] = defaultdict(int)
    per_layer, host_per_layer = [], []
    rope_rows = setting.rope_positions or setting.seq_length
    rope_once = False  # the fp32 tables, shared by every block that keeps them
    for index in range(layers):
        mode = ac_mode if index < checkpointed else "none"
        saved = _layer_saved(model, compression, mode, setting)
        offloaded = _layer_host_offload(model, compression, mode, setting)
        for kind, nbytes in offloaded.items():
            host[kind] += nbytes
        host_per_layer.append(sum(offloaded.values()))
        if setting.efficient_ops:
            # The tables in the activation dtype (cached on the model), shared by every block
            # that keeps them: counted once, in the first.
            keeps_rope = not setting.storage.recomputes("attention")
            if mode not in ("full", "sublayer") and keeps_rope and not rope_once:
                saved["attention_core"] += 2 * rope_rows * d * e
                rope_once = True
        elif mode == "none" and e != 4:
            # RoPE casts the fp32 tables to the activation dtype: q and k each keep a cos
            # and a sin copy [s, d].
            saved["attention_core"] += 4 * setting.seq_length * d * e
        elif mode == "selective" or (mode == "none" and e == 4):
            # The tables themselves (the whole buffer): counted once, in the first block.
            if not rope_once:
                saved["attention_core"] += 2 * rope_rows * d * 4
                rope_once = True
        for kind, nbytes in saved.items():
            by_kind[kind] += nbytes
        per_layer.append(sum(saved.values()))

    vocab = model.vocab_size // t
    # The token ids [b, s] int64; at TP > 1 VocabParallelEmbedding keeps its shifted copy of
    # them and the bool mask of ids outside this rank's vocabulary shard instead.
    by_kind["embedding"] = n_all * 8 + (n_all if t > 1 else 0)
    by_kind["final_norm"] = _norm_saved(n_res, h, e, setting.efficient_ops)
    if setting.efficient_ops and not setting.sp:
        by_kind["output_layer"] = 0  # the final norm's output, counted there
    else:
        by_kind["output_layer"] = n_all * h * e  # (gathered under SP)
    if setting.loss_chunk_tokens is None:
        # Cross-entropy: the fp32 softmax [N, V/t], its target mask (bool) and masked targets.
        loss = n_all * vocab * 4 + n_all * 1 + n_all * 8
    else:
        # The fused chunked head, inside the output layer: an fp32 log-sum-exp and an int64
        # copy of the label per token, whatever the chunk size.
        by_kind["output_layer"] += n_all * (4 + 8)
        loss = 0
    if setting.loss_mask:
        loss += n_all * 4 + 4  # the float mask the losses are multiplied by, and its sum
    by_kind["loss"] = loss
    return ActivationPrediction(dict(by_kind), per_layer, dict(host), host_per_layer)


# -- model states -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of the model states (after the engine is built, at the optimizer step)."""

    parameters: int
    gradients: int
    optimizer_state: int
    engine_buffers: int  # DeepSpeed's gradient-reduction bucket (ZeRO 1/2)
    parameters_count: int  # logical parameters of the whole model
    detail: dict[str, Any] = field(default_factory=dict)
    projection_cache: int = 0  # compact's cached P of each compressed layer (n x r)

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer_state
            + self.engine_buffers
            + self.projection_cache
        )


def _site_widths(model: ModelShape) -> dict[str, tuple[int, int]]:
    """site: (input width, output width) of the full (unsharded) linear."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    heads, groups = model.num_attention_heads, model.query_groups
    return {
        "qkv": (h, (heads + 2 * groups) * d),
        "proj": (heads * d, h),
        "fc1": (h, 2 * f),
        "fc2": (f, h),
    }


def projected_site_shapes(
    model: ModelShape, compression: CompressionConfig, tensor_parallel: int = 1
) -> list[tuple[int, int, int]]:
    """``(n_local, m_local, r_local)`` of each compressed site of one block on TP rank 0 for a
    method with a fixed, seeded projection (it declares ``supports_subspace``: ``compact``): the
    local weight is [m_local, n_local], its projection [n_local, r_local]."""
    if not get_compressor_class(compression.method).supports_subspace:
        return []
    t = tensor_parallel
    setting = ActivationSetting(1, 1, tensor_parallel=t)
    shapes = []
    for site in compression.sites:
        n, m = _site_widths(model)[site]
        row = site in _ROW_SITES
        rank, _ = _site_width(site, compression, n, setting)
        shapes.append((n // t if row else n, m if row else m // t, rank))
    return shapes


def local_parameter_counts(
    model: ModelShape, compression: CompressionConfig, tensor_parallel: int = 1
) -> dict[str, int]:
    """Parameters on one TP rank: ``total``; ``subspace_weights`` (compressed weights trained
    in ``subspace`` mode, kept out of the optimizer) and ``subspace_proxies`` (their m x r
    gradient carriers)."""
    t = tensor_parallel
    h = model.hidden_size
    block = sum(n * m for n, m in _site_widths(model).values()) // t + 2 * h
    embeddings = 2 * model.vocab_size * h // t
    if getattr(model, "tie_embeddings", False):
        embeddings //= 2
    total = embeddings + model.num_layers * block + h
    weights = proxies = 0
    if compression.grad_mode == "subspace":
        for n, m, r in projected_site_shapes(model, compression, t):
            weights += n * m
            proxies += m * r
        weights *= model.num_layers
        proxies *= model.num_layers
    return {"total": total, "subspace_weights": weights, "subspace_proxies": proxies}


def subspace_master_elements(
    model: ModelShape, compression: CompressionConfig, tensor_parallel: int, data_parallel: int
) -> int:
    """fp32 master elements the subspace merger keeps on data-parallel rank 0 (the largest
    share): ``ceil(m / D)`` rows of every compressed weight."""
    if compression.grad_mode != "subspace":
        return 0
    shapes = projected_site_shapes(model, compression, tensor_parallel)
    return model.num_layers * sum(-(-m // data_parallel) * n for n, m, _ in shapes)


def subspace_row_elements(
    model: ModelShape, compression: CompressionConfig, tensor_parallel: int, data_parallel: int
) -> int:
    """Elements of one m x r tensor per compressed weight restricted to data-parallel rank 0's
    rows (``ceil(m / D)`` of each): the size of the partitioned subspace gradient, and of each
    Adam moment, at ZeRO 1/2."""
    if compression.grad_mode != "subspace":
        return 0
    shapes = projected_site_shapes(model, compression, tensor_parallel)
    return model.num_layers * sum(-(-m // data_parallel) * r for _, m, r in shapes)


def optimizer_group_sizes(
    model: ModelShape,
    compression: CompressionConfig,
    tensor_parallel: int = 1,
    lr_factors: Mapping[str, float] | None = None,
) -> list[int]:
    """Parameters of each of the trainer's optimizer param groups on one TP rank, in its order
    (``actcomp_dist.training.engine``): one group per (matrix or vector, learning-rate factor),
    the matrices' groups first, each family in order of first appearance along the model's
    parameters (embedding; per block the norm, qkv, proj, the norm, fc1, fc2; the final norm;
    the output layer unless tied). ``lr_factors``: the factor of each ``train.lr_scale`` group
    (``qkv``, ``proj``, ``fc1``, ``fc2``, ``embedding``, ``norm``, ``output``; a missing name
    is 1.0). Weights trained in ``subspace`` mode are in no group; empty groups are dropped,
    as the trainer drops them."""
    t, h = tensor_parallel, model.hidden_size
    factors = dict(lr_factors or {})
    subspace = set()
    if compression.grad_mode == "subspace" and projected_site_shapes(model, compression, t):
        subspace = set(compression.sites)
    sites = {
        site: (n * m // t) * model.num_layers
        for site, (n, m) in _site_widths(model).items()
        if site not in subspace
    }
    embedding = model.vocab_size * h // t
    order = [("embedding", True, embedding), ("norm", False, 2 * model.num_layers * h)]
    order += [(site, True, count) for site, count in sites.items()]
    order.append(("norm", False, h))  # the final norm
    if not getattr(model, "tie_embeddings", False):
        order.append(("output", True, embedding))
    grouped: dict[tuple[bool, float], int] = {}
    for name, matrix, count in order:
        key = (matrix, float(factors.get(name, 1.0)))
        grouped[key] = grouped.get(key, 0) + count
    keys = sorted(grouped, key=lambda key: not key[0])  # stable: matrices first
    return [grouped[key] for key in keys if grouped[key]]


def predict_model_states(
    model: ModelShape,
    compression: CompressionConfig,
    *,
    precision: str = "bf16",
    zero_stage: int = 1,
    data_parallel: int = 1,
    tensor_parallel: int = 1,
    reduce_bucket_size: int = 500_000_000,
    lr_factors: Mapping[str, float] | None = None,
) -> ModelStates:
    """Parameters, gradients and AdamW state per GPU under DeepSpeed ZeRO, at their peak: the
    optimizer step.

    The ZeRO paper's accounting, corrected by what DeepSpeed 0.19 allocates (measured by
    :func:`actcomp_dist.memory.model_state_bytes` in ``tests/distributed/test_model_states.py``):

    - parameters in the training precision; ZeRO-3 keeps 1/D of them (parameters below its
      ``stage3_param_persistence_threshold``, 1e5 elements by default, stay whole on every
      rank; not modelled: at 1B only the norm vectors are that small);
    - optimizer state: two fp32 Adam moments, plus an fp32 master copy wherever DeepSpeed
      keeps one — in 16-bit training always, and at ZeRO 1-3 in fp32 too (its partition of
      the flat fp32 weights is a copy): 12 bytes per trained parameter, 8 for fp32 at ZeRO 0;
      ZeRO 1-3 keep 1/D of it;
    - gradients: the larger of what backward leaves (16-bit gradients: all of them at ZeRO 0
      and 1, 1/D at ZeRO 2 and 3; bf16 at ZeRO 0 adds fp32 accumulators of all of them) and
      what the step holds while it steps parameter group g (ZeRO 1-3): the rank's 1/D of
      every group's gradients (one flat buffer, alive until the last group's turn: measured
      storages) and an fp32 copy of group g's partition. The groups
      are the trainer's, in its order (:func:`optimizer_group_sizes`): matrices (weight
      decay), vectors (none), one of each per ``train.lr_scale`` factor (``lr_factors``),
      then the ``subspace`` proxies.

    ``subspace`` mode: the compressed weights get no m x n gradient and no Adam state, and in
    16-bit training an fp32 master of each is kept partitioned by output rows over the
    data-parallel ranks (``ceil(m / D)`` rows per rank). At ZeRO 0 their m x r proxies are
    ordinary parameters of the optimizer (whole on every rank, like everything at ZeRO 0); at
    ZeRO 1/2 there are no proxies: the m x r gradient (fp32) and Adam moments are kept for the
    same ``ceil(m / D)`` rows only, beside DeepSpeed's groups (matrices, vectors), and live
    through its step. With ``cache_projection`` every
    ``compact`` layer keeps its current P [n_local, r_local] in the compute dtype
    (``projection_cache``; row-parallel layers hold their block-diagonal P densely). ZeRO 1/2
    also allocate one gradient bucket of ``reduce_bucket_size`` elements (DeepSpeed's
    ``zero_optimization.reduce_bucket_size``, default 5e8: 2 GB in fp32, 1 GB in bf16).
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r} is not one of ['fp32', 'bf16', 'fp16']")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage} is not one of 0, 1, 2, 3")
    counts = local_parameter_counts(model, compression, tensor_parallel)
    dp = data_parallel
    p_bytes = 4 if precision == "fp32" else 2
    weights, proxies = counts["subspace_weights"], counts["subspace_proxies"]
    partitioned = zero_stage in (1, 2) and compression.grad_mode == "subspace"
    # Elements of this rank's rows of the m x r subspace state (ZeRO 1/2, no proxies).
    rows = subspace_row_elements(model, compression, tensor_parallel, dp) if partitioned else 0
    if partitioned:
        proxies = 0
    model_params = counts["total"] + proxies
    trained = model_params - weights  # parameters DeepSpeed's optimizer steps
    # The trainer's groups in its order; the ZeRO 0 subspace proxies come last.
    groups = optimizer_group_sizes(model, compression, tensor_parallel, lr_factors) + [proxies]
    parameters = model_params * p_bytes
    if zero_stage >= 3:
        parameters = math.ceil(parameters / dp)
    optimizer = trained * (8 if precision == "fp32" and zero_stage == 0 else 12)
    if zero_stage >= 1:
        optimizer = math.ceil(optimizer / dp)
    optimizer += 8 * rows  # the subspace Adam moments
    if zero_stage == 0:
        gradients = trained * (p_bytes if precision == "fp32" else p_bytes + 4)
    else:
        held = trained * p_bytes if zero_stage == 1 else math.ceil(trained / dp) * p_bytes
        # While the engine steps group g: this rank's partition of every group's 16-bit
        # gradients, one flat buffer whose storage lives until the last group's turn (freeing a
        # group's views frees nothing), and an fp32 copy of group g's partition.
        stepped = [group for group in groups if group]
        buffer = math.ceil(trained / dp) * p_bytes
        stepping = max(
            (buffer if g < len(stepped) - 1 else 0) + math.ceil(group / dp) * 4
            for g, group in enumerate(stepped)
        )
        gradients = max(held, stepping)
    gradients += 4 * rows  # the subspace gradients (fp32 accumulators of this rank's rows)
    masters = 0
    if precision != "fp32":
        masters = 4 * subspace_master_elements(model, compression, tensor_parallel, dp)
    buffers = reduce_bucket_size * p_bytes if zero_stage in (1, 2) else 0
    cache = 0
    if compression.cache_projection:
        shapes = projected_site_shapes(model, compression, tensor_parallel)
        cache = model.num_layers * sum(n * r for n, _, r in shapes) * p_bytes
    full_t1 = local_parameter_counts(model, CompressionConfig(), 1)["total"]
    return ModelStates(
        parameters=parameters,
        gradients=gradients,
        optimizer_state=optimizer + masters,
        engine_buffers=buffers,
        projection_cache=cache,
        parameters_count=full_t1,
        detail={
            "subspace_weights": weights,
            "subspace_proxies": proxies,  # m x r parameters DeepSpeed manages (ZeRO 0 only)
            "subspace_gradient_elements": counts["subspace_proxies"],  # m x r of every weight
            "subspace_masters_bytes": masters,
            "subspace_row_elements": rows,
            # What each rank hands to the data-parallel gradient reduction per step, in the
            # gradients' dtype: the m x r gradients of subspace layers, and all others.
            "dp_reduction_bytes": {
                "compressed": counts["subspace_proxies"] * p_bytes,
                "ordinary": (trained - proxies) * p_bytes,
            },
        },
    )


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    states: ModelStates
    activations: ActivationPrediction
    transient: int
    reserve: int
    gpu_memory: int
    #: Pinned host memory per GPU for ``offload`` (``None``: not checked).
    host_memory: int | None = None

    @property
    def total(self) -> int:
        """Device bytes at the peak."""
        return self.states.total + self.activations.total + self.transient + self.reserve

    @property
    def fits(self) -> bool:
        """The peak fits the GPU and the offloaded activations fit ``host_memory``."""
        host_fits = self.host_memory is None or self.activations.host_total <= self.host_memory
        return self.total <= self.gpu_memory and host_fits


def transient_bytes(
    model: ModelShape,
    compression: CompressionConfig,
    setting: ActivationSetting,
    ac_mode: str,
) -> int:
    """An estimate of the short-lived peak on top of the saved activations in backward: the
    logits (in the activation dtype) and their fp32 gradient (of one chunk with the chunked
    loss, plus its fp32 accumulator of a 16-bit output weight's gradient), the gradient of the
    largest activation, and under checkpointing the tensors one recomputed block saves again."""
    e, t = setting.dtype_bytes, setting.tensor_parallel
    n = setting.tokens
    vocab = model.vocab_size // t
    if setting.loss_chunk_tokens is None:
        logits = n * vocab * (e + 4)
    else:
        logits = min(setting.loss_chunk_tokens, n) * vocab * (e + 4)
        logits += vocab * model.hidden_size * 4 if e != 4 else 0
    largest = 2 * n * max(model.hidden_size, 2 * model.ffn_hidden_size // t) * e
    recompute = 0
    if ac_mode != "none":
        recompute = sum(_layer_saved(model, compression, "none", setting).values())
    return logits + largest + recompute


def plan_memory(
    model: ModelShape,
    compression: CompressionConfig,
    setting: ActivationSetting,
    *,
    ac_mode: str = "none",
    ac_num_layers: int | None = None,
    precision: str = "bf16",
    zero_stage: int = 1,
    data_parallel: int = 1,
    gpu_memory: int = 80 * 10**9,
    reserve: int = 2 * 2**30,
    reduce_bucket_size: int = 500_000_000,
    host_memory: int | None = None,
    lr_factors: Mapping[str, float] | None = None,
) -> MemoryPlan:
    """Everything one GPU holds at the peak of a step; ``reserve`` covers the CUDA context,
    communication buffers and allocator fragmentation. ``host_memory``: the pinned host
    memory one GPU's offloaded activations may take (``None``: not checked).
    ``lr_factors``: as :func:`predict_model_states`."""
    states = predict_model_states(
        model,
        compression,
        precision=precision,
        zero_stage=zero_stage,
        data_parallel=data_parallel,
        tensor_parallel=setting.tensor_parallel,
        reduce_bucket_size=reduce_bucket_size,
        lr_factors=lr_factors,
    )
    activations = predict_saved_activations(model, compression, setting, ac_mode, ac_num_layers)
    transient = transient_bytes(model, compression, setting, ac_mode)
    return MemoryPlan(states, activations, transient, reserve, gpu_memory, host_memory)


def largest_micro_batch(plan_for, limit: int = 1 << 16) -> int:
    """The largest ``b`` with ``plan_for(b).fits`` (0 if not even 1 fits); memory grows with
    ``b``, so a doubling search then bisection."""
    if not plan_for(1).fits:
        return 0
    low = 1
    while low < limit and plan_for(min(2 * low, limit)).fits:
        low = min(2 * low, limit)
    high = min(2 * low, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if plan_for(middle).fits:
            low = middle
        else:
            high = middle
    return low
