"""Step-time cost model: the predicted time of one training step of a variant, relative to
``none`` (the memory-efficient exact block, nothing recomputed, nothing compressed).

It is an estimate from counted work, not a measurement. Per token of one GPU (TP shards
divide everything by the TP size; it cancels in the ratio):

- base, every variant: the model flops of forward and backward, ``6 P + 12 L h s``
  (:func:`actcomp_dist.training.flops.model_flops_per_token`);
- ``recompute`` work:
  ``ac_selective`` re-runs the attention core forward in backward, ``4 L h s`` flops (the score
  and value products; the efficient block recomputes only the attention core);
  ``ac_full`` re-runs the forward of every checkpointed block, ``2 P_block + 4 h s`` flops each;
- ``storage`` work (``int8`` / ``fp8``): the attention's q, k, v, o and SwiGLU's
  ``[gate | up]`` are quantised in forward (read 16-bit, write 8-bit) and dequantised in
  backward (read 8-bit, write 16-bit): 3 bytes moved per stored element each way, over the
  memory bandwidth; and on CUDA (``Device.type``) backward runs the SDPA forward again
  (``4 L h s`` flops) for the softmax statistics the 8-bit copy does not keep; on CPU it keeps
  them (the log-sum-exp and the packed output) and runs no forward again, and the packed
  output is dequantised twice (the attention's backward and proj's weight gradient).
  ``int8@KINDS`` counts the kinds named:
  ``norm`` the two norm outputs (``2 h`` elements per token and block, dequantised twice: for
  the norm's backward and the next linear's weight gradient), ``attention`` q, k, v, o and
  (CUDA) the SDPA forward, ``swiglu`` ``[gate | up]``;
- ``projection`` work (``compact``): per compressed site of input width n, output width m and
  rank r, the projection ``Z = X P`` (2 n r flops per token) and the weight gradient's
  ``g^T Z`` (2 m r) instead of ``g^T X`` (2 m n); ``lift`` mode also multiplies
  ``(g^T Z) P^T`` once per micro-batch (2 m r n flops, spread over the micro-batch's tokens).
  Compact's work is this difference, which is negative where the rank is small enough;
- ``factorisation`` work (``lowrank:R`` of the two norms and ``[gate | up]``, the
  ``ac_lowrank:R`` variants): per factorised tensor of width n and k = R columns, LoRAct's
  Gram product ``A^T A[:, S]`` and ``L = A Q`` in forward and ``L Q^T`` in backward
  (6 n k flops per token) and one QR of ``[n, k]`` per micro-batch (4 n k^2, spread over its
  tokens); an uncompressed qkv / fc1 reading the norm's factors takes its weight gradient as
  ``(g^T L) Q^T`` (2 m k + 2 m k h per micro-batch) instead of ``g^T X`` (2 m h), which is
  negative work at small k. The QR's low arithmetic intensity is not modelled. Under full
  checkpointing ``memory.policy.block_input: lowrank:R`` (``ac_full_lowrank:R``) factorises
  each checkpointed block's input (width h, k from h) the same way: ``Y = A^T A[:, S]``
  (2 h k per token), ``L = A Q`` (2 h k), the reconstruction ``L Q^T`` in backward (2 h k)
  and the QR of ``[h, k]`` (Householder ``2 h k^2`` plus forming the explicit ``Q`` another
  ``2 h k^2``: 4 h k^2 per micro-batch); 8-bit ``block_input`` moves 6 bytes per element of
  the block input as the 8-bit storage above;
- ``transfer`` work (``offload``: the block norms' outputs, q, k, v, o and ``[gate | up]``
  of every block, ``2 h + (2 H + 2 G) d + 2 f`` 16-bit elements per token and block; or the
  block input, h per token and checkpointed block, under ``ac_full_offload``): each byte
  crosses the host link (PCIe) twice at ``host_bandwidth`` per direction. The device-to-host
  copies run on a side stream in forward and are modelled as *overlapped* with the forward
  compute (a third of the model flops): only their excess over it counts. The host-to-device
  copies run on the compute stream when backward needs each tensor (no prefetch), so they are
  modelled as *not overlapped*: all of their time counts. An offloaded ``attention`` re-runs
  the SDPA forward in backward (``4 L h s`` flops), counted here too.

Assumptions: flop work runs at ``peak_tflops`` and byte work at ``memory_bandwidth`` (both
at the same efficiency, so the ratio does not need the achieved MFU); communication, the
optimizer step and kernel launch overheads are the same for every variant and left out;
``ac_selective`` / ``ac_full`` are the modes; a method other than ``none`` and ``compact``
has no model (its ratio is ``None``).

Calibration (:func:`calibrate`): one factor per kind of extra work (``recompute``,
``storage``, ``projection``, ``factorisation``) multiplies that kind's predicted extra time.
From measured step times (``tools/ablate.py``'s ``records.json``: the median
``step_time_s`` per variant, over ``none``'s), each factor is the least-squares fit of ``measured_ratio - 1 = factor * extra``
over the measured variants with only that kind of extra work; a kind no such variant measures
keeps factor 1. The extra work of each record is counted on the model it was measured on
(the record's own config), so the factors carry to other model sizes. The work is counted for
the planner's device (``Device.type``, CUDA): records measured on CPU, where the 8-bit
attention runs no SDPA forward again, fit a ``storage`` factor that absorbs that difference;
calibrate with records from the device the plan is for.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from actcomp_dist.config import CompressionConfig
from actcomp_dist.memory_model import _site_widths, projected_site_shapes
from actcomp_dist.storage import storage_for
from actcomp_dist.training.flops import model_flops_per_token

#: Dense bf16 flop/s and HBM bandwidth of an H100/H200-class GPU (H100 SXM: 989 TFLOP/s,
#: 3.35 TB/s; H200: 989 TFLOP/s, 4.8 TB/s; the smaller bandwidth is the default).
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_MEMORY_BANDWIDTH = 3.35e12
#: Host link (PCIe) bandwidth per direction: what pinned copies reach on PCIe 4.0 x16 (32 GB/s
#: peak); PCIe 5.0 x16 hosts (H100 / H200 SXM) reach about twice it.
DEFAULT_HOST_BANDWIDTH = 25e9
WORK_KINDS = ("recompute", "storage", "projection", "factorisation", "transfer")
#: Bytes per offloaded element (16-bit activations).
OFFLOAD_BYTES_PER_ELEMENT = 2
#: Bytes moved per 8-bit stored element: quantise (read 2, write 1) + dequantise (read 1,
#: write 2).
STORAGE_BYTES_PER_ELEMENT = 6
#: The storage variants that recompute a sublayer, and its linear sites.
RECOMPUTED_SITES = {
    "recompute_attention": ("qkv", "proj"),
    "recompute_swiglu": ("fc1", "fc2"),
}


@dataclass(frozen=True)
class Device:
    peak_flops: float = DEFAULT_PEAK_TFLOPS * 1e12
    memory_bandwidth: float = DEFAULT_MEMORY_BANDWIDTH
    host_bandwidth: float = DEFAULT_HOST_BANDWIDTH  # bytes/s host <-> device, per direction
    #: ``"cuda"`` or ``"cpu"``: which backward an 8-bit ``attention`` runs (module docstring).
    type: str = "cuda"

    def __post_init__(self) -> None:
        # Any other name would silently count the CPU backward (no SDPA forward again).
        if self.type not in ("cpu", "cuda"):
            raise ValueError(f"Device.type={self.type!r} must be 'cpu' or 'cuda'")


@dataclass(frozen=True)
class StepTime:
    """Seconds per token: ``base`` (the model flops) and the extra work by kind."""

    base: float
    extra: dict[str, float] = field(default_factory=dict)

    def ratio(self, factors: dict[str, float] | None = None) -> float:
        """Step time over ``none``'s (which has ``base`` alone); ``factors`` scale each kind."""
        factors = factors or {}
        return 1.0 + sum(factors.get(k, 1.0) * v for k, v in self.extra.items()) / self.base


