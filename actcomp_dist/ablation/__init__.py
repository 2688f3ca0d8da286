"""Ablation of memory-saving methods: compression, activation checkpointing and both, trained
through the real training code and measured side by side (``tools/ablate.py``).

- :mod:`~actcomp_dist.ablation.variants`: the variant grammar (``compact:0.25+ac_full``, ...);
- :mod:`~actcomp_dist.ablation.orchestrate`: runs every variant and repeat (in this process, or
  on N ranks through the ``deepspeed`` launcher);
- :mod:`~actcomp_dist.ablation.runner`: one run — ``Trainer(config).train()`` and the extra
  measurements (saved bytes by layer kind, peak memory by category);
- :mod:`~actcomp_dist.ablation.report`: ``results.csv``, ``results.md`` and the pictures.
"""

from actcomp_dist.ablation.variants import (
    GRAMMAR,
    Variant,
    VariantError,
    parse_variant,
    parse_variants,
)

__all__ = ["GRAMMAR", "Variant", "VariantError", "parse_variant", "parse_variants"]
