"""The variant grammar of ``tools/ablate.py`` and ``tools/memory_plan.py``.

A variant names one way of saving activation memory; a list is comma-separated::

    VARIANTS := VARIANT ("," VARIANT)*
    VARIANT  := BASE ["+" AC] ["+" "naive"] | "naive"   (the parts in any order)
    BASE     := "none" | AC | METHOD ":" ARG
    AC       := "ac_selective" | "ac_full"
    METHOD   := a registered compression method other than none (compact, lowrank, subtoken)
    ARG      := compact, lowrank: the rank, a ratio of each layer's input width with a decimal
                point ("0.25" -> r = n/4) or an absolute rank without one ("64");
                subtoken: the number of sub-token groups per token ("32")

Examples: ``none``, ``ac_full``, ``compact:0.25``, ``compact:0.25+ac_full``,
``lowrank:0.125+ac_selective``, ``subtoken:32``, ``naive``, ``compact:0.25+naive``.
``none+ac_full`` is the same as ``ac_full``, ``none+naive`` the same as ``naive``.

``naive`` runs the naive block (``memory.efficient_ops: false``: the norms, attention core and
SwiGLU keep what plain PyTorch autograd keeps, what most papers measure against); every other
variant runs the memory-efficient exact block, so ``none`` is the strongest exact baseline.

A variant changes only ``compression.method``, its rank (``compression.rank``) or group count
(``compression.groups``), ``activation_checkpointing.mode`` and ``memory.efficient_ops``;
every other setting (sites,
seed, projection, resample period, checkpointed layer count, ...) comes from the base config.
``compression.grad_mode`` is kept for ``compact`` and set to ``lift`` for the other methods
(``subspace`` exists only for ``compact``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from actcomp_dist.compression.registry import list_compressors
from actcomp_dist.config import CompressionConfig

AC_NAMES = {"ac_selective": "selective", "ac_full": "full"}
_RANKED = ("compact", "lowrank")
NAIVE = "naive"
GRAMMAR = (
    "VARIANT := BASE['+'AC]['+naive'] | naive; BASE := none | ac_selective | ac_full | "
    "METHOD:ARG; AC := ac_selective | ac_full; METHOD:ARG is compact:RANK, lowrank:RANK (RANK "
    "a ratio like 0.25 or an absolute int like 64) or subtoken:GROUPS (an int); '+naive' runs "
    "the naive block (memory.efficient_ops=false)"
)


class VariantError(ValueError):
    """A variant string that does not follow the grammar (the message quotes it)."""


@dataclass(frozen=True)
class Variant:
    """One parsed variant. ``argument`` is the rank (float ratio or int) or group count;
    ``efficient_ops`` is false for ``+naive``."""

    method: str = "none"
    argument: float | int | None = None
    ac_mode: str = "none"
    efficient_ops: bool = True

    @property
    def name(self) -> str:
        """The canonical spelling (``compact:0.25+ac_full``, ``ac_full+naive``, ``naive``)."""
        if self.method == "none":
            base = "none" if self.ac_mode == "none" else f"ac_{self.ac_mode}"
            if base == "none" and not self.efficient_ops:
                return NAIVE
        else:
            base = f"{self.method}:{self.argument}"
            if self.ac_mode != "none":
                base = f"{base}+ac_{self.ac_mode}"
        return base if self.efficient_ops else f"{base}+{NAIVE}"

    @property
    def slug(self) -> str:
        """A file-system friendly name (``compact-0.25+ac_full``)."""
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", self.name.replace(":", "-"))

    def compression(self, base: CompressionConfig) -> CompressionConfig:
        """``base`` with this variant's method and rank / groups."""
        changes: dict[str, Any] = {"method": self.method}
        if self.method in _RANKED:
            changes["rank"] = self.argument
        elif self.method == "subtoken":
            changes["groups"] = self.argument
        if self.method != "compact":
            changes["grad_mode"] = "lift"
        return base.replace(**changes)

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A copy of the raw run config (JSON dict) with this variant's settings."""
        raw = copy.deepcopy(raw)
        compression = raw.setdefault("compression", {})
        compression["method"] = self.method
        if self.method in _RANKED:
            compression["rank"] = self.argument
        elif self.method == "subtoken":
            compression["groups"] = self.argument
        if self.method != "compact":
            compression["grad_mode"] = "lift"
        raw.setdefault("activation_checkpointing", {})["mode"] = self.ac_mode
        raw.setdefault("memory", {})["efficient_ops"] = self.efficient_ops
        return raw


