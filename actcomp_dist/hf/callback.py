"""``ScheduleCallback``: the projection schedule under the Hugging Face ``Trainer``.

Compressed layers (``compression=`` of :func:`~actcomp_dist.hf.apply_memory_policy`, or
:func:`~actcomp_dist.layers.compress_linears`) draw their projections from a
:class:`~actcomp_dist.seeds.CompressionSchedule` that must advance once per optimizer step (all
micro-batches of a step share one projection). The callback advances it at the end of every
optimizer step (``on_step_end``, which the Trainer calls once per optimizer step after
gradient accumulation, also under its DeepSpeed integration: tested with ZeRO stage 2 in
tests/integration/test_hf_trainer_deepspeed.py), writes it into each checkpoint the Trainer saves
(``checkpoint-N/actcomp_schedule.json``) and, when training resumes from ``checkpoint-N``,
reads it back from ``args.output_dir/checkpoint-N``, so a resumed run draws the projections
of an uninterrupted one (resuming from a checkpoint saved without the callback raises).
"""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from actcomp_dist.layers import find_schedule
from actcomp_dist.seeds import CompressionSchedule

SCHEDULE_FILE = "actcomp_schedule.json"


class ScheduleCallback(TrainerCallback):
    """Advance, save and restore ``schedule`` (default: the one of the Trainer's model)."""

    def __init__(self, schedule: CompressionSchedule | None = None) -> None:
        self.schedule = schedule

    def _find(self, model) -> CompressionSchedule | None:
        if self.schedule is None and model is not None:
            self.schedule = find_schedule(model)
        return self.schedule

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        schedule = self._find(model)
        if schedule is None:
            raise ValueError(
                "ScheduleCallback: the model has no compressed layer (no CompressionSchedule); "
                "apply compression first or pass ScheduleCallback(schedule)"
            )
        if state.global_step > 0:  # resuming: the Trainer restored global_step
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", SCHEDULE_FILE)
            if not os.path.isfile(path):
                raise ValueError(
                    f"ScheduleCallback: resuming at step {state.global_step} but {path} is "
                    "missing (a checkpoint saved without ScheduleCallback)"
                )
            with open(path) as f:
                schedule.load_state_dict(json.load(f))

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.advance()

    def on_save(self, args, state, control, **kwargs):
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(directory):
            with open(os.path.join(directory, SCHEDULE_FILE), "w") as f:
                json.dump(self.schedule.state_dict(), f)
