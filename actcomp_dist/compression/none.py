"""``none``: the exact oracle. Saves ``X`` itself; a layer with this method is
bit-identical to an uncompressed linear (single-device layers bypass autograd changes
entirely)."""

from __future__ import annotations

import torch

from actcomp_dist.compression.base import Compressed, Compressor, SavedWidth
from actcomp_dist.compression.registry import register_compressor


@register_compressor("none")
class NoCompression(Compressor):
    @property
    def is_identity(self) -> bool:
        return True

    @classmethod
    def saved_width(cls, config, layout) -> SavedWidth:
        return SavedWidth(layout.local_width)

    def compress(self, x2d: torch.Tensor) -> Compressed:
        return Compressed(tokens=x2d)

    def lift(self, ghat, basis, seeds):
        return ghat
