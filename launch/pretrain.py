"""Pretrain a LLaMA model with compressed activations.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/llama1b_compact.json
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny_compact.json      # CPU too
    torchrun --nproc-per-node 2 launch/pretrain.py --config configs/tiny_compact.json
    sbatch launch/slurm/pretrain.sbatch configs/llama1b_compact.json                  # SLURM
    python launch/pretrain.py --config configs/tiny_compact.json --set train.steps=20

Everything a run does is in the config (see README "Config reference"); ``--set key=value``
overrides one value. Every rank runs the recipe in ``actcomp_dist/cli/pretrain.py`` (load
the config, build the run, train it; the same as the ``actcomp-pretrain`` command).
Exit status: 0 done or preempted (resume with ``--set checkpoint.resume=latest``), 2 a user
error (config, data, checkpoint: one line on every rank, before any collective, the run
directory untouched), 3 stopped on a non-finite loss or gradient norm.
"""

import sys

from actcomp_dist.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
