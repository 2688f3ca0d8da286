"""Fine-tune a LLaMA model: full (with compressed activations), LoRA or LoRI adapters.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_tiny_lori.json  # CPU too
    torchrun --nproc-per-node 2 launch/finetune.py --config configs/finetune_tiny_lora.json
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune_llama7b_lori.json \\
        --set train.lr=2e-4
    python launch/finetune.py --config configs/finetune_tiny_full_compact.json --set train.steps=20

The config is the pretraining one plus a ``finetune`` section, ``model.init_from`` and JSONL
``data.train`` / ``data.valid`` (see ``actcomp_dist.training.finetune_config``);
``--set key=value`` overrides one value. Every rank runs this file: load the config, build the
run (the pretraining recipe with the fine-tuning hooks), train it: the recipe is in
``actcomp_dist/cli/finetune.py`` (the same as the ``actcomp-finetune`` command). Exit status as
``launch/pretrain.py``'s: 0 done or preempted, 2 a user error, 3 stopped on a non-finite loss.
"""

import sys

from actcomp_dist.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