def _block_matrix_weights(model) -> int:
    """Weights of one block's matrices (q/k/v, output, gate/up, down): its forward costs 2 flops
    per weight per token."""
    return sum(n * m for n, m in _site_widths(model).values())


def _factorisation_work(model, compression: CompressionConfig, storage: str, tokens: int) -> float:
    """Flops per token and block of ``lowrank:R`` on the two norms and ``[gate | up]``
    (module docstring); ``tokens`` per micro-batch (one factorisation per call)."""
    packer = storage_for(storage)
    h, f = model.hidden_size, model.ffn_hidden_size

    def factorise(n: int) -> float:
        return _lowrank_factorisation(n, packer.width(n), tokens)

    k = packer.width(h)
    work = 2 * factorise(h) + factorise(2 * f)
    widths = _site_widths(model)
    for site in ("qkv", "fc1"):
        if compression.method != "none" and site in compression.sites:
            continue  # a compressed reader keeps its own Z (its work is the projection's)
        _, m = widths[site]
        # (g^T L) Q^T instead of g^T X: 2 m k + 2 m k h / tokens instead of 2 m h.
        work += 2.0 * m * k + 2.0 * m * k * h / tokens - 2.0 * m * h
    return work


def _lowrank_factorisation(n: int, k: int, tokens: int) -> float:
    """Flops per token of factorising a tensor of width ``n`` with ``k`` columns: the Gram
    product ``A^T A[:, S]`` and ``L = A Q`` in forward, ``L Q^T`` in backward (2 n k each), and
    one QR of ``[n, k]`` with its explicit ``Q`` (4 n k^2) per call of ``tokens`` tokens."""
    return 6.0 * n * k + 4.0 * n * k * k / tokens


