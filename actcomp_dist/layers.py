"""`CompressedLinear` and `compress_linears`: drop-in compressed linears for any PyTorch model.

``CompressedLinear`` *is* an ``nn.Linear`` (same parameters, init, state-dict keys and forward
result, bit for bit); only what it keeps for the backward pass differs. ``compress_linears``
swaps matching ``nn.Linear`` modules of an existing model in place, reusing their parameters,
and gives all of them one shared :class:`CompressionSchedule`.

Data-dependent set-up (VeLoRA's sub-token vector) is combined over ranks by an ``all_reduce``
callable, by default :class:`SumOverRanks` over every rank: under plain data parallelism
every replica then holds the same vector, the mean over all replicas' first batches (one
all-reduce of ``d + 1`` floats per layer, when the vector is computed).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from actcomp_dist.autograd import CompressedLinearFunction
from actcomp_dist.compression import BlockLayout, build_compressor
from actcomp_dist.compression.base import AllReduce
from actcomp_dist.config import CompressionConfig
from actcomp_dist.seeds import CompressionSchedule
from actcomp_dist.subspace import SubspaceState


@dataclass(frozen=True)
class SumOverRanks:
    """The default ``all_reduce`` of data-dependent set-up: sums a tensor in place over
    ``group`` (``None``: every rank of the default group) when ``torch.distributed`` is
    initialised at the moment of the call, and returns it; without a process group (or with
    one rank) it returns the tensor unchanged. Pass ``SumOverRanks(dp_group)`` when only the
    data-parallel replicas share the layer (e.g. under pipeline parallelism), ``None`` to give
    every rank its own vector. Every rank of ``group`` must run its first training forward
    through the layer (it is a collective)."""

    group: Any = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(t, group=self.group)
        return t


class CompressedLinear(nn.Linear):
    """``nn.Linear`` that saves a compressed activation for its weight gradient.

    Args:
        compression: the method and its knobs; ``None`` means ``method="none"``.
        layer_id: the layer's index in the whole model (part of every projection seed).
        site: the name of the input space (``qkv``, ``fc1``, ...; part of every seed).
        schedule: the model-wide step counter; a private one is made when omitted.
        all_reduce: for data-dependent set-up (sub-token vectors), a callable that sums a
            tensor over every replica of this layer; default :class:`SumOverRanks` (every
            rank, once ``torch.distributed`` is initialised); ``None``: this rank alone.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        compression: CompressionConfig | None = None,
        layer_id: int = 0,
        site: str = "linear",
        schedule: CompressionSchedule | None = None,
        all_reduce: AllReduce | None = SumOverRanks(),
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup_compression(compression, layer_id, site, schedule, all_reduce)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compression: CompressionConfig | None = None,
        *,
        layer_id: int = 0,
        site: str = "linear",
        schedule: CompressionSchedule | None = None,
        all_reduce: AllReduce | None = SumOverRanks(),
    ) -> CompressedLinear:
        """Wrap an existing ``nn.Linear``, sharing (not copying) its parameters."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        layer._setup_compression(compression, layer_id, site, schedule, all_reduce)
        return layer

    def _setup_compression(self, compression, layer_id, site, schedule, all_reduce) -> None:
        compression = compression or CompressionConfig()
        if schedule is None:
            schedule = CompressionSchedule(compression.resample_every)
        self.compression = compression
        self.layer_id, self.site = layer_id, site
        self.schedule = schedule
        self.all_reduce = all_reduce
        self.compressor = build_compressor(
            compression, BlockLayout(self.in_features), layer_id, site, schedule
        ).to(self.weight.device)
        self.subspace = compression.grad_mode == "subspace"
        if self.subspace:
            mark_subspace_parameter(self.weight, self.compressor)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # copy.deepcopy makes new Parameters without their Python attributes; re-tag the copy's
        # weight so the optimizer still updates it in the (copied) compressor's subspace.
        if self.subspace:
            mark_subspace_parameter(self.weight, self.compressor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.compressor.is_identity
            or not torch.is_grad_enabled()
            or not self.weight.requires_grad
        ):
            # Nothing to compress: the oracle, inference, or a frozen weight (whose backward
            # needs only W, which autograd saves by itself).
            return F.linear(x, self.weight, self.bias)
        if self.training:
            self.compressor.maybe_initialize(x.reshape(-1, x.shape[-1]), self.all_reduce)
        return CompressedLinearFunction.apply(
            x, self.weight, self.bias, self.compressor, self.subspace
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.compression.method!r}"


def mark_subspace_parameter(weight: nn.Parameter, compressor) -> None:
    """Attach a :class:`~actcomp_dist.subspace.SubspaceState` to ``weight``: it is updated in
    its compressor's subspace (backward records its m x r gradient there; the optimizers read
    it)."""
    if not compressor.supports_subspace:
        raise ValueError(f"method {compressor.name!r} does not support grad_mode='subspace'")
    weight.subspace = SubspaceState(weight, compressor.projection)


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def compress_linears(
    model: nn.Module,
    compression: CompressionConfig,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    schedule: CompressionSchedule | None = None,
    all_reduce: AllReduce | None = SumOverRanks(),
) -> nn.Module:
    """Replace matching ``nn.Linear`` modules of ``model`` in place by ``CompressedLinear``.

    ``include``/``exclude`` are glob patterns matched against the module's full dotted name and
    its last component (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``); ``include=None``
    takes every ``nn.Linear``. PEFT's names are matched by role too: LoRA's
    ``...q_proj.lora_A.default`` also answers to ``"lora_A"`` and ``"q_proj.lora_A"`` (so
    ``include=["lora_A"]`` compresses every LoRA A input), and a wrapped ``...q_proj.base_layer``
    to ``"q_proj"``. A module's ``layer_id`` is the first integer in its name (the block
    index, as in ``layers.3``), else its position among the matches; its ``site`` is its last name
    component, for PEFT modules the role (``q_proj.lora_A``, ``q_proj``): adapters of different
    projections get different projection seeds. All replaced layers share one schedule,
    returned by :func:`find_schedule`. ``all_reduce`` combines data-dependent set-up over
    ranks (see :class:`CompressedLinear`; default: every rank). VeLoRA's published sites are
    ``include=actcomp_dist.compression.subtoken.PAPER_SITES`` (``v_proj``, ``down_proj``).
    """
    schedule = schedule or CompressionSchedule(compression.resample_every)
    include = None if include is None else list(include)
    exclude = list(exclude)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and _matches(name, include, exclude)
    ]
    if include is not None and not targets:
        raise ValueError(f"compress_linears: no nn.Linear module matches include={include}")
    for position, (name, module) in enumerate(targets):
        index = _LAYER_INDEX.search(name)
        layer = CompressedLinear.from_linear(
            module,
            compression,
            layer_id=int(index.group(1)) if index else position,
            site=_aliases(name)[-1],
            schedule=schedule,
            all_reduce=all_reduce,
        )
        _set_submodule(model, name, layer)
    return model


@contextlib.contextmanager
def compression_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as if every compressed layer used method ``none`` (saving its full input),
    e.g. to measure what compression saves on the same model and batch. Subspace layers must
    not run backward inside (their gradient would not be in the subspace)."""
    swapped = []
    for module in model.modules():
        compressor = getattr(module, "compressor", None)
        if compressor is None or compressor.is_identity:
            continue
        identity = build_compressor(
            module.compression.replace(method="none", grad_mode="lift"),
            compressor.layout,
            compressor.layer_id,
            compressor.site,
            compressor.schedule,
        )
        swapped.append((module, compressor, module.subspace))
        module.compressor, module.subspace = identity, False
    try:
        yield
    finally:
        for module, compressor, subspace in swapped:
            module.compressor, module.subspace = compressor, subspace


def find_schedule(model: nn.Module) -> CompressionSchedule | None:
    """The schedule shared by the compressed layers of ``model`` (``None`` if it has none)."""
    for module in model.modules():
        schedule = getattr(module, "schedule", None)
        if isinstance(schedule, CompressionSchedule):
            return schedule
    return None


#: PEFT's adapter containers: ``<projection>.lora_A.<adapter name>``.
_PEFT_ROLES = ("lora_A", "lora_B")


def _aliases(name: str) -> list[str]:
    """The short names a pattern may match besides the full name; the last one is the site."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2] in _PEFT_ROLES:
        return [parts[-1], parts[-2], f"{parts[-3]}.{parts[-2]}"]
    if len(parts) >= 2 and parts[-1] == "base_layer":
        return [parts[-1], parts[-2]]
    return [parts[-1]]


def _matches(name: str, include: list[str] | None, exclude: list[str]) -> bool:
    names = [name, *_aliases(name)]

    def hit(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    return bool(name) and (include is None or hit(include)) and not hit(exclude)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
