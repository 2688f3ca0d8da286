"""A compression method's weight gradient on a slice of a fused linear's output rows.

VeLoRA (Miles et al., arXiv 2405.17991) compresses the input of ``v_proj`` (and
``down_proj``), not of ``q_proj`` / ``k_proj``. In a model with a fused QKV linear the three
read one input, and the q and k rows need it exactly, so the layer keeps its exact input
``X`` whatever happens to the v rows. For a method whose compressed weight gradient is a
fixed linear map of the exact one (``Compressor.projects_exact_gradient``) the v rows' gradient
as published then needs nothing more: for ``subtoken``, ``S = X_groups v`` is linear in ``X``,
so VeLoRA's ``velora_scale (g_v^T S) (x) v`` equals ``velora_scale ((g_v^T X)_groups v) (x) v``,
the exact v-row gradient with each sub-token projected on ``v``. :class:`RowSliceGradient`
applies that map to the chosen rows of the weight's gradient (a gradient hook on the weight,
so it holds on every path the layer's gradient takes: stored or packed inputs, activation
checkpointing, every ZeRO stage) and leaves the other rows exact.

What it saves: no activation bytes (the layer keeps ``X``, the norm's output, as before); it
only changes the v rows' gradient to the method's. It exists so the method can be run as
published (``compression.sites: ["v", "fc2"]``).

Tensor parallelism: a column-parallel fused QKV shard holds whole key/value groups
(``[q heads of group g | k_g | v_g]`` per group), so each rank projects the v rows of its own
groups (:func:`fused_qkv_value_rows`); the input is replicated over the TP group and the
projection acts row by row, so every rank's rows equal the TP = 1 layer's. The sub-token vector
is the mean over every rank's tokens, as for any ``subtoken`` layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.compression.base import Compressor


def fused_qkv_value_rows(groups: int, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """The row indices of the value heads in a fused QKV weight (or this rank's shard of one)
    of ``groups`` key/value groups laid out ``[q heads of g | k_g | v_g]``, groups in order."""
    per_group = (heads_per_group + 2) * head_dim
    first = torch.arange(groups) * per_group + (heads_per_group + 1) * head_dim  # [groups]
    return (first[:, None] + torch.arange(head_dim)[None, :]).reshape(-1)  # [groups * d]


class RowSliceGradient(nn.Module):
    """The gradient of ``rows`` of a linear's weight, replaced by ``compressor``'s
    :meth:`~actcomp_dist.compression.Compressor.project_gradient` of it.

    ``compressor`` is built for the linear's input layout; it is kept as ``projector`` (its
    state, e.g. the sub-token vector, lands in the state dict under this module). Call :meth:`maybe_initialize` with
    the linear's input in forward (data-dependent set-up, once) and :meth:`attach` once to the
    weight.
    """

    def __init__(self, compressor: Compressor, rows: torch.Tensor) -> None:
        super().__init__()
        if not type(compressor).projects_exact_gradient:
            raise ValueError(
                f"compression method {type(compressor).name!r} cannot compress a slice of a "
                f"linear's output rows (its weight gradient is not a projection of the exact one)"
            )
        # Not ``compressor``: model-wide helpers take a module with one for a compressed layer.
        self.projector = compressor
        self.register_buffer("rows", rows.to(torch.long), persistent=False)

    def maybe_initialize(self, x: torch.Tensor) -> None:
        """One-time set-up from the first training batch's input ``x`` [..., n], reduced over
        every rank (all ranks must agree on a sub-token vector)."""
        if self.training and torch.is_grad_enabled():
            self.projector.maybe_initialize(x.reshape(-1, x.shape[-1]), _world_all_reduce)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """The weight gradient [m, n] with ``rows`` projected (a new tensor)."""
        out = grad.clone()
        out[self.rows] = self.projector.project_gradient(grad[self.rows])
        return out

    def attach(self, weight: nn.Parameter):
        """Apply :meth:`project` to every gradient of ``weight``; returns the hook handle."""
        return weight.register_hook(self.project)

    def extra_repr(self) -> str:
        return f"rows={self.rows.numel()}"


def _world_all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
