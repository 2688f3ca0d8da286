"""Per-step training losses of ``lora+loract-layer`` (tools/hf_memory.py's variant, batches and
seed handling) with transformers' loss (``--loss-chunk-tokens 0``, what the previous session's
run used) and with the fused loss (``loss_chunk_tokens=1024``, the default since): where the two
runs part.

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/hf_cpu/layer_mode_loss/trace.py \
        --base /tmp/hf2/pre4/hf --seed 0 --out results/hf_cpu/layer_mode_loss/seed0.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import tools.hf_memory as hf_memory

VARIANT = "lora+loract-layer"


def losses(args, chunk_tokens: int, seed: int) -> list[float]:
    args.loss_chunk_tokens = chunk_tokens
    variant = hf_memory.Variant(VARIANT, args, seed)
    data = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        variant.step(*hf_memory.batch(args, data))
    return variant.losses


def first_step_apart(a: list[float], b: list[float], by: float) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if abs(x - y) > by), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.words, args.batch, args.pool, args.rank = 15, 16, 4096, 8
    args.lr_lora, args.lr_full = 2e-3, 1e-3
    args.pool_rows = hf_memory.reverse_words_pool(args, seed=0)
    runs = {"hf_loss": losses(args, 0, args.seed), "fused_loss": losses(args, 1024, args.seed)}
    a, b = runs["hf_loss"], runs["fused_loss"]
    summary = {
        "seed": args.seed,
        "last20_mean": {name: statistics.fmean(run[-20:]) for name, run in runs.items()},
        "last_step": {name: run[-1] for name, run in runs.items()},
        "first_step_loss_difference": a[0] - b[0],
        "first_step_apart_by": {
            str(by): first_step_apart(a, b, by) for by in (1e-5, 1e-4, 1e-3, 1e-2)
        },
        "max_abs_difference_last20": max(abs(x - y) for x, y in zip(a[-20:], b[-20:], strict=True)),
    }
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "losses": runs}))


if __name__ == "__main__":
    main()
