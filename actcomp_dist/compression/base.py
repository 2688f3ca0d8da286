"""The compressor contract shared by every method.

Every method in this package has the same shape. For a linear layer
``Y = X W^T`` with ``X`` [N, n] and ``g = dL/dY`` [N, m]:

- forward saves a token-indexed tensor ``T`` [N, c] (``c`` <= n) plus, for data-dependent
  methods, a small per-call basis, instead of ``X``;
- backward forms the compressed gradient ``G_hat = g^T T`` [m, c] and *lifts* it to the
  parameter shape with a method-specific linear map: ``dW = lift(G_hat)`` [m, n].

============  =========================  =============================  =====================
method        T (saved, per token)       basis                          lift(G_hat)
============  =========================  =============================  =====================
none          X                          -                              G_hat
compact       Z = X P                    P from the stored seeds        G_hat P^T
lowrank       L = X Q                    Q (saved, data-dependent)      G_hat Q^T
subtoken      S = X_groups v             v (a frozen buffer)            G_hat (x) v
============  =========================  =============================  =====================

The input gradient ``dX = g W`` never needs ``X`` and stays exact for every method.

Keeping ``T`` token-indexed is what the parallel layers build on: under sequence parallelism
a column-parallel layer all-gathers ``T`` (c/n of Megatron's bytes) instead of ``X``; under
data parallelism ``subspace`` mode all-reduces ``G_hat`` (m x c) instead of ``dW``.

Compressors are ``nn.Module``\\ s only so that state that belongs to the model (sub-token
vectors) lands in its state dict; they hold no parameters and run no collectives themselves
(``all_reduce`` callables are passed in by the parallel layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from actcomp_dist.compression.layout import BlockLayout
from actcomp_dist.config import CompressionConfig
from actcomp_dist.seeds import CompressionSchedule

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Compressed:
    """The result of one :meth:`Compressor.compress` call."""

    tokens: torch.Tensor  # [N, c]: saved for backward
    basis: tuple[torch.Tensor, ...] = ()  # data-dependent tensors saved for backward
    seeds: tuple[int, ...] = ()  # seeds the basis is regenerated from (stored, never re-read)


class Compressor(nn.Module):
    """Base class; subclasses register with ``@register_compressor(name)``."""

    name: str = ""
    #: The lift of every rank uses the same basis, so token-gathered ``T`` can be lifted at
    #: once (false for methods whose basis is computed from each rank's own data).
    basis_is_shared: bool = True
    #: The compressed gradient lives in a fixed, seeded subspace an optimizer can update in.
    supports_subspace: bool = False

    def __init__(
        self,
        config: CompressionConfig,
        layout: BlockLayout,
        layer_id: int,
        site: str,
        schedule: CompressionSchedule,
    ) -> None:
        super().__init__()
        if schedule.resample_every != config.resample_every:
            # The schedule turns steps into epochs; a different T would silently override the
            # config's resampling period.
            raise ValueError(
                f"CompressionConfig.resample_every={config.resample_every} but the shared "
                f"CompressionSchedule has resample_every={schedule.resample_every}; build the "
                f"schedule as CompressionSchedule(config.resample_every)"
            )
        self.config = config
        self.layout = layout
        self.in_features = layout.local_width
        self.layer_id = layer_id
        self.site = site
        self.schedule = schedule

    @property
    def is_identity(self) -> bool:
        """True when the layer should behave exactly like an uncompressed linear."""
        return False

    @property
    def compressed_width(self) -> int:
        """``c``: the width of the saved token tensor for this (local) layer."""
        raise NotImplementedError

    def maybe_initialize(self, x2d: torch.Tensor, all_reduce: AllReduce | None = None) -> None:
        """One-time data-dependent set-up from the first training batch (default: none)."""

    def compress(self, x2d: torch.Tensor) -> Compressed:
        """``x2d`` [N, n_local] -> what backward needs to form the weight gradient."""
        raise NotImplementedError

    def lift(
        self, ghat: torch.Tensor, basis: tuple[torch.Tensor, ...], seeds: tuple[int, ...]
    ) -> torch.Tensor:
        """``G_hat`` [m, c] -> the parameter-shaped weight gradient [m, n_local]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, site={self.site!r}, in_features={self.in_features}"
