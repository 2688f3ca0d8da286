"""Seeded random projections ``P`` (n x r) with ``E[P P^T] = I``.

Every kind is drawn in float32 from a fresh generator seeded by the pure seed function
(actcomp_dist.seeds) and only then cast, so the same seed gives the same matrix on every rank
and in every recompute. Kinds:

- ``gaussian``: i.i.d. N(0, 1/r) (CompAct, arXiv 2410.15352).
- ``rademacher``: i.i.d. +-1/sqrt(r).
- ``sparse``: very sparse JL (Li, Hastie, Church 2006): ``sqrt(s/r) * {+1, 0, -1}`` with
  probabilities ``{1/2s, 1 - 1/s, 1/2s}``, ``s = sqrt(n)``; same second moment, ~1/sqrt(n) of the
  entries non-zero.

Generators are device-local: a CUDA generator gives a different (equally valid) matrix than a
CPU one for the same seed; all ranks of one run share a device type, so they agree.
"""

from __future__ import annotations

import math

import torch

from actcomp_dist.seeds import seeded_generator

PROJECTIONS = ("gaussian", "rademacher", "sparse")


def random_projection(
    kind: str, rows: int, cols: int, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    generator = seeded_generator(seed, device)
    shape = (rows, cols)
    if kind == "gaussian":
        p = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        p.mul_(1.0 / math.sqrt(cols))
    elif kind == "rademacher":
        p = torch.randint(0, 2, shape, generator=generator, device=device).to(torch.float32)
        p.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(cols))
    elif kind == "sparse":
        s = max(1.0, math.sqrt(rows))
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        half = 1.0 / (2.0 * s)
        p = (u < half).to(torch.float32) - (u > 1.0 - half).to(torch.float32)
        p.mul_(math.sqrt(s / cols))
    else:
        raise ValueError(f"unknown projection kind {kind!r}")
    return p.to(dtype)
