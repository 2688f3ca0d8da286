"""Fine-tune a LLaMA model: full (with compressed activations), LoRA or LoRI adapters.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_tiny_lori.json  # CPU too
    torchrun --nproc-per-node 2 launch/finetune.py --config configs/finetune_tiny_lora.json
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune_llama7b_lori.json \\
        --set train.lr=2e-4
    python launch/finetune.py --config configs/finetune_tiny_full_compact.json --set train.steps=20

The config is the pretraining one plus a ``finetune`` section, ``model.init_from`` and JSONL
``data.train`` / ``data.valid`` (see ``actcomp_dist.training.finetune``); ``--set key=value``
overrides one value.
"""

import sys

from actcomp_dist.training.cli import main
from actcomp_dist.training.finetune import FinetuneRunConfig, run_finetuning

if __name__ == "__main__":
    sys.exit(
        main(
            config_class=FinetuneRunConfig,
            run=run_finetuning,
            description="Fine-tune a LLaMA model (full + compressed activations, LoRA, LoRI).",
        )
    )
