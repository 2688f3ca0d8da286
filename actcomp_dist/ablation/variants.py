"""The variant grammar of ``tools/ablate.py`` and ``tools/memory_plan.py``.

A variant names one way of saving activation memory; a list is comma-separated::

    VARIANTS := VARIANT ("," VARIANT)*
    VARIANT  := BASE ["+" AC] ["+" STORAGE] ["+" "naive"] | STORAGE | "naive"
                (the parts in any order)
    BASE     := "none" | AC | METHOD ":" ARG | METHOD
    AC       := "ac_selective" | "ac_full" | "ac_sublayer" | "ac_full_" BLOCK
    BLOCK    := "int8" | "fp8" | "offload" | "lowrank:" RANK   (``memory.policy.block_input``:
                full checkpointing keeping each block's input packed; lowrank is LoRAct's layer
                mode; offload keeps it in pinned host memory, CUDA only)
    STORAGE  := "int8" | "fp8"   (``memory.policy`` of ``attention`` and ``swiglu``)
              | ("int8" | "fp8") "@" KIND ("/" KIND)*  (8 bits on the kinds named:
                ``norm``, ``attention``, ``swiglu``; ``int8@norm/swiglu``)
              | "offload"  (``memory.policy`` of ``norm``, ``attention`` and ``swiglu``:
                pinned host memory; CUDA only)
              | "recompute_attention" | "recompute_swiglu"  (``memory.policy`` of that kind:
                ``recompute``, the sublayer re-run from the norm output)
              | "ac_lowrank:" RANK  (``memory.policy`` of ``norm`` and ``swiglu``: ``lowrank:RANK``)
    METHOD   := a registered compression method other than none (compact, lowrank, subtoken,
                and any method a plugin registers)
    ARG      := the value of the option the method names as its ``ablation_option``, parsed
                by the method: compact, lowrank: the rank, a ratio of each layer's input width
                with a decimal point ("0.25" -> r = n/4) or an absolute rank without one ("64");
                subtoken: the number of sub-token groups per token ("32"). A method without
                an ablation option is written alone (``METHOD``).

Examples: ``none``, ``ac_full``, ``compact:0.25``, ``compact:0.25+ac_full``,
``lowrank:0.125+ac_selective``, ``subtoken:32``, ``naive``, ``compact:0.25+naive``, ``int8``,
``fp8+ac_selective``, ``compact:0.25+int8``, ``int8@norm/swiglu``, ``ac_lowrank:0.25``,
``ac_lowrank:64+ac_selective``, ``ac_full_lowrank:0.25``, ``compact:0.25+ac_full_int8``,
``ac_full_lowrank:16+ac_lowrank:8``, ``ac_sublayer``, ``ac_sublayer+ac_lowrank:0.125``,
``offload``, ``compact:0.25+offload``, ``offload+ac_selective``, ``ac_full_offload``.
``none+ac_full`` is the same as ``ac_full``, ``none+naive`` the same as ``naive``.

``naive`` runs the naive block (``memory.efficient_ops: false``: the norms, attention core and
SwiGLU keep what plain PyTorch autograd keeps, what most papers measure against); every other
variant runs the memory-efficient exact block, so ``none`` is the strongest exact baseline.
``int8`` / ``fp8`` store the attention's q, k, v, o and SwiGLU's ``[gate | up]`` in 8 bits
(``memory.policy``: ``attention`` and ``swiglu``; :mod:`actcomp_dist.storage`); the other kinds
keep the base config's policy. ``int8@KINDS`` / ``fp8@KINDS`` store only the kinds named
(``int8@norm/swiglu``: the block norms' outputs and ``[gate | up]``, the attention kept exact,
so backward runs no SDPA forward again); the canonical spelling lists them in
:data:`actcomp_dist.storage.KINDS` order. ``offload`` keeps the block norms' outputs, q, k, v, o
and ``[gate | up]`` in pinned host memory (bitwise exact; 0 device bytes): it runs only on CUDA,
so ``tools/ablate.py`` refuses it without a GPU (:func:`check_variants_run_here`), while the
planner predicts it anywhere (no ``offload@KIND`` form). ``ac_lowrank:RANK`` keeps the block norms' outputs and
``[gate | up]`` as LoRAct's low-rank factors (``memory.policy`` ``norm`` and ``swiglu`` at
``lowrank:RANK``; RANK a ratio of each factorised width with a decimal point or an absolute
int, as a method's rank). ``ac_full_BLOCK`` is ``ac_full`` whose blocks keep their input
packed (``memory.policy.block_input``: ``int8``, ``fp8`` or ``lowrank:RANK``, LoRAct's layer
mode). ``ac_sublayer`` is pre-norm sublayer checkpointing (``activation_checkpointing.mode:
sublayer``): the blocks keep what their norms keep; with ``ac_lowrank:RANK`` (norm factors)
it is LoRAct's pre-norm sublayer mode. Storage variants and ``ac_sublayer`` need the efficient
block (not with ``naive``).

A variant changes only ``compression.method``, the method's ablation option
(``compression.rank``, ``compression.groups``, ...), ``activation_checkpointing.mode`` and
``memory.efficient_ops`` and (a storage or ``ac_full_BLOCK`` variant) ``memory.policy``; every other setting (sites, seed, projection, resample period,
checkpointed layer count, ...) comes from the base config. ``compression.grad_mode`` is kept for methods that support
``subspace`` and set to ``lift`` for the others.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actcomp_dist.compression import get_compressor_class, layer_layout, list_compressors
from actcomp_dist.compression.base import parse_rank_argument
from actcomp_dist.config import CompressionConfig
from actcomp_dist.memory_model import ActivationSetting
from actcomp_dist.storage import LINEAR_SITES, LowRankStorage, StoragePolicy

if TYPE_CHECKING:
    from actcomp_dist.training.config import MemoryConfig

AC_NAMES = {"ac_selective": "selective", "ac_full": "full", "ac_sublayer": "sublayer"}
#: ``ac_full_BLOCK``: full checkpointing with ``memory.policy.block_input = BLOCK``.
PACKED_FULL = "ac_full_"
NAIVE = "naive"
STORAGE_NAMES = ("int8", "fp8", "offload")
#: The storage names with an ``@KIND/KIND`` form.
EIGHT_BIT_NAMES = ("int8", "fp8")
#: ``recompute_KIND``: ``memory.policy.KIND = recompute``.
RECOMPUTE_NAMES = {"recompute_attention": "attention", "recompute_swiglu": "swiglu"}
#: The storage variant of LoRAct's factors: ``ac_lowrank:RANK``.
LOWRANK_STORAGE = "ac_lowrank"
#: The kinds an ``int8`` / ``fp8`` variant stores in 8 bits.
STORAGE_KINDS = ("attention", "swiglu")
#: The kinds ``int8@KIND/KIND`` may name.
STORAGE_SELECTABLE_KINDS = ("norm", "attention", "swiglu")
#: The kinds an ``offload`` variant keeps in host memory.
OFFLOAD_KINDS = ("norm", "attention", "swiglu")
#: The kinds an ``ac_lowrank:RANK`` variant stores as low-rank factors.
LOWRANK_STORAGE_KINDS = ("norm", "swiglu")
GRAMMAR = (
    "VARIANT := BASE['+'AC]['+'STORAGE]['+naive'] | STORAGE | naive; "
    "STORAGE := int8 | fp8 | int8@KIND/KIND | fp8@KIND/KIND (KIND: norm, attention, swiglu) | "
    "offload | ac_lowrank:RANK | recompute_attention | recompute_swiglu; "
    "BASE := none | AC | "
    "METHOD:ARG | METHOD; AC := ac_selective | ac_full | ac_sublayer | ac_full_int8 | "
    "ac_full_fp8 | ac_full_offload | ac_full_lowrank:RANK; METHOD:ARG is compact:RANK, "
    "lowrank:RANK (RANK a ratio like 0.25 or an absolute int like 64) or subtoken:GROUPS (an "
    "int); '+naive' runs the naive block (memory.efficient_ops=false)"
)


class VariantError(ValueError):
    """A variant string that does not follow the grammar (the message quotes it)."""


@dataclass(frozen=True)
class Variant:
    """One parsed variant. ``argument`` is the value of the method's ablation option (rank,
    group count, ...); ``efficient_ops`` is false for ``+naive``; ``storage`` is ``int8``,
    ``fp8``, ``lowrank:RANK``, ``recompute_attention``, ``recompute_swiglu`` or ``None`` (the
    base config's ``memory.policy``);
    ``block_input`` is the ``memory.policy.block_input`` of an ``ac_full_BLOCK`` variant."""

    method: str = "none"
    argument: float | int | None = None
    ac_mode: str = "none"
    efficient_ops: bool = True
    storage: str | None = None
    block_input: str | None = None

    @property
    def name(self) -> str:
        """The canonical spelling (``compact:0.25+ac_full``, ``ac_full+naive``, ``naive``,
        ``compact:0.25+int8``, ``int8+ac_selective``)."""
        base = self._base_name
        if self.storage is None:
            return base
        storage = self.storage
        if storage.startswith("lowrank:"):
            storage = f"{LOWRANK_STORAGE}:{storage.partition(':')[2]}"
        return storage if base == "none" else f"{base}+{storage}"

    @property
    def storage_changes(self) -> dict[str, str]:
        """The ``memory.policy`` entries this variant sets."""
        changes = {} if self.block_input is None else {"block_input": self.block_input}
        if self.storage is None:
            return changes
        if self.storage in RECOMPUTE_NAMES:
            return {RECOMPUTE_NAMES[self.storage]: "recompute"} | changes
        if self.storage.startswith("lowrank:"):
            return dict.fromkeys(LOWRANK_STORAGE_KINDS, self.storage) | changes
        if self.storage == "offload":
            return dict.fromkeys(OFFLOAD_KINDS, "offload") | changes
        policy, kinds = storage_kinds(self.storage)
        return dict.fromkeys(kinds, policy) | changes

    @property
    def offloads(self) -> bool:
        """Some kind is kept in host memory (``offload``, ``ac_full_offload``)."""
        return "offload" in self.storage_changes.values()

    @property
    def _ac_name(self) -> str:
        if self.block_input is not None:
            return f"{PACKED_FULL}{self.block_input}"
        return f"ac_{self.ac_mode}"

    @property
    def _base_name(self) -> str:
        if self.method == "none":
            base = "none" if self.ac_mode == "none" else self._ac_name
            if base == "none" and not self.efficient_ops:
                return NAIVE
        else:
            base = self.method if self.argument is None else f"{self.method}:{self.argument}"
            if self.ac_mode != "none":
                base = f"{base}+{self._ac_name}"
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

    def storage_policy(self, base: dict[str, str] | None = None) -> StoragePolicy:
        """``memory.policy`` ``base`` with this variant's storage kinds."""
        return StoragePolicy.from_mapping(dict(base or {}) | self.storage_changes)

    def activation_setting(
        self, memory: MemoryConfig, micro_batch_size: int, seq_length: int, **shape: Any
    ) -> ActivationSetting:
        """The memory model's setting for this variant on a run whose memory section is
        ``memory``: the variant's ops, the run's loss chunking when the ops are efficient, and
        the run's ``memory.policy`` with the variant's storage kinds. ``shape`` takes the other
        :class:`ActivationSetting` fields (``dtype_bytes``, ``tensor_parallel``, ...)."""
        return ActivationSetting(
            micro_batch_size,
            seq_length,
            efficient_ops=self.efficient_ops,
            loss_chunk_tokens=memory.loss_chunk_tokens if self.efficient_ops else None,
            storage=self.storage_policy(memory.policy),
            **shape,
        )

    def compression(self, base: CompressionConfig) -> CompressionConfig:
        """``base`` with this variant's method and option."""
        return base.replace(**self.compression_changes())

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A copy of the raw run config (JSON dict) with this variant's settings."""
        raw = copy.deepcopy(raw)
        raw.setdefault("compression", {}).update(self.compression_changes())
        raw.setdefault("activation_checkpointing", {})["mode"] = self.ac_mode
        memory = raw.setdefault("memory", {})
        memory["efficient_ops"] = self.efficient_ops
        if self.method == "none" and isinstance(memory.get("policy"), dict):
            # A linear site's ``compress`` names compression.sites, which method 'none'
            # ignores (and the config refuses 'compress' with it).
            for site in LINEAR_SITES:
                if memory["policy"].get(site) == "compress":
                    del memory["policy"][site]
        if self.storage_changes:
            memory.setdefault("policy", {}).update(self.storage_changes)
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
    packed_full = [part for part in parts if part.startswith(PACKED_FULL)]
    block_input = None
    if packed_full:
        block_input = _parse_block_input(packed_full[0], variant)
        parts = ["ac_full" if part.startswith(PACKED_FULL) else part for part in parts]
    naive = parts.count(NAIVE)
    if naive > 1:
        raise VariantError(f"variant {variant!r} names 'naive' twice")
    storages = [part for part in parts if _is_storage(part)]
    if len(storages) > 1:
        raise VariantError(
            f"variant {variant!r}: at most one of {list(STORAGE_NAMES)} (or their @KIND/KIND "
            f"forms), {LOWRANK_STORAGE}:RANK, "
            f"{list(RECOMPUTE_NAMES)}"
        )
    if storages and naive:
        raise VariantError(
            f"variant {variant!r}: {storages[0]} storage needs the memory-efficient block; "
            f"drop '+naive'"
        )
    if packed_full and naive:
        raise VariantError(
            f"variant {variant!r}: {packed_full[0]} packs the block input, which needs the "
            f"memory-efficient block; drop '+naive'"
        )
    parts = [part for part in parts if part != NAIVE and not _is_storage(part)] or ["none"]
    parsed = _parse_compression_and_ac(parts, variant)
    if parsed.ac_mode == "sublayer" and naive:
        raise VariantError(
            f"variant {variant!r}: ac_sublayer re-runs each sublayer from what the "
            f"memory-efficient norm keeps; drop '+naive'"
        )
    return Variant(
        parsed.method,
        parsed.argument,
        parsed.ac_mode,
        efficient_ops=not naive,
        storage=_parse_storage(storages[0], variant) if storages else None,
        block_input=block_input,
    )


def _parse_block_input(part: str, variant: str) -> str:
    """The ``memory.policy.block_input`` of an ``ac_full_BLOCK`` part."""
    block = part[len(PACKED_FULL) :]
    if block in STORAGE_NAMES:
        return block
    if block.startswith("lowrank:"):
        try:
            LowRankStorage(parse_rank_argument(block.partition(":")[2]))
        except ValueError:
            pass
        else:
            return block
    raise VariantError(
        f"variant {variant!r}: {part!r} is not ac_full_int8, ac_full_fp8, ac_full_offload or "
        f"ac_full_lowrank:RANK (RANK a ratio in (0, 1] with a decimal point, or an int >= 1)"
    )


def storage_kinds(storage: str) -> tuple[str, tuple[str, ...]]:
    """The 8-bit policy of a storage variant and the kinds it stores (``int8`` ->
    ``("int8", ("attention", "swiglu"))``, ``int8@norm/swiglu`` -> ``("int8", ("norm",
    "swiglu"))``)."""
    policy, _, kinds = storage.partition("@")
    return policy, tuple(kinds.split("/")) if kinds else STORAGE_KINDS


def _is_storage(part: str) -> bool:
    return (
        part in STORAGE_NAMES
        or part.partition("@")[0] in STORAGE_NAMES
        or part in RECOMPUTE_NAMES
        or part.partition(":")[0] == LOWRANK_STORAGE
    )


def _parse_storage(part: str, variant: str) -> str:
    """The ``memory.policy`` value of a storage part (``ac_lowrank:0.25`` -> ``lowrank:0.25``)."""
    if part in STORAGE_NAMES or part in RECOMPUTE_NAMES:
        return part
    policy, at, kinds = part.partition("@")
    if at and policy not in EIGHT_BIT_NAMES:
        raise VariantError(f"variant {variant!r}: {part!r}: {policy} takes no @KIND form")
    if at:
        named = kinds.split("/")
        if (
            not kinds
            or not set(named) <= set(STORAGE_SELECTABLE_KINDS)
            or len(set(named)) < len(named)
        ):
            raise VariantError(
                f"variant {variant!r}: {part!r} needs {policy}@KIND/KIND... with distinct KINDs "
                f"from {list(STORAGE_SELECTABLE_KINDS)}"
            )
        # Canonical: the kinds in KINDS order (int8@swiglu/norm is int8@norm/swiglu), and the
        # plain name for the plain variant's kinds (int8@attention/swiglu is int8).
        ordered = tuple(k for k in STORAGE_SELECTABLE_KINDS if k in named)
        return policy if ordered == STORAGE_KINDS else f"{policy}@{'/'.join(ordered)}"
    rank = part.partition(":")[2]
    try:
        LowRankStorage(parse_rank_argument(rank))
    except ValueError:
        raise VariantError(
            f"variant {variant!r}: {part!r} needs {LOWRANK_STORAGE}:RANK with RANK a ratio in "
            f"(0, 1] with a decimal point (0.25) or an int >= 1 (64)"
        ) from None
    return f"lowrank:{rank}"


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


def check_variants_run_here(variants: list[Variant]) -> None:
    """Refuse, before anything runs, a variant this machine cannot train: ``offload`` needs
    CUDA (pinned host memory; on a CPU host and device are one memory)."""
    import torch

    offloading = [v.name for v in variants if v.offloads]
    if offloading and not torch.cuda.is_available():
        raise VariantError(
            f"variant(s) {offloading} keep activations in pinned host memory (memory.policy "
            f"'offload'): they need a CUDA device; tools/memory_plan.py predicts them anywhere"
        )


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
