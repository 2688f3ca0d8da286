"""What compressing each linear site removes, given what the rest of the block keeps.

In the memory-efficient block (:mod:`actcomp_dist.models.efficient_ops`) most linear inputs
are already kept by a neighbour: qkv and fc1 read the norm's kept output, fc2's input is
recomputed from the ``[gate | up]`` the SwiGLU backward needs anyway, and proj reads the
attention output SDPA keeps. Compressing such a site removes nothing and *adds* its compressed
tensor. Which sites pay depends on the storage policy (``memory.policy``) and the device:
under an 8-bit ``attention`` policy on CUDA proj keeps the packed attention output of its
own (the attention keeps q, k, v only), which a compressed proj replaces by ``Z``; on CPU
the attention keeps that packed output itself (its backward starts from it), so there a
compressed proj adds its ``Z`` too (``ActivationSetting.device_type``).

Per compressed site (:func:`site_effects`), for one micro-batch on one rank:

- ``saved_with`` / ``saved_without``: the saved-activation bytes of the whole model with the
  run's compression, and with the same compression minus this site (every other site, policy
  and checkpointing mode unchanged), both from
  :func:`~actcomp_dist.memory_model.predict_saved_activations` (exact to the byte; tested
  against :class:`~actcomp_dist.memory.SavedTensorCounter`). ``removed`` is their difference;
  zero or negative means compressing the site buys no activation memory.
- ``all_gather_with`` / ``all_gather_without`` (sequence parallelism only, ``None`` otherwise):
  the bytes this rank contributes to the site's backward all-gathers, summed over the blocks
  (what the layers' :class:`~actcomp_dist.parallel.collectives.CommCounter` records).
  Column-parallel qkv / fc1 gather their saved input for the weight gradient: ``X`` (N/t x h;
  the norm's dequantised output under ``norm: int8``/``fp8``, its factors ``L`` and ``Q`` under
  ``norm: lowrank:R``) or ``Z`` (N/t x c, plus the basis of a method whose basis differs per
  rank). Row-parallel proj / fc2 gather the output gradient ``dY`` (N/t x h) in any case;
  a dense row-parallel ``Z`` travels in the same collective (N/t x c more).
- ``weight_gradient_flops_with`` / ``_without``: matmul flops of the site's weight gradient
  on this rank, summed over the blocks. Exact: ``g^T X``, ``2 N m n``. ``compact``: the
  projection ``X P`` in forward (``2 N n r``, this rank's tokens), ``g^T Z`` (``2 N m r``) and
  in ``lift`` mode the lift ``(g^T Z) P^T`` (``2 m r n``); ``None`` for other methods (no cost
  model). ``n``, ``m``, ``r`` are this rank's shard of the weight and projection.

Only activation memory is counted here. A compressed site can still pay elsewhere: in
``subspace`` mode its weight keeps ``m x r`` gradients and Adam moments (model states, see
:func:`~actcomp_dist.memory_model.predict_model_states`), and at small ranks its weight
gradient takes fewer flops.
"""

from __future__ import annotations

from dataclasses import dataclass

from actcomp_dist.compression import get_compressor_class
from actcomp_dist.config import ROW_SLICE_SITES, CompressionConfig
from actcomp_dist.memory_model import (
    ActivationSetting,
    ModelShape,
    _site_layout,
    _site_width,
    _site_widths,
    predict_saved_activations,
)
from actcomp_dist.storage import LowRankStorage

_COLUMN_SITES = ("qkv", "fc1")


@dataclass(frozen=True)
class SiteEffect:
    """What compressing ``site`` changes, per micro-batch on one rank (module docstring)."""

    site: str
    saved_with: int
    saved_without: int
    all_gather_with: int | None
    all_gather_without: int | None
    weight_gradient_flops_with: float | None
    weight_gradient_flops_without: float

    @property
    def removed(self) -> int:
        """Saved-activation bytes compressing the site removes (negative: it adds them)."""
        return self.saved_without - self.saved_with

    def warning(self, format_bytes) -> str | None:
        """A plain-words line when compressing the site removes no saved-activation bytes."""
        if self.removed > 0:
            return None
        if self.site in ROW_SLICE_SITES:
            return (
                f"warning: compressing {self.site} removes no saved activations: the fused "
                f"{ROW_SLICE_SITES[self.site]} keeps its exact input for its other rows; only "
                f"the {self.site} rows' weight gradient follows the method (as its paper does)"
            )
        if self.removed == 0:
            # e.g. full checkpointing: a block keeps only its input, whatever its sites do.
            what = "removes no saved activations: the block keeps nothing of its input here"
        else:
            what = (
                f"adds {format_bytes(-self.removed)} of saved activations per micro-batch: "
                f"its input is kept by a neighbouring op anyway, so its compressed copy is extra"
            )
        return (
            f"warning: compressing {self.site} {what} (leave {self.site} out of "
            f"compression.sites unless its model-state or flop saving is wanted)"
        )


def _without(compression: CompressionConfig, site: str) -> CompressionConfig:
    rest = tuple(s for s in compression.sites if s != site)
    if not rest:
        return compression.replace(method="none", grad_mode="lift")
    return compression.replace(sites=rest)


