"""`AdapterConfig`: which low-rank adapter, where, and its knobs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from actcomp_dist.config import TRANSFORMER_SITES, CompressionConfig, known_fields


@dataclass(frozen=True)
class AdapterConfig:
    """A low-rank adapter ``delta W = (alpha / r) * B A`` on every targeted linear.

    Fields:
        method: registered adapter name (:func:`list_adapter_methods`): ``lora`` (A and B
            trained) or ``lori`` (A frozen and regenerated from ``seed``, only B trained).
        rank: ``r``, an int >= 1.
        alpha: the scale numerator; the adapter output is ``alpha / rank * B A x``.
            ``None`` means ``2 * rank`` (LoRI's r = 32, alpha = 64).
        targets: glob patterns matched against each linear module's full dotted name and its
            last component: our LLaMA's sites (``qkv``, ``proj``, ``fc1``, ``fc2``) or, for a
            plain PyTorch model, names such as ``q_proj`` / ``*.mlp.*``.
        seed: the adapter seed. ``A`` of (adapter, layer, site) is drawn from
            ``projection_seed(seed, layer_id, "adapter/" + site, 0, 0)``: the same A on every
            rank and after every reload, independent ones for different tasks (give each task
            its own seed). For ``lora`` it seeds A's initialisation.
        task: the index of this adapter's task in a continual-learning sequence (0 for a
            single task). A is drawn from ``projection_seed(seed, layer_id, "adapter/" + site,
            task, 0)``, so the tasks of one base seed have independent A matrices.
        sparsity: the fraction of B entries a LoRI mask removes (``compute_masks``); 0.9 keeps
            10%. Only used when masks are computed.
        cache_A: keep ``A`` on the module (r x n per site, not saved in any state dict) instead
            of regenerating it in every forward and backward (``lori``).
        input_compression: ``lora`` only: compress the adapter input that A's gradient needs
            (any registered compression method, ``grad_mode="lift"``); ``None`` saves it whole.
            ``lori`` saves only ``A x`` and needs none.
    """

    method: str = "lori"
    rank: int = 32
    alpha: float | None = None
    targets: tuple[str, ...] = field(default=TRANSFORMER_SITES)
    seed: int = 0
    task: int = 0
    sparsity: float = 0.9
    cache_A: bool = True
    input_compression: CompressionConfig | None = None

    def __post_init__(self) -> None:
        from actcomp_dist.adapters.registry import list_adapter_methods

        if self.method not in list_adapter_methods():
            raise ValueError(
                f"AdapterConfig.method={self.method!r} is not a registered adapter; "
                f"registered: {list_adapter_methods()}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank={self.rank!r} must be an int >= 1")
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"AdapterConfig.alpha={self.alpha!r} must be a positive number")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(
                f"AdapterConfig.targets must be a list of module-name patterns, got "
                f"{self.targets!r}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("AdapterConfig.targets is empty; name at least one linear site")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"AdapterConfig.seed={self.seed!r} must be an int >= 0")
        if isinstance(self.task, bool) or not isinstance(self.task, int) or self.task < 0:
            raise ValueError(f"AdapterConfig.task={self.task!r} must be an int >= 0")
        if isinstance(self.sparsity, bool) or not (
            isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0
        ):
            raise ValueError(f"AdapterConfig.sparsity={self.sparsity!r} must be in [0, 1)")
        if isinstance(self.input_compression, dict):
            object.__setattr__(
                self, "input_compression", CompressionConfig.from_dict(self.input_compression)
            )
        if self.input_compression is not None:
            if self.method != "lora":
                raise ValueError(
                    f"AdapterConfig.input_compression is for method='lora' (whose A gradient "
                    f"needs the input); method={self.method!r} saves only A x"
                )
            if self.input_compression.grad_mode != "lift":
                raise ValueError(
                    "AdapterConfig.input_compression must use grad_mode='lift' (the adapter "
                    "A is a small dense parameter)"
                )

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        alpha = 2.0 * self.rank if self.alpha is None else float(self.alpha)
        return alpha / self.rank

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        if self.input_compression is not None:
            out["input_compression"] = self.input_compression.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        values = known_fields(cls, values, "adapter")
        if isinstance(values.get("targets"), list):
            values["targets"] = tuple(values["targets"])
        return cls(**values)
