"""``actcomp-finetune`` and ``launch/finetune.py``: the fine-tuning recipe, top to bottom.

The pretraining recipe (:mod:`actcomp_dist.cli.pretrain`) with the fine-tuning hooks of
:class:`~actcomp_dist.training.finetune.FinetuneTrainer`; exit status as pretraining's.
"""

from __future__ import annotations

import sys

from actcomp_dist.cli.pretrain import pretrain
from actcomp_dist.training.cli import exit_status
from actcomp_dist.training.finetune_config import FinetuneRunConfig

DESCRIPTION = "Fine-tune a LLaMA model (full + compressed activations, LoRA, LoRI)."


class _Preempted:
    """Stands in for the trainer when the LoRI-S calibration run was preempted: the command
    ends there (exit 0) and the same command resumes the calibration."""

    def __init__(self, result) -> None:
        self.result = result

    def train(self):
        return self.result

    def close(self) -> None:
        pass


def _finetuning_trainer(config):
    # The pretraining recipe's trainer with the fine-tuning hooks: JSONL data, Hugging Face or
    # random init, LoRA / LoRI adapters, adapter saving. Loaded after the message filters.
    # LoRI-S with finetune.mask.calibration_steps trains its dense calibration adapter first.
    from actcomp_dist.training.finetune import FinetuneTrainer, calibrate

    calibrated = calibrate(config)
    if calibrated is not None and calibrated.preempted:
        return _Preempted(calibrated)
    return FinetuneTrainer(config)


def finetune(argv: list[str] | None = None):
    """Fine-tune as the command line (``argv``, default ``sys.argv``) says: the pretraining
    recipe (:func:`actcomp_dist.cli.pretrain.pretrain`) with the fine-tuning config and trainer.
    Returns the TrainResult."""
    return pretrain(
        argv,
        config_class=FinetuneRunConfig,
        build_trainer=_finetuning_trainer,
        description=DESCRIPTION,
    )


def main(argv: list[str] | None = None) -> int:
    """``actcomp-finetune`` / ``launch/finetune.py``: :func:`finetune` under the launchers'
    error contract (:func:`~actcomp_dist.training.cli.exit_status`); returns the exit status."""
    return exit_status(lambda: finetune(argv))


if __name__ == "__main__":
    sys.exit(main())
