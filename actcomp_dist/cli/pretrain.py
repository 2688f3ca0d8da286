"""``actcomp-pretrain`` and ``launch/pretrain.py``: the pretraining recipe, top to bottom.

Every rank runs :func:`pretrain`: load the config, build the run, train it. Exit status: 0 done
or preempted (resume with ``--set checkpoint.resume=latest``), 2 a user error (config, data,
checkpoint: one line on every rank, before any collective, the run directory untouched), 3
stopped on a non-finite loss or gradient norm, 4 a rank stopped progressing, 5 the ranks
disagree on projection seeds.
"""

from __future__ import annotations

import sys

from actcomp_dist.training.cli import (
    PRETRAIN_DESCRIPTION,
    exit_status,
    load_config,
    parse_args,
)


def _pretraining_trainer(config):
    # megatron-core and DeepSpeed print at import: the trainer module loads after the filters.
    from actcomp_dist.training.trainer import Trainer

    return Trainer(config)


def pretrain(
    argv: list[str] | None = None,
    *,
    config_class: type | None = None,
    build_trainer=_pretraining_trainer,
    description: str = PRETRAIN_DESCRIPTION,
):
    """Pretrain as the command line (``argv``, default ``sys.argv``) says; every rank runs it.
    Returns the TrainResult. Fine-tuning runs the same recipe with its config class and
    trainer (:mod:`actcomp_dist.cli.finetune`)."""
    args = parse_args(argv, description)
    # 1. The config: the file, then --deepspeed_config, then each --set override. Plugins
    #    (the config's "plugins" list) are imported first, so their methods validate. Then the
    #    log filters: megatron-core and DeepSpeed print at import, the trainer comes after.
    config = load_config(args, config_class)
    # 2. The run, in a fixed order (actcomp_dist/training/trainer.py): validate -> resume
    #    checks -> process group -> parallel state, seeds -> data -> model (compression,
    #    memory policy, activation checkpointing) -> DeepSpeed engine -> resume -> run dir.
    trainer = build_trainer(config)
    # 3. Train: one optimizer step at a time (training/step.py), logging, evaluation,
    #    checkpoints, until train.steps or a preemption (which saves first).
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    """``actcomp-pretrain`` / ``launch/pretrain.py``: :func:`pretrain` under the launchers'
    error contract (:func:`~actcomp_dist.training.cli.exit_status`); returns the exit status."""
    return exit_status(lambda: pretrain(argv))


if __name__ == "__main__":
    sys.exit(main())
