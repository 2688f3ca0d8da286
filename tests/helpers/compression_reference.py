"""Reference math shared by the core tests: projections built by hand from the seed function,
and a recorder of the tensors autograd saves for backward.

These are written from the published formulas (README's method table, the seed rule), not from the package's
helpers, so the tests check the package against the specification rather than against itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from actcomp_dist import projection_seed


def gaussian_projection(
    base_seed: int, layer_id: int, site: str, epoch: int, width: int, rank: int
) -> torch.Tensor:
    """P [width, rank] in float64: a fresh generator seeded by the pure seed function (block 0),
    entries N(0, 1/rank) drawn in float32 (the seed rule), then widened."""
    generator = torch.Generator().manual_seed(projection_seed(base_seed, layer_id, site, 0, epoch))
    p = torch.randn(width, rank, generator=generator, dtype=torch.float32)
    return p.double() / math.sqrt(rank)


def _is_parameter(t: torch.Tensor) -> bool:
    while t is not None:
        if isinstance(t, nn.Parameter):
            return True
        t = t._base
    return False


def saved_tensors(fn: Callable[[], Any]) -> list[torch.Tensor]:
    """Every non-parameter tensor autograd saves for backward while ``fn()`` runs (views of a
    parameter count as the parameter). Keeps the returned graph alive until the list is used."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_parameter(t):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius-norm relative error, computed in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()