def _transfer_seconds(bytes_per_token: float, forward_seconds: float, device: Device) -> float:
    """Seconds per token of offloading ``bytes_per_token``: the backward host-to-device copies
    in full, the forward device-to-host copies beyond the forward compute they overlap."""
    one_way = bytes_per_token / device.host_bandwidth
    return one_way + max(0.0, one_way - forward_seconds)


def predict_step_time(
    model,
    compression: CompressionConfig,
    *,
    seq_length: int,
    micro_batch_size: int,
    ac_mode: str = "none",
    ac_num_layers: int | None = None,
    storage: str | None = None,
    block_input: str | None = None,
    device: Device = Device(),
) -> StepTime | None:
    """Seconds per token of the counted work (module docstring); ``None`` for a compression
    method the model does not cover. ``storage``: a storage variant's policy (``int8``,
    ``fp8``, or ``lowrank:R`` for the block norms and SwiGLU; ``offload`` of the norms,
    attention and SwiGLU; ``recompute_attention`` / ``recompute_swiglu``: that sublayer's
    forward once more). ``block_input``: ``memory.policy.block_input`` under ``ac_mode``
    ``full`` (``int8``, ``fp8``, ``offload``, ``lowrank:R``)."""
    if compression.method not in ("none", "compact"):
        return None
    L, h, s = model.num_layers, model.hidden_size, seq_length
    flops = device.peak_flops
    attention_forward = 4.0 * h * s  # per layer and token: scores and values
    extra = dict.fromkeys(WORK_KINDS, 0.0)
    checkpointed = L if ac_num_layers is None else min(ac_num_layers, L)
    if ac_mode == "selective":
        extra["recompute"] = checkpointed * attention_forward / flops
    elif ac_mode in ("full", "sublayer"):  # sublayer: the block less its norms (not counted)
        block = 2.0 * _block_matrix_weights(model) + attention_forward
        extra["recompute"] = checkpointed * block / flops
    base = model_flops_per_token(model, seq_length) / flops
    tokens = micro_batch_size * seq_length
    offloaded_bytes = 0.0  # per token, every block
    if ac_mode == "full" and block_input not in (None, "keep"):
        if block_input.startswith("lowrank:"):
            k = storage_for(block_input).width(h)
            extra["factorisation"] += checkpointed * _lowrank_factorisation(h, k, tokens) / flops
        elif block_input == "offload":
            offloaded_bytes += checkpointed * OFFLOAD_BYTES_PER_ELEMENT * h
        else:
            extra["storage"] += (
                checkpointed * STORAGE_BYTES_PER_ELEMENT * h / device.memory_bandwidth
            )
    recomputed = RECOMPUTED_SITES.get(storage or "")
    if storage == "offload":
        heads, groups, d = model.num_attention_heads, model.query_groups, model.head_dim
        elements = 2 * h + (2 * heads + 2 * groups) * d + 2 * model.ffn_hidden_size
        offloaded_bytes += L * OFFLOAD_BYTES_PER_ELEMENT * elements
        extra["transfer"] += L * attention_forward / flops
    elif recomputed is not None:
        # memory.policy attention / swiglu ``recompute``: that sublayer's forward again.
        widths = _site_widths(model)
        work = sum(2.0 * n * m for site, (n, m) in widths.items() if site in recomputed)
        work += attention_forward if "qkv" in recomputed else 0.0
        extra["recompute"] += L * work / flops
    elif storage is not None and storage.startswith("lowrank:"):
        extra["factorisation"] += (
            L * _factorisation_work(model, compression, storage, tokens) / flops
        )
    elif storage is not None:
        heads, groups, d = model.num_attention_heads, model.query_groups, model.head_dim
        _, _, named = storage.partition("@")
        kinds = named.split("/") if named else ("attention", "swiglu")
        rerun = device.type == "cuda"  # the 8-bit attention's backward runs SDPA again
        moved = {  # bytes per token and block: pack once, unpack once (the norm's twice)
            "norm": 2 * model.hidden_size * (STORAGE_BYTES_PER_ELEMENT + 3),
            # q, k, v, o; without the re-run o is unpacked twice (attention, proj)
            "attention": (2 * heads + 2 * groups) * d * STORAGE_BYTES_PER_ELEMENT
            + (0 if rerun else heads * d * 3),
            "swiglu": 2 * model.ffn_hidden_size * STORAGE_BYTES_PER_ELEMENT,  # [gate | up]
        }
        work = sum(moved[kind] for kind in kinds) / device.memory_bandwidth
        if "attention" in kinds and rerun:
            work += attention_forward / flops
        extra["storage"] += L * work
    if offloaded_bytes:
        extra["transfer"] += _transfer_seconds(offloaded_bytes, base / 3.0, device)
    if compression.method == "compact":
        work = 0.0
        for n, m, r in projected_site_shapes(model, compression):
            work += 2.0 * n * r + 2.0 * m * r - 2.0 * m * n
            if compression.grad_mode == "lift":
                work += 2.0 * m * r * n / (micro_batch_size * seq_length)
        extra["projection"] = L * work / flops
    return StepTime(base, {k: v for k, v in extra.items() if v})


def measured_ratios(records: list[dict]) -> dict[str, float]:
    """Median ``step_time_s`` per variant over ``none``'s, from ``tools/ablate.py`` records."""
    times: dict[str, list[float]] = {}
    for record in records:
        times.setdefault(record["variant"], []).append(float(record["step_time_s"]))
    if "none" not in times:
        raise ValueError("the records have no run of 'none', the reference of every ratio")
    reference = statistics.median(times["none"])
    return {name: statistics.median(t) / reference for name, t in times.items()}


def calibrate(measured: dict[str, float], predicted: dict[str, StepTime]) -> dict[str, float]:
    """One factor per kind of extra work (module docstring): ``measured`` ratios and the
    ``predicted`` work of the same variants on the measured model."""
    factors = {}
    for kind in WORK_KINDS:
        pairs = [
            (p.extra[kind] / p.base, measured[name] - 1.0)
            for name, p in predicted.items()
            if name in measured and set(p.extra) == {kind}
        ]
        denominator = sum(x * x for x, _ in pairs)
        factors[kind] = sum(x * y for x, y in pairs) / denominator if denominator else 1.0
    return factors
