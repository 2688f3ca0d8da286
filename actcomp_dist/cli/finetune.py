"""``actcomp-finetune`` and ``launch/finetune.py``: the fine-tuning recipe, top to bottom.

The pretraining recipe (:mod:`actcomp_dist.cli.pretrain`) with the fine-tuning hooks of
:class:`~actcomp_dist.training.finetune.FinetuneTrainer`; exit status as pretraining's.
"""

from __future__ import annotations

import sys

from actcomp_dist.training.cli import exit_status, parse_args
from actcomp_dist.training.config import load_run_config
from actcomp_dist.training.finetune_config import FinetuneRunConfig
from actcomp_dist.training.quiet import quiet_third_party

DESCRIPTION = "Fine-tune a LLaMA model (full + compressed activations, LoRA, LoRI)."


def finetune(argv: list[str] | None = None):
    """Fine-tune as the command line (``argv``, default ``sys.argv``) says; every rank runs it.
    Returns the TrainResult."""
    args = parse_args(argv, description=DESCRIPTION)
    # 1. The config: the file, then --deepspeed_config, then each --set override.
    config = load_run_config(
        args.config,
        args.overrides,
        config_class=FinetuneRunConfig,
        deepspeed_file=args.deepspeed_config,
    )
    # megatron-core and DeepSpeed print at import: the filters go first, then the trainer.
    quiet_third_party(config.logging.verbose)
    from actcomp_dist.training.finetune import FinetuneTrainer

    # 2. The run: the pretraining recipe (training/trainer.py) with the fine-tuning hooks:
    #    JSONL data, Hugging Face or random init, LoRA / LoRI adapters, adapter saving.
    trainer = FinetuneTrainer(config)
    # 3. Train.
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    """``actcomp-finetune`` / ``launch/finetune.py``: :func:`finetune` under the launchers'
    error contract (:func:`~actcomp_dist.training.cli.exit_status`); returns the exit status."""
    return exit_status(lambda: finetune(argv))


if __name__ == "__main__":
    sys.exit(main())
