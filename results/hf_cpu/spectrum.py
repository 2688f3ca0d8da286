"""How low-rank a base's activations are on one fine-tuning batch (16 ``reverse_words`` rows, as
tools/hf_memory.py draws them for seed 0): per decoder layer, the share of the energy held by
the ``R`` largest singular values of each norm output, and the relative Frobenius error of
LoRAct's rank-``R`` factors (one column sample, seed 0) against the best rank-``R`` error, for
the two norm outputs, gate, up, and the down projection's input ``h = silu(gate) * up`` (from
the factors of gate and up, as "loract" recomputes it, and factorised itself).

    PYTHONPATH=. python results/hf_cpu/spectrum.py --base /tmp/pre4/hf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import tools.hf_memory as hm
from actcomp_dist.compression.lowrank import low_rank_factors


def factorised(a: torch.Tensor, k: int) -> torch.Tensor:
    a2 = a.reshape(-1, a.shape[-1])
    low, q = low_rank_factors(a2, k, torch.Generator().manual_seed(0))
    return (low @ q.t()).reshape(a.shape)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def best(a: torch.Tensor, k: int) -> tuple[float, float]:
    """(best rank-k relative error, energy share of the k largest singular values)."""
    energy = torch.linalg.svdvals(a.reshape(-1, a.shape[-1])).pow(2)
    return (energy[k:].sum() / energy.sum()).sqrt().item(), (energy[:k].sum() / energy.sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=None, help="default hidden // 8")
    cli = parser.parse_args()
    args = argparse.Namespace(base=cli.base, words=15, pool=4096, batch=16)
    args.pool_rows = hm.reverse_words_pool(args, seed=0)
    tokens, _ = hm.batch(args, torch.Generator().manual_seed(0))
    model = transformers.LlamaForCausalLM.from_pretrained(cli.base, dtype=torch.float32).eval()
    k = cli.rank or model.config.hidden_size // 8
    seen: dict[str, torch.Tensor] = {}

    def keep(name, which):
        def hook(module, inputs, output):
            seen[name] = (inputs[0] if which == "in" else output).detach()

        return hook

    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(keep(f"{i}.norm1", "out"))
        layer.post_attention_layernorm.register_forward_hook(keep(f"{i}.norm2", "out"))
        layer.mlp.gate_proj.register_forward_hook(keep(f"{i}.gate", "out"))
        layer.mlp.up_proj.register_forward_hook(keep(f"{i}.up", "out"))
        layer.mlp.down_proj.register_forward_hook(keep(f"{i}.h", "in"))
    with torch.no_grad():
        model(input_ids=tokens)
    print(f"{cli.base}: hidden {model.config.hidden_size}, R = {k}, {tokens.numel()} tokens")
    print("layer | tensor | energy in top R | LoRAct error | best rank-R error")
    for i in range(len(model.model.layers)):
        for name in ("norm1", "norm2", "gate", "up", "h"):
            a = seen[f"{i}.{name}"]
            error, energy = best(a, k)
            ours = relative_error(a, factorised(a, k))
            print(f"{i} | {name} | {energy:.4f} | {ours:.3f} | {error:.3f}")
        gate, up = seen[f"{i}.gate"], seen[f"{i}.up"]
        recomputed = F.silu(factorised(gate, k)) * factorised(up, k)
        print(f"{i} | h = silu(gate^) up^ | | {relative_error(seen[f'{i}.h'], recomputed):.3f} |")


if __name__ == "__main__":
    main()
