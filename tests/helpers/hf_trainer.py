"""A real ``transformers.Trainer`` on a tiny patched model, for the schedule-callback tests.

The model is :func:`tests.helpers.hf_models.make_model` with ``exact`` and ``compact``
compression whose projections resample every 2 optimizer steps, so a resumed run whose
schedule restarted at 0 would draw other projections than the uninterrupted run.
"""

from __future__ import annotations

import torch

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf import apply_memory_policy
from tests.helpers.hf_models import VOCAB, make_model

COMPRESSION = CompressionConfig(method="compact", rank=0.25, resample_every=2, seed=7)


def token_dataset(rows: int = 24, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """``rows`` random sequences, each its own labels."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    return [{"input_ids": t, "labels": t} for t in tokens]


def make_trainer(output_dir, callbacks, max_steps=6, **overrides):
    """A CPU ``Trainer``: 2 rows per micro-batch, 2 micro-batches per optimizer step, a
    checkpoint every 3 steps, a loss logged every step. ``overrides``: more
    ``TrainingArguments`` (tests/integration/test_hf_trainer_deepspeed.py)."""
    import transformers

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
        model=model, args=args, train_dataset=token_dataset(), callbacks=callbacks
    )


def logged_losses(trainer) -> dict[int, float]:
    """The training losses the trainer logged, by optimizer step."""
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}
