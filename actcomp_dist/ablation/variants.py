"""The variant grammar of ``tools/ablate.py`` and ``tools/memory_plan.py``.

A variant names one way of saving activation memory; a list is comma-separated::

    VARIANTS := VARIANT ("," VARIANT)*
    VARIANT  := BASE ["+" AC] ["+" "naive"] | "naive"   (the parts in any order)
    BASE     := "none" | AC | METHOD ":" ARG | METHOD
    AC       := "ac_selective" | "ac_full"
    METHOD   := a registered compression method other than none (compact, lowrank, subtoken,
                and any method a plugin registers)
    ARG      := the value of the option the method names as its ``ablation_option``, parsed
                by the method: compact, lowrank: the rank, a ratio of each layer's input width
                with a decimal point ("0.25" -> r = n/4) or an absolute rank without one ("64");
                subtoken: the number of sub-token groups per token ("32"). A method without
                an ablation option is written alone (``METHOD``).

Examples: ``none``, ``ac_full``, ``compact:0.25``, ``compact:0.25+ac_full``,
``lowrank:0.125+ac_selective``, ``subtoken:32``, ``naive``, ``compact:0.25+naive``.
``none+ac_full`` is the same as ``ac_full``, ``none+naive`` the same as ``naive``.

``naive`` runs the naive block (``memory.efficient_ops: false``: the norms, attention core and
SwiGLU keep what plain PyTorch autograd keeps, what most papers measure against); every other
variant runs the memory-efficient exact block, so ``none`` is the strongest exact baseline.

A variant changes only ``compression.method``, the method's ablation option
(``compression.rank``, ``compression.groups``, ...), ``activation_checkpointing.mode`` and
``memory.efficient_ops``; every other setting (sites, seed, projection, resample period,
checkpointed layer count, ...) comes from the base config. ``compression.grad_mode`` is kept for methods that support
``subspace`` and set to ``lift`` for the others.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from actcomp_dist.compression import get_compressor_class, layer_layout, list_compressors
from actcomp_dist.config import CompressionConfig

AC_NAMES = {"ac_selective": "selective", "ac_full": "full"}
NAIVE = "naive"
GRAMMAR = (
    "VARIANT := BASE['+'AC]['+naive'] | naive; BASE := none | ac_selective | ac_full | "
    "METHOD:ARG | METHOD; AC := ac_selective | ac_full; METHOD:ARG is compact:RANK, "
    "lowrank:RANK (RANK a ratio like 0.25 or an absolute int like 64) or subtoken:GROUPS (an "
    "int); '+naive' runs the naive block (memory.efficient_ops=false)"
)


class VariantError(ValueError):
    """A variant string that does not follow the grammar (the message quotes it)."""


@dataclass(frozen=True)
class Variant:
    """One parsed variant. ``argument`` is the value of the method's ablation option (rank,
    group count, ...); ``efficient_ops`` is false for ``+naive``."""

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
            base = self.method if self.argument is None else f"{self.method}:{self.argument}"
            if self.ac_mode != "none":
                base = f"{base}+ac_{self.ac_mode}"
        return base if self.efficient_ops else f"{base}+{NAIVE}"

    @property
    def slug(self) -> str:
        """A file-system friendly name (``compact-0.25+ac_full``)."""
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", self.name.replace(":", "-"))

    def compression_changes(self) -> dict[str, Any]:
        """The ``compression.*`` values this variant sets."""
        method = get_compressor_class(self.method)
        changes: dict[str, Any] = {"method": self.method}
        if method.ablation_option is not None:
            changes[method.ablation_option] = self.argument
        if not method.supports_subspace:
            changes["grad_mode"] = "lift"
        return changes

    def compression(self, base: CompressionConfig) -> CompressionConfig:
        """``base`` with this variant's method and option."""
        return base.replace(**self.compression_changes())

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A copy of the raw run config (JSON dict) with this variant's settings."""
        raw = copy.deepcopy(raw)
        raw.setdefault("compression", {}).update(self.compression_changes())
        raw.setdefault("activation_checkpointing", {})["mode"] = self.ac_mode
        raw.setdefault("memory", {})["efficient_ops"] = self.efficient_ops
        return raw


def _parse_argument(text: str, method: str, variant: str) -> Any:
    cls = get_compressor_class(method)
    try:
        value = cls.parse_ablation_argument(text)
        CompressionConfig(method=method, **{cls.ablation_option: value})
    except ValueError as err:
        raise VariantError(f"variant {variant!r}: {err}") from None
    return value


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
    parsed = _parse_compression_and_ac(parts, variant)
    return Variant(parsed.method, parsed.argument, parsed.ac_mode, efficient_ops=not naive)


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
                f"one of {sorted(AC_NAMES)} (or {NAIVE!r})"
            )
        ac_mode = AC_NAMES[suffix]
    if base in AC_NAMES:
        if ac_mode != "none":
            raise VariantError(f"variant {variant!r} names two checkpointing modes")
        return Variant("none", None, AC_NAMES[base])
    if base == "none":
        return Variant("none", None, ac_mode)
    methods = [m for m in list_compressors() if m != "none"]
    method, _, argument = (s.strip() for s in base.partition(":"))
    if method not in methods:
        raise VariantError(
            f"variant {variant!r}: unknown compression method {method!r}; registered methods: "
            f"{methods}, checkpointing: {sorted(AC_NAMES)}; grammar: {GRAMMAR}"
        )
    option = get_compressor_class(method).ablation_option
    if option is None:
        if ":" in base:
            raise VariantError(f"variant {variant!r}: {method} takes no argument; write {method}")
        return Variant(method, None, ac_mode)
    if ":" not in base:
        raise VariantError(
            f"variant {variant!r}: {method} needs its {option}; did you mean {method}:ARG? "
            f"grammar: {GRAMMAR}"
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
    """Shape checks that otherwise fail only when the model is built (the method's
    ``saved_width`` on each compressed site: groups must divide the width, a rank must not
    exceed it, ...)."""
    widths = {
        "qkv": model.hidden_size,
        "proj": model.num_attention_heads * model.head_dim,
        "fc1": model.hidden_size,
        "fc2": model.ffn_hidden_size,
    }
    config = variant.compression(compression)
    method = get_compressor_class(config.method)
    for site in compression.sites:
        width = widths.get(site)
        if width is None:
            continue
        try:
            method.saved_width(config, layer_layout(config, width))
        except ValueError as err:
            raise VariantError(
                f"variant {variant.name!r} does not fit the input width {width} of site "
                f"{site!r}: {err}"
            ) from None