def _all_gather_bytes(
    model: ModelShape,
    compression: CompressionConfig,
    site: str,
    setting: ActivationSetting,
) -> int | None:
    """Bytes this rank contributes to ``site``'s backward all-gathers, summed over the blocks
    (``None`` without sequence parallelism: no all-gather in backward)."""
    if not setting.sp:
        return None
    t, e = setting.tensor_parallel, setting.dtype_bytes
    local_tokens = setting.tokens // t
    h = model.hidden_size
    width = _site_widths(model)[site][0]
    compressed = compression.method != "none" and site in compression.sites
    if site in _COLUMN_SITES:
        if compressed:
            c, basis = _site_width(site, compression, width, setting)
            shared = get_compressor_class(compression.method).basis_is_shared
            elements = local_tokens * c + (0 if shared else basis)
        else:
            norm = setting.storage.packer("norm")
            if isinstance(norm, LowRankStorage):
                k = norm.width(h)
                elements = local_tokens * k + h * k  # L of this rank's tokens, and Q
            else:
                elements = local_tokens * h  # X (dequantised under an 8-bit norm)
    else:
        # dY of this rank's tokens; a dense row-parallel Z rides in the same collective.
        elements = local_tokens * h
        if compressed and _site_layout(site, compression, width, setting)[1].partial_sum:
            elements += local_tokens * _site_width(site, compression, width, setting)[0]
    return model.num_layers * elements * e


def _weight_gradient_flops(
    model: ModelShape,
    compression: CompressionConfig,
    site: str,
    setting: ActivationSetting,
) -> float | None:
    """Matmul flops of ``site``'s weight gradient on this rank, summed over the blocks."""
    t, tokens = setting.tensor_parallel, setting.tokens
    n, m = _site_widths(model)[site]
    row = site not in _COLUMN_SITES
    n_local, m_local = (n // t, m) if row else (n, m // t)
    if compression.method == "none" or site not in compression.sites:
        return float(model.num_layers * 2 * tokens * m_local * n_local)
    if compression.method != "compact":
        return None
    r = _site_width(site, compression, n, setting)[0]
    projected_tokens = tokens // t if setting.sp and not row else tokens
    flops = 2.0 * projected_tokens * n_local * r + 2.0 * tokens * m_local * r
    if compression.grad_mode == "lift":
        flops += 2.0 * m_local * r * n_local
    return model.num_layers * flops


def site_effects(
    model: ModelShape,
    compression: CompressionConfig,
    setting: ActivationSetting,
    ac_mode: str = "none",
    ac_num_layers: int | None = None,
) -> list[SiteEffect]:
    """One :class:`SiteEffect` per compressed site, in the order of ``compression.sites``
    (empty when nothing is compressed). Arguments as
    :func:`~actcomp_dist.memory_model.predict_saved_activations`."""
    if compression.method == "none":
        return []
    with_all = predict_saved_activations(model, compression, setting, ac_mode, ac_num_layers)
    effects = []
    for site in compression.sites:
        without = _without(compression, site)
        saved_without = predict_saved_activations(model, without, setting, ac_mode, ac_num_layers)
        if site in ROW_SLICE_SITES:
            # A slice of a fused linear's rows: the linear keeps its exact input and runs the
            # exact weight-gradient GEMM either way (then projects the slice's rows), so its
            # all-gather is the exact one; its flops with the slice compressed are not modelled.
            linear, linear_compression = ROW_SLICE_SITES[site], without
            flops_with = None
        else:
            linear, linear_compression = site, compression
            flops_with = _weight_gradient_flops(model, compression, site, setting)
        effects.append(
            SiteEffect(
                site=site,
                saved_with=with_all.total,
                saved_without=saved_without.total,
                all_gather_with=_all_gather_bytes(model, linear_compression, linear, setting),
                all_gather_without=_all_gather_bytes(model, without, linear, setting),
                weight_gradient_flops_with=flops_with,
                weight_gradient_flops_without=_weight_gradient_flops(
                    model, without, linear, setting
                ),
            )
        )
    return effects


def describe_site_effects(effects: list[SiteEffect], format_bytes) -> list[str]:
    """One report line per site, then a plain-words warning for each site whose compression
    removes no saved-activation bytes (``format_bytes``: how byte counts are written)."""
    lines = []
    for effect in effects:
        change = "removes" if effect.removed >= 0 else "adds"
        parts = [
            f"compressing {effect.site}: saved activations "
            f"{format_bytes(effect.saved_without)} -> {format_bytes(effect.saved_with)} "
            f"({change} {format_bytes(abs(effect.removed))})"
        ]
        if effect.weight_gradient_flops_with is not None:
            ratio = effect.weight_gradient_flops_with / effect.weight_gradient_flops_without
            parts.append(f"weight-gradient flops {ratio:.2f}x of exact")
        if effect.all_gather_with is not None:
            parts.append(
                f"backward all-gather {format_bytes(effect.all_gather_without)} -> "
                f"{format_bytes(effect.all_gather_with)}"
            )
        lines.append(" | ".join(parts))
    lines += [w for w in (e.warning(format_bytes) for e in effects) if w is not None]
    return lines
