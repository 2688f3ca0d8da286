"""``actcomp_dist.hf.ScheduleCallback`` with a real ``transformers.Trainer`` (CPU, tiny model).

Reference: an uninterrupted run. The compressed projections resample every 2 optimizer steps,
so a resumed run whose schedule restarted at 0 would draw other projections from step 4 on;
with the callback, resuming from ``checkpoint-3`` gives the uninterrupted run's losses for
steps 4-6 (same weights, optimizer state, data order and projections: identical numbers).
Two micro-batches per optimizer step: the schedule advances once per step, not per micro-batch.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf import ScheduleCallback, apply_memory_policy
from actcomp_dist.layers import find_schedule
from tests.unit.test_hf_policy import VOCAB, make_model

transformers = pytest.importorskip("transformers")
COMPRESSION = CompressionConfig(method="compact", rank=0.25, resample_every=2, seed=7)


def _dataset(rows: int = 24, seq: int = 16):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    return [{"input_ids": t, "labels": t} for t in tokens]


def _trainer(output_dir, callbacks, max_steps=6, **overrides):
    """``overrides``: more ``TrainingArguments`` (tests/integration/test_hf_trainer_deepspeed.py)."""
    model = apply_memory_policy(make_model(), "exact", compression=COMPRESSION)
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=3,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args = transformers.TrainingArguments(**(kwargs | overrides))
    return transformers.Trainer(
        model=model, args=args, train_dataset=_dataset(), callbacks=callbacks
    )


def _losses(trainer):
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


def test_resume_from_trainer_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    full = _trainer(tmp_path / "full", [ScheduleCallback()])
    full.train()
    expected = _losses(full)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert find_schedule(full.model).step == 6  # once per optimizer step, not per micro-batch
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "actcomp_schedule.json").is_file()

    resumed = _trainer(tmp_path / "full", [ScheduleCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    losses = _losses(resumed)
    assert {s: losses[s] for s in (4, 5, 6)} == {s: expected[s] for s in (4, 5, 6)}

    # Without the callback the resumed run draws other projections at step 4, so its update
    # (hence the loss of step 5: the projection changes gradients, not forward) differs.
    unscheduled = _trainer(tmp_path / "full", [])
    unscheduled.train(resume_from_checkpoint=str(checkpoint))
    assert _losses(unscheduled)[5] != expected[5]
