"""``actcomp_dist.hf.ScheduleCallback`` with a real ``transformers.Trainer`` (CPU, tiny model).

Reference: an uninterrupted run. The compressed projections resample every 2 optimizer steps,
so a resumed run whose schedule restarted at 0 would draw other projections from step 4 on;
with the callback, resuming from ``checkpoint-3`` gives the uninterrupted run's losses for
steps 4-6 (same weights, optimizer state, data order and projections: identical numbers).
Two micro-batches per optimizer step: the schedule advances once per step, not per micro-batch.
"""

from __future__ import annotations

import pytest

from actcomp_dist.hf import ScheduleCallback
from actcomp_dist.layers import find_schedule
from tests.helpers.hf_trainer import logged_losses, make_trainer

pytest.importorskip("transformers")


def test_resume_from_trainer_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    full = make_trainer(tmp_path / "full", [ScheduleCallback()])
    full.train()
    expected = logged_losses(full)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert find_schedule(full.model).step == 6  # once per optimizer step, not per micro-batch
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "actcomp_schedule.json").is_file()

    resumed = make_trainer(tmp_path / "full", [ScheduleCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    losses = logged_losses(resumed)
    assert {s: losses[s] for s in (4, 5, 6)} == {s: expected[s] for s in (4, 5, 6)}

    # Without the callback the resumed run draws other projections at step 4, so its update
    # (hence the loss of step 5: the projection changes gradients, not forward) differs.
    unscheduled = make_trainer(tmp_path / "full", [])
    unscheduled.train(resume_from_checkpoint=str(checkpoint))
    assert logged_losses(unscheduled)[5] != expected[5]
