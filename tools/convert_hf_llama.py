"""Convert LLaMA weights between a Hugging Face directory and our tensor-parallel shards.

    # Hugging Face (config.json + safetensors, sharded or not) -> per-TP-rank shards
    python tools/convert_hf_llama.py to-tp /models/llama-2-7b-hf /ckpt/llama7b_tp8 --tp 8

    # our shards, or a DeepSpeed checkpoint of a run (ZeRO 0-2), -> Hugging Face layout
    python tools/convert_hf_llama.py to-hf /ckpt/llama7b_tp8 /models/llama7b-out \
        --base /models/llama-2-7b-hf
    python tools/convert_hf_llama.py to-hf runs/x/checkpoints/step_0000100 out_hf \
        --model-config model.json --dtype bfloat16

A training run does not need ``to-tp``: the fine-tuning launcher loads a Hugging Face directory
directly, each rank reading only its own slices (:func:`actcomp_dist.models.hf.build_llama_from_hf`).
``to-tp`` pre-shards once for runs that restart often. Everything here runs on one CPU process
(no process group); the conversion is renaming, fusing and slicing, so HF -> TP -> HF gives
back the same bytes.

``--model-config`` (for DeepSpeed checkpoints): a JSON file with the
:class:`~actcomp_dist.models.LlamaConfig` fields of the trained model, or a ``trainer.json``
whose ``model_config`` entry holds them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from actcomp_dist.models import LlamaConfig, merge_shards
from actcomp_dist.models.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    TP_CONFIG_NAME,
    config_to_hf,
    read_deepspeed_shards,
    read_hf_config,
    read_hf_rank_state_dict,
    read_tp_shards,
    save_hf_checkpoint,
    write_tp_shards,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_tp(args: argparse.Namespace) -> None:
    config = read_hf_config(args.source, params_dtype=args.dtype)
    shards = []
    for rank in range(args.tp):
        shard = read_hf_rank_state_dict(args.source, config, rank, args.tp)
        shards.append({n: t.to(config.params_dtype) for n, t in shard.items()})
    write_tp_shards(args.output, config, shards)
    print(f"wrote {args.tp} shards of {args.source} to {args.output}")


def _model_config(path: Path) -> LlamaConfig:
    values = json.loads(path.read_text())
    return LlamaConfig.from_dict(values.get("model_config", values))


def to_hf(args: argparse.Namespace) -> None:
    source = Path(args.source)
    if (source / TP_CONFIG_NAME).is_file():
        config, shards = read_tp_shards(source)
    else:
        if args.model_config is None:
            trainer_json = next(iter(source.rglob("trainer.json")), None)
            if trainer_json is None:
                raise SystemExit(
                    f"{source} is not a to-tp directory; for a DeepSpeed checkpoint pass "
                    f"--model-config"
                )
            args.model_config = trainer_json
        config = _model_config(Path(args.model_config))
        shards = read_deepspeed_shards(source, config)
    dtype = _DTYPES[args.dtype] if args.dtype else config.params_dtype
    full = merge_shards(shards, config)
    base = None
    if args.base:
        base = json.loads((Path(args.base) / "config.json").read_text())
    save_hf_checkpoint(
        args.output,
        {name: t.to(dtype) for name, t in full.items()},
        config_to_hf(config, dtype=dtype, base=base),
        max_shard_bytes=args.max_shard_bytes,
    )
    print(f"wrote {source} ({len(shards)} TP shards) to {args.output} as Hugging Face LLaMA")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tp = commands.add_parser("to-tp", help="Hugging Face directory -> per-TP-rank shards")
    tp.add_argument("source", help="Hugging Face LLaMA directory")
    tp.add_argument("output")
    tp.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    tp.add_argument("--dtype", choices=sorted(_DTYPES), help="cast (default: the checkpoint's)")
    tp.set_defaults(run=to_tp)
    hf = commands.add_parser("to-hf", help="our shards or a DeepSpeed checkpoint -> Hugging Face")
    hf.add_argument("source", help="a to-tp directory or a DeepSpeed checkpoint directory")
    hf.add_argument("output")
    hf.add_argument("--model-config", help="LlamaConfig JSON (DeepSpeed checkpoints)")
    hf.add_argument("--base", help="Hugging Face directory whose other config fields to keep")
    hf.add_argument("--dtype", choices=sorted(_DTYPES), help="cast (default: the model's)")
    hf.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    hf.set_defaults(run=to_hf)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
