"""``lora``: classic LoRA (Hu et al., arXiv 2106.09685), A and B trained.

``delta W = (alpha / r) * B A`` with A Kaiming-uniform-initialised from the adapter seed (so
every TP rank starts from the same A) and B = 0. A's gradient ``(g B)^T x`` needs the adapter
input: it is saved whole, or compressed by any registered method through
``AdapterConfig.input_compression`` (e.g. CompAct's random projection: save ``x P`` [N, c]
and lift ``dA ~= (g B)^T (x P) P^T``), the same compressors the base layers use.

Trainable entries per site: ``r * (m + n)``. A is replicated across TP ranks for a
column-parallel base (its gradient is complete on every rank) and column-sharded for a
row-parallel one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.adapters.base import ROW, LowRankAdapter, generate_A, mark_tensor_parallel
from actcomp_dist.adapters.registry import register_adapter
from actcomp_dist.compression import build_compressor, layer_layout
from actcomp_dist.config import CompressionConfig
from actcomp_dist.seeds import CompressionSchedule


@register_adapter("lora")
class LoRAAdapter(LowRankAdapter):
    def __init__(self, config, geometry, layer_id, site, *, device=None, dtype=None, schedule=None):
        super().__init__(config, geometry, layer_id, site, device=device, dtype=dtype)
        a = generate_A(self.seed, self.rank, geometry.in_features, self.A_columns)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype or self.B.dtype))
        # A row-parallel A is this rank's columns of the logical A; else it is replicated.
        mark_tensor_parallel(self.A, geometry.mode == ROW and geometry.tp_size > 1, 1)
        # The compressor of A's input; ``compression`` / ``subspace`` / ``schedule`` follow the
        # compressed layers' attribute names so model-wide helpers
        # (``find_schedule``, ``compression_disabled``) treat the adapter like one of them.
        self.compression = config.input_compression or CompressionConfig()
        self.subspace = False
        self.schedule = schedule or CompressionSchedule(self.compression.resample_every)
        # A row-parallel adapter's A sees only its rank's features and sums nothing with its
        # compressed input, so it keeps the block-diagonal layout (each rank its own Z_i).
        layout = layer_layout(
            self.compression.replace(row_parallel_projection="block"),
            geometry.in_features,
            row_parallel=geometry.mode == ROW,
            tp_rank=geometry.tp_rank,
            tp_size=geometry.tp_size,
        )
        self.compressor = build_compressor(
            self.compression, layout, layer_id, "adapter/" + site, self.schedule
        ).to(self.A.device)
        self.cache_A = True  # A is a parameter: always on the module

    def current_A(self, device, dtype) -> torch.Tensor:
        return self.A

    def frozen_A(self, device: torch.device) -> torch.Tensor:
        return self.A.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.compressor.maybe_initialize(x.reshape(-1, x.shape[-1]), _world_all_reduce)
        return super().forward(x)


def _world_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over every rank (data-dependent compressor set-up must agree everywhere)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