def _parse_argument(text: str, method: str, variant: str) -> float | int:
    if method in _RANKED:
        try:
            value: float | int = float(text) if "." in text or "e" in text else int(text)
        except ValueError:
            raise VariantError(
                f"variant {variant!r}: the rank {text!r} is not a number; use a ratio of the "
                f"input width such as 0.25 or an absolute rank such as 64"
            ) from None
        try:
            CompressionConfig(method=method, rank=value)
        except ValueError as err:
            raise VariantError(f"variant {variant!r}: {err}") from None
        return value
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise VariantError(
            f"variant {variant!r}: {method} takes the number of sub-token groups, a positive "
            f"int such as 32, not {text!r}"
        )
    return int(text)


def parse_variant(text: str) -> Variant:
    """Parse one variant; raises :class:`VariantError` naming it and the grammar."""
    variant = text.strip()
    if not variant:
        raise VariantError(f"empty variant in the list; grammar: {GRAMMAR}")
    parts = [part.strip() for part in variant.split("+")]
    naive = parts.count(NAIVE)
    if naive > 1:
        raise VariantError(f"variant {variant!r} names 'naive' twice")
    parts = [part for part in parts if part != NAIVE] or ["none"]
    efficient_ops = not naive
    parsed = _parse_compression_and_ac(parts, variant)
    return Variant(parsed.method, parsed.argument, parsed.ac_mode, efficient_ops)


def _parse_compression_and_ac(parts: list[str], variant: str) -> Variant:
    if len(parts) > 2:
        raise VariantError(
            f"variant {variant!r}: at most one '+AC' suffix (ac_selective or ac_full); "
            f"grammar: {GRAMMAR}"
        )
    base = parts[0]
    ac_mode = "none"
    if len(parts) == 2:
        suffix = parts[1]
        if suffix not in AC_NAMES:
            raise VariantError(
                f"variant {variant!r}: {suffix!r} is not a checkpointing mode; after '+' use "
                f"one of {sorted(AC_NAMES)}"
            )
        ac_mode = AC_NAMES[suffix]
    if base in AC_NAMES:
        if ac_mode != "none":
            raise VariantError(f"variant {variant!r} names two checkpointing modes")
        return Variant("none", None, AC_NAMES[base])
    if base == "none":
        return Variant("none", None, ac_mode)
    if ":" not in base:
        methods = [m for m in list_compressors() if m != "none"]
        hint = (
            f"; did you mean {base}:ARG?"
            if base in methods
            else f"; methods: {methods}, checkpointing: {sorted(AC_NAMES)}"
        )
        raise VariantError(f"variant {variant!r} is not understood{hint}; grammar: {GRAMMAR}")
    method, argument = (s.strip() for s in base.split(":", 1))
    methods = [m for m in list_compressors() if m != "none"]
    if method not in methods:
        raise VariantError(
            f"variant {variant!r}: unknown compression method {method!r}; registered methods: "
            f"{methods}"
        )
    if method not in (*_RANKED, "subtoken"):
        raise VariantError(
            f"variant {variant!r}: the ablation does not know which setting {method!r}'s "
            f"argument is; add it to actcomp_dist/ablation/variants.py"
        )
    return Variant(method, _parse_argument(argument, method, variant), ac_mode)


def parse_variants(text: str) -> list[Variant]:
    """Parse a comma-separated list; duplicates (same canonical name) are refused."""
    variants = [parse_variant(part) for part in text.split(",")]
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VariantError(f"variants listed more than once: {duplicates}")
    return variants


def check_variant_fits_model(variant: Variant, compression: CompressionConfig, model) -> None:
    """Shape checks that otherwise fail only when the model is built (groups must divide each
    compressed site's input width; a rank must not exceed it)."""
    widths = {
        "qkv": model.hidden_size,
        "proj": model.num_attention_heads * model.head_dim,
        "fc1": model.hidden_size,
        "fc2": model.ffn_hidden_size,
    }
    for site in compression.sites:
        width = widths.get(site)
        if width is None:
            continue
        if variant.method == "subtoken" and width % variant.argument != 0:
            raise VariantError(
                f"variant {variant.name!r}: {variant.argument} groups do not divide the input "
                f"width {width} of site {site!r}; divisors of every site width: "
                f"{_common_divisors([widths[s] for s in compression.sites if s in widths])}"
            )
        if variant.method in _RANKED and isinstance(variant.argument, int):
            if variant.argument > width:
                raise VariantError(
                    f"variant {variant.name!r}: rank {variant.argument} exceeds the input width "
                    f"{width} of site {site!r}"
                )


def _common_divisors(values: list[int]) -> list[int]:
    smallest = min(values)
    return [d for d in range(1, smallest + 1) if all(v % d == 0 for v in values)]
