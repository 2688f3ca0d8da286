"""Pretrain a LLaMA model with compressed activations.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/llama1b_compact.json
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_compact.json      # CPU too
    torchrun --nproc-per-node 2 launch/pretrain.py --config configs/tiny_compact.json
    sbatch launch/slurm/pretrain.sbatch configs/llama1b_compact.json                  # SLURM
    python launch/pretrain.py --config configs/tiny_compact.json --set train.steps=20

Everything a run does is in the config (see README "Config reference"); ``--set key=value``
overrides one value. Every rank runs this file: load the config, build the run, train it.
Exit status: 0 done or preempted (resume with ``--set checkpoint.resume=latest``), 2 a user
error (config, data, checkpoint: one line on every rank, before any collective, the run
directory untouched), 3 stopped on a non-finite loss or gradient norm.
"""

import sys

from actcomp_dist.training.cli import exit_status, parse_args
from actcomp_dist.training.config import load_run_config
from actcomp_dist.training.quiet import quiet_third_party


def pretrain():
    """Pretrain as the command line says; every rank runs it. Returns the TrainResult."""
    args = parse_args()
    # 1. The config: the file, then --deepspeed_config, then each --set override. Plugins
    #    (the config's "plugins" list) are imported first, so their methods validate.
    config = load_run_config(args.config, args.overrides, deepspeed_file=args.deepspeed_config)
    # megatron-core and DeepSpeed print at import: the filters go first, then the trainer.
    quiet_third_party(config.logging.verbose)
    from actcomp_dist.training.trainer import Trainer

    # 2. The run, in a fixed order (actcomp_dist/training/trainer.py): validate -> resume
    #    checks -> process group -> parallel state, seeds -> data -> model (compression,
    #    memory policy, activation checkpointing) -> DeepSpeed engine -> resume -> run dir.
    trainer = Trainer(config)
    # 3. Train: one optimizer step at a time (training/step.py), logging, evaluation,
    #    checkpoints, until train.steps or a preemption (which saves first).
    try:
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(exit_status(pretrain))
