"""``none``: the exact oracle. Saves ``X`` itself; a layer with this method is
bit-identical to an uncompressed linear (single-device layers bypass autograd changes
entirely)."""

from __future__ import annotations

import torch

from actcomp_dist.compression.base import Compressed, Compressor
from actcomp_dist.compression.registry import register_compressor


@register_compressor("none")
class NoCompression(Compressor):
    @property
    def is_identity(self) -> bool:
        return True

    @property
    def compressed_width(self) -> int:
        return self.in_features

    def compress(self, x2d: torch.Tensor) -> Compressed:
        return Compressed(tokens=x2d)

    def lift(self, ghat, basis, seeds):
        return ghat
