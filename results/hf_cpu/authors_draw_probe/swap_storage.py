"""The probe behind results/hf_cpu/authors_draw_probe (run at commit 8a73f80, before the
per-call draw was the library's): tools/hf_memory.py with the LoRAct storages of "loract"
swapped after apply_memory_policy for the authors' column draw (``+percall``: fresh per call
from the global CPU generator, what actcomp_dist.hf does since) and / or one power iteration
(``+pi1``: ``niter=1``, the MeftTrainer docstring's example).

    for s in 0 1 2; do PYTHONPATH=.:results/hf_cpu/authors_draw_probe OMP_NUM_THREADS=1 \
        python results/hf_cpu/authors_draw_probe/swap_storage.py --base /tmp/pre4/hf \
        --words 15 --batch 16 --steps 200 --lr-lora 2e-3 --seeds $s \
        --variants lora lora+loract+percall lora+loract+pi1 --out /tmp/auth/s$s & done; wait
"""

import sys

import torch

import tools.hf_memory as hm
from actcomp_dist.compression.lowrank import low_rank_factors
from actcomp_dist.storage import LowRankStorage


class Authors(LowRankStorage):
    def __init__(self, rank, per_call, niter):
        super().__init__(rank)
        self.per_call, self.niter = per_call, niter

    def pack(self, x):
        n = x.shape[-1]
        a = x.detach().reshape(-1, n)
        gen = torch.default_generator if self.per_call else torch.Generator().manual_seed(self.seed)
        return low_rank_factors(a, self.width(n), gen, "sampled", 0, self.niter)


SWAPS = {"+percall": (True, 0), "+pi1": (False, 1), "+percall+pi1": (True, 1)}
for base in ("lora+loract", "lora+loract_norm", "lora+loract_swiglu"):
    for suffix in SWAPS:
        hm.VARIANTS[base + suffix] = hm.VARIANTS[base]

orig_init = hm.Variant.__init__


def init(self, name, args, seed):
    orig_init(self, name, args, seed)
    for suffix, (per_call, niter) in SWAPS.items():
        if name.endswith(suffix):
            for m in self.model.modules():
                for attr in ("_actcomp_norm", "_actcomp_swiglu"):
                    s = getattr(m, attr, None)
                    if isinstance(s, LowRankStorage):
                        setattr(m, attr, Authors(s.rank, per_call, niter))


hm.Variant.__init__ = init
if __name__ == "__main__":
    hm.main(sys.argv[1:])
