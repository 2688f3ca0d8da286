"""LoRI-S masks: one global magnitude threshold over all B matrices, and continual learning.

The recipe (LoRI, arXiv 2504.07448, section 3): train B densely for a short calibration run,
keep the ``1 - sparsity`` largest-magnitude entries *across all B matrices of the model* (one
threshold, so layers that matter more keep more entries), then train again from B = 0 with
the mask fixed::

    apply_adapters(model, AdapterConfig(method="lori", rank=32, sparsity=0.9))
    ... dense calibration steps ...
    compute_masks(model)                 # global threshold -> every adapter's mask
    start_masked_training(model)         # B = 0, gradients only inside the mask
    ... training ...

Continual learning (a new task updates B only inside its own mask, the earlier task's entries
outside it stay exactly as they were)::

    previous = snapshot_B(model)         # the trained task-1 B (effective values)
    clear_masks(model)
    ... dense calibration on task 2 ...
    compute_masks(model, relative_to=previous)   # magnitude of the task-2 update
    start_masked_training(model, base=previous)  # B = previous; outside the mask: pinned
    ... training on task 2 ...

**The threshold under tensor parallelism** is computed exactly, without gathering B: a
column-parallel B is sharded (each rank counts its rows), a row-parallel or plain B is
replicated (TP rank 0 counts it). Non-negative float32 values order like their bit patterns
read as int32, so the k-th largest magnitude is found by bisection over the 2^31 bit patterns:
31 rounds of "how many magnitudes are >= t", each one all-reduce of a single integer over the
TP group. The result is the same float at every TP size as a sort of the gathered values
(a test checks TP = 2 against TP = 1 and against ``torch.topk``). Ties at the threshold are
all kept, so a mask may keep a few more than ``(1 - sparsity)`` of the entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.adapters.apply import adapters_named

_POSITIVE_INF_BITS = 0x7F800000  # float32 +inf as int32


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def kth_largest(
    magnitudes: Sequence[torch.Tensor],
    k: int,
    group: dist.ProcessGroup | None = None,
) -> float:
    """The ``k``-th largest value among the non-negative ``magnitudes`` of every rank of
    ``group`` (each rank passes the values it alone counts), exactly, as a float32.

    Collective over ``group`` (32 all-reduces of one integer); no values are communicated.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = [m.detach().reshape(-1).float() for m in magnitudes]
    device = values[0].device if values else torch.device("cpu")
    if any(bool((v < 0).any()) or bool(v.isnan().any()) for v in values):
        raise ValueError("kth_largest needs non-negative, non-NaN magnitudes")
    distributed = group is not None and dist.get_world_size(group) > 1

    def count_at_least(bits: int) -> int:
        threshold = _bits_to_float(bits)
        count = torch.zeros((), dtype=torch.int64, device=device)
        for v in values:
            count += (v >= threshold).sum()
        if distributed:
            dist.all_reduce(count, group=group)
        return int(count.item())

    total = count_at_least(0)
    if total < k:
        raise ValueError(f"only {total} values, cannot take the {k}-th largest")
    # Invariant: count(>= lo) >= k and count(>= hi) < k (hi = +inf unless inf values abound).
    lo, hi = 0, _POSITIVE_INF_BITS
    if count_at_least(hi) >= k:
        return float("inf")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid
    return _bits_to_float(lo)


def _magnitudes(
    model: nn.Module, name: str, relative_to: Mapping[str, torch.Tensor] | None
) -> list[tuple[str, object, torch.Tensor]]:
    out = []
    for path, adapter in adapters_named(model, name):
        b = adapter.effective_B().detach().float()
        if relative_to is not None:
            b = b - relative_to[path].to(device=b.device, dtype=torch.float32)
        out.append((path, adapter, b.abs()))
    return out


@torch.no_grad()
def compute_masks(
    model: nn.Module,
    sparsity: float | None = None,
    name: str = "default",
    *,
    relative_to: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Set every adapter ``name``'s mask to ``|B - relative_to| >= threshold``, the threshold
    keeping ``1 - sparsity`` of all B entries of the model (default: the adapters' configured
    sparsity). Collective over the TP group. Returns the threshold.

    Only sets masks: call :func:`start_masked_training` next.
    """
    entries = _magnitudes(model, name, relative_to)
    config = entries[0][1].config
    sparsity = config.sparsity if sparsity is None else sparsity
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    group = next((a.geometry.group for _, a, _ in entries if a.geometry.group is not None), None)
    counted = [
        m for _, a, m in entries if a.geometry.b_sharded or a.geometry.tp_rank == 0
    ]  # replicated B (row-parallel, plain) counted once per TP group
    total = sum(m.numel() for m in counted)
    total_tensor = torch.tensor([total], dtype=torch.int64, device=entries[0][2].device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total_tensor, group=group)
    keep = max(1, round((1.0 - sparsity) * int(total_tensor.item())))
    threshold = kth_largest(counted, keep, group)
    for _, adapter, magnitude in entries:
        adapter.mask = magnitude >= threshold
    return threshold


@torch.no_grad()
def start_masked_training(
    model: nn.Module, name: str = "default", base: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Restart B for training inside the masks: B = 0 (LoRI-S), or B = ``base`` (this rank's
    B per linear name, from :func:`snapshot_B`) with the entries outside the mask pinned at
    ``base`` (continual learning). Build the optimizer afterwards (fresh moments)."""
    for path, adapter in adapters_named(model, name):
        if adapter.mask is None:
            raise ValueError(f"adapter {name!r} at {path} has no mask; call compute_masks first")
        if base is None:
            adapter.B.zero_()
            adapter.frozen_B = None
        else:
            values = base[path].to(device=adapter.B.device, dtype=adapter.B.dtype)
            adapter.B.copy_(values)
            adapter.frozen_B = values.clone()


@torch.no_grad()
def clear_masks(model: nn.Module, name: str = "default") -> None:
    """Make adapter ``name`` dense again, keeping what it computes (B := effective B)."""
    for _, adapter in adapters_named(model, name):
        adapter.B.copy_(adapter.effective_B())
        adapter.mask = None
        adapter.frozen_B = None


@torch.no_grad()
def snapshot_B(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """This rank's effective B of every adapter ``name``, by linear name (copies)."""
    return {
        path: adapter.effective_B().detach().clone()
        for path, adapter in adapters_named(model, name)
    }


def allocate_masks(model: nn.Module, name: str = "default", *, pinned: bool = False) -> None:
    """Give adapter ``name`` placeholder (all-False) masks, and zero ``frozen_B`` when
    ``pinned``, so that a module state dict written during masked training (which holds
    ``mask`` / ``frozen_B`` buffers) loads strictly into a freshly built model on resume."""
    for _, adapter in adapters_named(model, name):
        adapter.mask = torch.zeros(adapter.B.shape, dtype=torch.bool, device=adapter.B.device)
        adapter.frozen_B = torch.zeros_like(adapter.B.detach()) if pinned else None
