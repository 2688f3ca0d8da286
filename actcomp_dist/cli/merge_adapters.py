r"""Merge saved adapters into a Hugging Face LLaMA and write the merged model.

    python tools/merge_adapters.py --base /models/llama-2-7b-hf --adapter runs/ft/adapter \
        --out /models/llama-2-7b-ft
    python tools/merge_adapters.py --base hf_base --adapter task1 --adapter task2 \
        --weight 0.5 --weight 0.5 --out hf_merged --dtype bfloat16     # LoRI multi-task merge

Each ``--adapter`` is a directory written by fine-tuning (``finetune.adapter_dir``) or by
:func:`actcomp_dist.adapters.save_adapter`; several are merged by concatenation (LoRI's
multi-task merge), each scaled by its ``--weight`` (default 1). The output carries the base
directory's tokenizer and generation files. One CPU process; the same adapters also load
unmerged with ``peft.PeftModel.from_pretrained(base_model, ADAPTER_DIR)``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--base", required=True, help="Hugging Face LLaMA directory")
    parser.add_argument("--adapter", action="append", required=True, help="saved adapter dir")
    parser.add_argument("--weight", action="append", type=float, help="one per --adapter")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    parser.add_argument("--dtype", choices=_DTYPES, help="default: the base model's")
    return parser.parse_args(argv)


def merge(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from actcomp_dist.adapters import export_merged_hf, load_adapter, read_adapter_config
    from actcomp_dist.models.hf import build_llama_from_hf
    from actcomp_dist.parallel import state

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ValueError(f"{len(args.adapter)} --adapter but {len(weights)} --weight")
    for directory in args.adapter:
        read_adapter_config(directory)  # a clear error before the model is built
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group(
            "gloo", init_method=f"file://{Path(scratch) / 'store'}", rank=0, world_size=1
        )
        try:
            state.initialize_model_parallel(1)
            model = build_llama_from_hf(args.base, device="cpu")
            names = [
                load_adapter(model, directory, name=f"adapter{i}")
                for i, directory in enumerate(args.adapter)
            ]
            export_merged_hf(
                model,
                args.out,
                names,
                dict(zip(names, weights, strict=True)),
                base_directory=args.base,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
            )
        finally:
            if state.is_initialized():
                state.destroy()
            dist.destroy_process_group()
    print(f"merged {len(names)} adapter(s) into {args.base} -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        merge(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
