"""Fine-tune a LLaMA model: full (with compressed activations), LoRA or LoRI adapters.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_tiny_lori.json  # CPU too
    torchrun --nproc-per-node 2 launch/finetune.py --config configs/finetune_tiny_lora.json
    deepspeed --num_gpus 8 launch/finetune.py --config configs/finetune_llama7b_lori.json \\
        --set train.lr=2e-4
    python launch/finetune.py --config configs/finetune_tiny_full_compact.json --set train.steps=20

The config is the pretraining one plus a ``finetune`` section, ``model.init_from`` and JSONL
``data.train`` / ``data.valid`` (see ``actcomp_dist.training.finetune_config``);
``--set key=value`` overrides one value. Every rank runs this file: load the config, build the
run (the pretraining recipe with the fine-tuning hooks), train it. Exit status as
``launch/pretrain.py``'s: 0 done or preempted, 2 a user error, 3 stopped on a non-finite loss.
"""

import sys

from actcomp_dist.training.cli import exit_status, parse_args
from actcomp_dist.training.config import load_run_config
from actcomp_dist.training.finetune_config import FinetuneRunConfig
from actcomp_dist.training.quiet import quiet_third_party

DESCRIPTION = "Fine-tune a LLaMA model (full + compressed activations, LoRA, LoRI)."


def finetune():
    """Fine-tune as the command line says; every rank runs it. Returns the TrainResult."""
    args = parse_args(description=DESCRIPTION)
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


if __name__ == "__main__":
    sys.exit(exit_status(finetune))
