"""`CompressionConfig`: what a compressed linear layer stores for its backward pass.

One config object describes a method and its knobs; every layer built from it resolves the
per-layer quantities (the rank for its input width, its seed) itself. The config validates its
own fields on construction so a bad value fails before any layer, process group or collective
exists, with a message that names the field and what would be valid.

The fields are one flat set shared by every method (they are the ``compression.*`` keys of the
run configs and of the compression fingerprint checkpoints are checked against); each method
declares which of them it reads (``Compressor.options``) and the valid values of its
choice-valued ones (``Compressor.choices``), and this config checks those.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

GRAD_MODES = ("lift", "subspace")
#: The linear sites of a transformer block, in forward order: fused QKV, attention output,
#: fused gate/up (FC1) and down (FC2) projections.
TRANSFORMER_SITES = ("qkv", "proj", "fc1", "fc2")
DEFAULT_SITES = ("qkv", "fc1", "fc2")
#: The sites whose linear is row-parallel (input sharded along its features) under TP.
ROW_PARALLEL_SITES = ("proj", "fc2")
#: Sites that are a slice of a fused linear's output rows -> that linear's site. ``v``: the
#: value rows of the fused QKV (VeLoRA's ``v_proj``); the rest of the linear stays exact, so
#: it keeps its exact input, and only a method whose compressed weight gradient is a
#: projection of the exact one (``Compressor.projects_exact_gradient``) can serve it.
ROW_SLICE_SITES = {"v": "qkv"}


@dataclass(frozen=True)
class CompressionConfig:
    """How activations saved for the weight gradient are compressed.

    Fields:
        method: registered compressor name (``list_compressors()``): ``none``, ``compact``,
            ``lowrank``, ``subtoken``.
        rank: for ``compact``/``lowrank``, a ratio of the layer's input width (``0 < rank <= 1``,
            a float) or an absolute rank (an int, ``1 <= rank <= in_features``).
        projection: ``compact`` projection kind: ``gaussian`` (N(0, 1/r)), ``rademacher``
            (+-1/sqrt(r)) or ``sparse`` (very sparse JL, density ``1/sqrt(n)``).
        grad_mode: ``lift`` returns an ordinary parameter-shaped gradient ``(g^T Z) P^T``;
            ``subspace`` keeps the m x r gradient on ``weight.subspace.grad`` for
            :class:`actcomp_dist.optim.SubspaceAdamW` (``compact`` only).
        resample_every: ``T``; the projection changes every ``T`` optimizer steps.
        seed: base seed of every projection / sampling seed (see actcomp_dist.seeds).
        groups: ``subtoken`` sub-tokens per token; must divide the layer's input width.
        velora_scale: ``subtoken``'s gradient scale (VeLoRA's ``velora_scale``): the
            reconstructed input ``s v`` is multiplied by it, so the weight gradient is
            ``velora_scale * (g^T S) (x) v``; the paper uses 1.0 for pretraining and 0.1 for
            LLaMA fine-tuning. A finite float > 0.
        lowrank_algorithm: ``sampled`` (LoRAct's sampled-column orthogonal decomposition) or
            ``rsvd`` (randomized SVD, the baseline LoRAct compares against).
        oversampling: ``rsvd``'s oversampling p: the Gaussian test matrix has k + p columns and
            the basis is truncated to k (default 10, see actcomp_dist.compression.lowrank).
        power_iterations: ``lowrank`` power iterations (0 = none).
        row_parallel_projection: ``compact``'s projection of a row-parallel (feature-sharded)
            layer: ``dense`` (the single-device layer's P; rank i multiplies its shard by its
            rows of P and the partial ``Z`` are summed in the collective of the layer's output)
            or ``block`` (block-diagonal over ``row_parallel_blocks``; no extra communication,
            r/t saved per token and rank).
        row_parallel_blocks: K, the number of canonical diagonal blocks of a ``block``
            row-parallel projection; fixed so results do not depend on the tensor-parallel size.
        cache_projection: keep the current projection on the layer (n*r elements per layer,
            in the compute dtype) instead of regenerating it from its seed in every forward,
            backward and subspace update. Off by default: from 60m up regenerating costs far
            under 2% of a step (60m-shaped, 2 blocks, 4 x 256 tokens on a CPU: 5.8 ms of
            1.8 s), and the cache would hold 0.46 GB per GPU at 1B (r = n/4, bf16). The tiny
            configs turn it on: there the seeding and drawing (~2.6 ms) are ~7% of a 38 ms
            step (tools/projection_cache_cost.py).
        sites: the model sites whose linear inputs are compressed (used by model builders).
    """

    method: str = "none"
    rank: float | int = 0.25
    projection: str = "gaussian"
    grad_mode: str = "lift"
    resample_every: int = 50
    seed: int = 0
    groups: int = 32
    velora_scale: float = 1.0
    lowrank_algorithm: str = "sampled"
    oversampling: int = 10
    power_iterations: int = 0
    row_parallel_projection: str = "dense"
    row_parallel_blocks: int = 8
    cache_projection: bool = False
    sites: tuple[str, ...] = field(default=DEFAULT_SITES)

    def __post_init__(self) -> None:
        # Imported here: the registry imports the compressors, which import this module.
        from actcomp_dist.compression.registry import get_compressor_class, list_compressors

        if self.method not in list_compressors():
            raise ValueError(
                f"CompressionConfig.method={self.method!r} is not a registered compression "
                f"method; registered methods: {list_compressors()}"
            )
        _check_rank(self.rank)
        _check_choice("grad_mode", self.grad_mode, GRAD_MODES)
        # Every method's choice-valued options, whichever method is selected: a config is
        # valid or not as a whole (an ablation variant may switch to another method).
        methods = [get_compressor_class(name) for name in list_compressors()]
        for cls in methods:
            for name, valid in cls.choices.items():
                _check_choice(name, getattr(self, name), valid)
        _check_int("resample_every", self.resample_every, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("groups", self.groups, minimum=1)
        if (
            isinstance(self.velora_scale, bool)
            or not isinstance(self.velora_scale, int | float)
            or not math.isfinite(self.velora_scale)
            or self.velora_scale <= 0
        ):
            raise ValueError(
                f"CompressionConfig.velora_scale={self.velora_scale!r} must be a finite number "
                f"> 0 (VeLoRA uses 1.0 for pretraining, 0.1 for fine-tuning)"
            )
        _check_int("oversampling", self.oversampling, minimum=0)
        _check_int("power_iterations", self.power_iterations, minimum=0)
        _check_int("row_parallel_blocks", self.row_parallel_blocks, minimum=1)
        if self.grad_mode == "subspace" and not get_compressor_class(self.method).supports_subspace:
            supporting = " or ".join(repr(cls.name) for cls in methods if cls.supports_subspace)
            raise ValueError(
                f"CompressionConfig.grad_mode='subspace' needs method={supporting} (a fixed, "
                f"seeded basis the optimizer can lift into); got method={self.method!r}"
            )
        if isinstance(self.sites, str) or not all(isinstance(s, str) for s in self.sites):
            raise ValueError(
                f"CompressionConfig.sites must be a list of site names, got {self.sites!r}"
            )
        object.__setattr__(self, "sites", tuple(self.sites))

    def resolve_rank(self, width: int) -> int:
        """The absolute rank for an input of ``width`` features."""
        if isinstance(self.rank, int):
            if self.rank > width:
                raise ValueError(
                    f"CompressionConfig.rank={self.rank} exceeds the layer input width {width}; "
                    f"use an int in [1, {width}] or a ratio in (0, 1]"
                )
            return self.rank
        return max(1, min(width, math.ceil(self.rank * width)))

    def replace(self, **changes: Any) -> CompressionConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sites"] = list(self.sites)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressionConfig:
        values = known_fields(cls, values, "compression")
        if "sites" in values and isinstance(values["sites"], list):
            values["sites"] = tuple(values["sites"])
        return cls(**values)


def known_fields(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """A copy of ``values`` after checking that every key is a field of the dataclass ``cls``;
    an unknown key raises ``ValueError`` listing the valid ones (``what``: how the message
    names the config, e.g. ``compression``). The ``from_dict`` of each config dataclass."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(valid)}")
    return dict(values)


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"CompressionConfig.rank must be a number, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(
                f"CompressionConfig.rank={rank}: an absolute rank must be >= 1 "
                f"(or give a ratio in (0, 1] as a float)"
            )
    elif not (0.0 < rank <= 1.0) or math.isnan(rank):
        raise ValueError(
            f"CompressionConfig.rank={rank}: a ratio of the input width must be in (0, 1] "
            f"(or give an absolute rank as an int)"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CompressionConfig.{name}={value!r} is not one of {list(choices)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"CompressionConfig.{name}={value!r} must be an int >= {minimum}")


def check_model_sites(compression: CompressionConfig) -> None:
    """Raises ``ValueError`` for ``compression.sites`` the LLaMA model cannot build: an unknown
    site, or the value-row slice ``v`` with a method that cannot serve it
    (``Compressor.projects_exact_gradient``) or beside ``qkv`` (which compresses every row)."""
    from actcomp_dist.compression import get_compressor_class

    unknown = [s for s in compression.sites if s not in TRANSFORMER_SITES + tuple(ROW_SLICE_SITES)]
    if unknown:
        raise ValueError(
            f"compression.sites has unknown site(s) {unknown}; the model's sites are "
            f"{list(TRANSFORMER_SITES) + list(ROW_SLICE_SITES)} (fused q/k/v, attention output, "
            f"fused gate/up, down: VeLoRA's down_proj is 'fc2'; 'v' is the value rows of the "
            f"fused q/k/v, VeLoRA's v_proj)"
        )
    if "v" in compression.sites:
        if "qkv" in compression.sites:
            raise ValueError(
                "compression.sites names both 'qkv' and 'v'; 'qkv' already compresses the "
                "value rows with q and k: keep one"
            )
        if not get_compressor_class(compression.method).projects_exact_gradient:
            raise ValueError(
                f"compression.sites 'v' (the value rows of the fused q/k/v) needs a method "
                f"whose weight gradient is a projection of the exact one (subtoken), not "
                f"compression.method={compression.method!r}"
            )
