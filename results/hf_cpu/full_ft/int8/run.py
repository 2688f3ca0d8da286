"""tools/hf_memory.py with one more full fine-tuning variant, ``full+int8``: ``"exact"`` with
attention's q, k, v and the SwiGLU's gate and up kept in int8 (per-group absmax; SDPA re-run in
backward), the policy dict of ``apply_memory_policy``. Every argument is the tool's.

    for s in 0 1 2; do PYTHONPATH=. OMP_NUM_THREADS=1 python results/hf_cpu/full_ft/int8/run.py \
        --base /tmp/pre4/hf --words 15 --batch 16 --steps 200 --lr-full 1e-3 --seeds $s \
        --variants full full+int8 --out /tmp/hf_full_int8/s$s & done; wait
    python results/hf_cpu/full_ft/int8/run.py --merge /tmp/hf_full_int8/s{0,1,2}/results.json \
        --out results/hf_cpu/full_ft/int8
"""

from __future__ import annotations

import tools.hf_memory as hf_memory

hf_memory.VARIANTS["full+int8"] = ("full", False, {"attention": "int8", "swiglu": "int8"}, None)

if __name__ == "__main__":
    hf_memory.main()
