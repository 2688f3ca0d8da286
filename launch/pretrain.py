"""Pretrain a LLaMA model with compressed activations.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/llama1b_compact.json
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_compact.json      # CPU too
    torchrun --nproc-per-node 2 launch/pretrain.py --config configs/tiny_compact.json
    sbatch launch/slurm/pretrain.sbatch configs/llama1b_compact.json                  # SLURM
    python launch/pretrain.py --config configs/tiny_compact.json --set train.steps=20

Everything a run does is in the config (see README "Config reference"); ``--set key=value``
overrides one value. The recipe itself lives in ``actcomp_dist.training.trainer``.
"""

import sys

from actcomp_dist.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
