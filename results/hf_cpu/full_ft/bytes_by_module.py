"""Saved bytes of tools/hf_memory.py's full fine-tuning variants by module, on the batch the
tool measures (the first ``--batch`` held-out rows: a view of the 4096-row held-out tensor) and
on a copy of it (what a training step passes: a fresh ``[batch, seq]`` tensor).

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/hf_cpu/full_ft/bytes_by_module.py \
        --base /tmp/hf2/pre4/hf > results/hf_cpu/full_ft/bytes_by_module.txt

The trained embedding keeps its input ids for backward; ``saved_activation_bytes`` counts the
storage a saved tensor lives in, so on the view it counts the whole held-out id tensor
(``4096 x 32`` int64 = 1 MiB) where the batch's ids are 4 KiB.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import tools.hf_memory as hf_memory
from actcomp_dist.memory import group_bytes, saved_activation_bytes_by_module

VARIANTS = ("full", "full+exact", "full+exact+compact", "full+loract")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--words", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    args.pool, args.heldout_rows, args.rank = 4096, 256, 8
    args.lr_lora, args.lr_full, args.loss_chunk_tokens = 2e-3, 1e-3, 1024
    args.pool_rows = hf_memory.reverse_words_pool(args, seed=0)
    tokens, labels = hf_memory.held_out_rows(args)
    view = tokens[: args.batch], labels[: args.batch]
    copy = view[0].clone(), view[1].clone()
    for name in VARIANTS:
        variant = hf_memory.Variant(name, args, 0)
        for what, batch in (("tool's batch (view)", view), ("copied batch", copy)):
            by_module = saved_activation_bytes_by_module(
                variant.model, lambda v=variant, b=batch: v.loss(*b)
            )
            kinds = group_bytes(by_module, lambda n: re.sub(r"layers\.\d+\.", "layers.*.", n))
            total = sum(kinds.values())
            print(f"{name}, {what}: {total} bytes = {total / 2**20:.3f} MiB")
            for kind, nbytes in sorted(kinds.items(), key=lambda kv: -kv[1]):
                print(f"    {kind or '(no submodule: the loss)':45s} {nbytes / 2**20:7.3f}")


if __name__ == "__main__":
    main()
