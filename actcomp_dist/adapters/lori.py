"""``lori``: LoRA with frozen random A and (optionally sparse) trained B (LoRI, arXiv 2504.07448).

``delta W = (alpha / r) * B A``. ``A`` [r, n] is frozen at its random initialisation and is
never stored: it is regenerated from ``adapter_seed(seed, layer_id, site, task)`` (on the CPU, so the
same numbers on every device and TP size), kept on the module as a non-persistent buffer
(``cache_A``) or regenerated in every forward and backward. Only ``B`` is trained, so the
backward needs only ``Z = A x`` [N, r] — the input ``x`` [N, n] is never saved.

LoRI-S adds a fixed sparse mask on B: a dense calibration run, one global magnitude threshold
over *all* B matrices at the chosen sparsity (:func:`actcomp_dist.adapters.compute_masks`),
then training from B = 0 inside the mask. Trainable entries: ``sum_sites m * r`` (dense) or
``(1 - sparsity)`` of that (masked), against LoRA's ``sum_sites r * (m + n)``. Independent A per
task (one seed per task) and disjoint-ish sparse B are what keep merged adapters from
interfering, and what lets a later task train inside its own mask without touching an earlier
task's entries (continual learning).
"""

from __future__ import annotations

import torch

from actcomp_dist.adapters.base import LowRankAdapter, generate_A
from actcomp_dist.adapters.registry import register_adapter


@register_adapter("lori")
class LoRIAdapter(LowRankAdapter):
    def __init__(self, config, geometry, layer_id, site, *, device=None, dtype=None, schedule=None):
        super().__init__(config, geometry, layer_id, site, device=device, dtype=dtype)
        # Non-persistent: regenerated from the seed, never in a state dict or checkpoint.
        self.register_buffer("A", None, persistent=False)
        if self.cache_A:
            self.A = self._generate(device, dtype or self.B.dtype)

    def _generate(self, device, dtype) -> torch.Tensor:
        a = generate_A(self.seed, self.rank, self.geometry.in_features, self.A_columns)
        return a.to(device=device, dtype=dtype)

    def frozen_A(self, device: torch.device) -> torch.Tensor:
        """A regenerated from the seed (the backward's source when A is not cached)."""
        return self._generate(device, self.B.dtype)

    def current_A(self, device, dtype) -> torch.Tensor:
        if self.A is not None:
            return self.A
        return self._generate(device, dtype)
