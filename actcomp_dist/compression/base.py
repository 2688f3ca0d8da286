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

**What a method declares.** The rest of the system never compares method names; it asks the
method's class (class attributes and classmethods, answerable before any layer exists):

=========================  ===============================================================
``options``                the ``CompressionConfig`` fields the method reads
``choices``                valid values of its choice-valued options (validated by the config)
``supports_subspace``      ``grad_mode="subspace"`` is allowed (a fixed, seeded basis)
``basis_is_shared``        every rank lifts with the same basis (TP-invariant weight gradient)
``saved_width``            per-token width and basis elements saved for a layout (the memory
                           model and the layer use this one formula)
``row_parallel_layout``    the blocks of a row-parallel (feature-sharded) layer
``check_tensor_parallel``  raises ``ValueError`` for a TP size that layout cannot serve
``ablation_option``        the option ``METHOD:ARG`` sets in the ablation grammar, parsed by
                           ``parse_ablation_argument``
``projects_exact_gradient`` ``lift(g^T compress(X))`` is a fixed linear map of the exact
                           ``g^T X``, applied by ``project_gradient``: the method can serve a
                           slice of a layer's output rows whose input the layer keeps exactly
                           (``CompressionConfig.sites`` ``v``)
=========================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from actcomp_dist.compression.layout import BlockLayout
from actcomp_dist.config import CompressionConfig
from actcomp_dist.seeds import CompressionSchedule

AllReduce = Callable[[torch.Tensor], torch.Tensor]


class SavedWidth(NamedTuple):
    """What one compressed linear keeps for backward, in elements of the compute dtype."""

    per_token: int  # c: the width of the token tensor T [N, c]
    basis: int = 0  # elements of the per-call basis saved beside it (independent of N)


@dataclass
class Compressed:
    """The result of one :meth:`Compressor.compress` call."""

    tokens: torch.Tensor  # [N, c]: saved for backward
    basis: tuple[torch.Tensor, ...] = ()  # data-dependent tensors saved for backward
    seeds: tuple[int, ...] = ()  # seeds the basis is regenerated from (stored, never re-read)


class Compressor(nn.Module):
    """Base class; subclasses register with ``@register_compressor(name)``."""

    name: str = ""
    #: The ``CompressionConfig`` fields this method reads, besides the ones every method
    #: shares (``method``, ``grad_mode``, ``seed``, ``resample_every``, ``sites``).
    options: ClassVar[tuple[str, ...]] = ()
    #: Choice-valued options and their valid values. ``CompressionConfig`` checks these for
    #: every registered method, whatever the selected one (an ablation may switch methods).
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: The lift of every rank uses the same basis, so token-gathered ``T`` can be lifted at
    #: once and the weight gradient is the same at every TP size (false for methods whose
    #: basis is computed from each rank's own data).
    basis_is_shared: ClassVar[bool] = True
    #: The compressed gradient lives in a fixed, seeded subspace an optimizer can update in.
    supports_subspace: ClassVar[bool] = False
    #: The option ``METHOD:ARG`` of the ablation grammar sets (``None``: the method takes no
    #: argument and is spelled ``METHOD`` alone).
    ablation_option: ClassVar[str | None] = None
    #: ``project_gradient`` is implemented (see the table in the module docstring).
    projects_exact_gradient: ClassVar[bool] = False

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
        try:
            self.saved_width(config, layout)  # the shape checks, before anything is built
        except ValueError as err:
            raise ValueError(f"layer {layer_id} site {site!r}: {err}") from None
        self.config = config
        self.layout = layout
        self.in_features = layout.local_width
        self.layer_id = layer_id
        self.site = site
        self.schedule = schedule

    @classmethod
    def saved_width(cls, config: CompressionConfig, layout: BlockLayout) -> SavedWidth:
        """What a layer of ``layout`` keeps per token and in its basis; raises ``ValueError``
        naming the field when ``config`` does not fit the layer's width. The layer and the
        analytic memory model both use this, so prediction and measurement cannot drift."""
        raise NotImplementedError(f"{cls.__name__} does not declare saved_width")

    @classmethod
    def row_parallel_layout(
        cls, config: CompressionConfig, width: int, tp_rank: int, tp_size: int
    ) -> BlockLayout:
        """The layout of a row-parallel layer whose ``width`` input features are sharded over
        ``tp_size`` ranks. Default: one block per rank (the rank's own shard); a method whose
        basis should not depend on the TP size uses ``config.row_parallel_blocks`` canonical
        blocks instead (``compact``)."""
        return BlockLayout.for_shard(width, tp_size, tp_rank, tp_size)

    @classmethod
    def check_tensor_parallel(cls, config: CompressionConfig, tp_size: int) -> None:
        """Raises ``ValueError`` naming the field when :meth:`row_parallel_layout` cannot serve
        a tensor-parallel size of ``tp_size`` (whatever the width); run configs check this
        before any process group exists. Default: every size is served."""

    @classmethod
    def parse_ablation_argument(cls, text: str) -> Any:
        """``ARG`` of the ablation's ``METHOD:ARG`` -> the value of :attr:`ablation_option`;
        raises ``ValueError`` saying what would be valid."""
        raise ValueError(f"{cls.name} takes no argument; write {cls.name!r} alone")

    @property
    def is_identity(self) -> bool:
        """True when the layer should behave exactly like an uncompressed linear."""
        return False

    @property
    def compressed_width(self) -> int:
        """``c``: the width of the saved token tensor for this (local) layer."""
        return self.saved_width(self.config, self.layout).per_token

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

    def project_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The exact weight gradient ``g^T X`` [m, n_local] -> the method's ``lift(g^T T)``
        with ``T = compress(X)``, for a method where that is a fixed linear map of ``g^T X``
        (:attr:`projects_exact_gradient`)."""
        raise NotImplementedError(f"{type(self).__name__} does not project an exact gradient")

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, site={self.site!r}, in_features={self.in_features}"


def parse_rank_argument(text: str) -> float | int:
    """A rank as the ablation grammar writes it: a ratio of the input width with a decimal
    point (``0.25``) or an absolute rank without one (``64``)."""
    try:
        return float(text) if "." in text or "e" in text else int(text)
    except ValueError:
        raise ValueError(
            f"the rank {text!r} is not a number; use a ratio of the input width such as 0.25 "
            f"or an absolute rank such as 64"
        ) from None
