"""The command-line tools, installed as console scripts (``setup.cfg``):

    actcomp-pretrain          launch/pretrain.py          pretraining (under deepspeed/torchrun)
    actcomp-finetune          launch/finetune.py          fine-tuning (full, LoRA, LoRI)
    actcomp-ablate            tools/ablate.py             compression vs activation checkpointing
    actcomp-memory-plan       tools/memory_plan.py        what fits, and the fastest policy that does
    actcomp-convert-hf        tools/convert_hf_llama.py   Hugging Face <-> TP shards, run -> HF
    actcomp-merge-adapters    tools/merge_adapters.py     adapters merged into a HF model
    actcomp-generate          tools/generate.py           a fine-tuned run's answers and accuracy
    actcomp-train-tokenizer   tools/train_tokenizer.py    a SentencePiece tokenizer
    actcomp-preprocess-data   tools/preprocess_data.py    text/JSONL -> indexed dataset

Each module has a ``main(argv=None)`` that returns the exit code; the scripts in ``launch/`` and
``tools/`` call the same functions, so the commands in the README work from a checkout too.
Under a multi-process launcher give the console script's path:
``deepspeed --num_gpus 8 $(which actcomp-pretrain) --config ...``.
"""
