"""``train.export_hf``: the Hugging Face export a run writes when it finishes.

The trainer calls :func:`export_at_end` once, after the last step and the final checkpoint of a
run that reached ``train.steps`` (not after a preemption or a failure). The weights are the live
model's, gathered over the TP group one parameter at a time, in the parameters' dtype; under
ZeRO-3 every rank first gathers its whole (TP-local) model, as the adapters' merge reads
whole weights, so that must fit in one rank's memory; adapters of a LoRA / LoRI fine-tune are merged into the
weights they sit on (the export is the fine-tuned model; the adapter itself is in
``finetune.adapter_dir``). The tokenizer the run trained with, its special-token ids and a
``generation_config.json`` go along (:mod:`actcomp_dist.models.hf_tokenizer`). Rank 0 writes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

EXPORT_DIRECTORY = "hf"


def export_directory(config) -> Path | None:
    """Where ``train.export_hf`` puts the export: ``RUN_DIR/hf`` for ``true``, the path given,
    ``None`` when off."""
    target = config.train.export_hf
    if target is False or target is None:
        return None
    if target is True:
        return Path(config.run_dir) / EXPORT_DIRECTORY
    return Path(target)


def export_at_end(trainer) -> Path | None:
    """Collective: write the trained model of ``trainer`` as a Hugging Face LLaMA directory if
    ``train.export_hf`` asks for one; returns where (``None``: not asked)."""
    directory = export_directory(trainer.config)
    if directory is None:
        return None
    import deepspeed

    from actcomp_dist.adapters import adapter_names, export_merged_hf
    from actcomp_dist.models.hf import export_hf

    model = trainer.model
    dtype = next(model.parameters()).dtype
    tokenizer = trainer.tokenizer.model_path
    stage = trainer.config.deepspeed.get("zero_optimization", {}).get("stage", 0)
    # Under ZeRO-3 each rank holds a partition of every parameter: gather them for the export.
    gathered = (
        deepspeed.zero.GatheredParameters(list(model.parameters()))
        if stage == 3
        else contextlib.nullcontext()
    )
    with gathered:
        names = adapter_names(model)
        if names:
            export_merged_hf(model, directory, names, dtype=dtype, tokenizer=tokenizer)
        else:
            export_hf(model, directory, dtype=dtype, tokenizer=tokenizer)
    return directory
