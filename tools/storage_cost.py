r"""What each 8-bit storage policy removes (bytes per block) and what it adds (time), per kind,
and the step-time ratio of policy mixes measured in alternating steps.

    python tools/storage_cost.py --model tiny --micro-batch 4 --seq-length 128
    python tools/storage_cost.py --model 60m --layers 2 --micro-batch 4 --seq-length 128 \
        --mixes int8@norm/swiglu,int8,int8@norm/attention/swiglu --dtype bf16

One process (gloo, TP = 1), the memory-efficient block.

**Per kind** (``norm``, ``attention``, ``swiglu``; ``--policy int8`` or ``fp8``): the bytes one
decoder block keeps less per micro-batch (the analytic memory model,
:mod:`actcomp_dist.memory_model`, exact to the byte) and the work the policy adds per block and
micro-batch, timed on tensors of the block's shapes: ``norm`` packs each of the two norm
outputs and unpacks it twice (the norm's backward and the next linear's weight gradient);
``swiglu`` packs ``[gate | up]`` and unpacks it once; ``attention`` packs q, k, v and the
attention output and unpacks all four, the output twice (the attention's backward from the
stored output and log-sum-exp, and proj's weight gradient). Where the attention runs the
SDPA forward again instead (off the CPU flash kernel; see
:func:`~actcomp_dist.storage.stores_attention_output`) it unpacks the output once and times
that forward too (its split is printed). Time is this process's CPU time (``time.process_time``: on a CPU shared with other
jobs the wall time also counts their share of the cores), the median of ``--repeats`` rounds in
which every kind's work runs once, in turn.

**Mixes** (``--mixes``, variants of ``tools/ablate.py`` without compression: ``int8``,
``int8@norm/swiglu``, ``ac_selective``, ...): one model per mix and one for ``none`` from the same
initialisation take alternating training steps (forward, backward, AdamW) on the same batch,
the order reversed every round, so drift of a shared machine hits all alike; the report gives
each mix's per-round CPU-time ratio to ``none``'s step of the same round, as median and
quartiles. This leaves out what the trainer adds to every variant alike (DeepSpeed, the data
loader, logging), so the ratios here are upper bounds of the trainer's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from actcomp_dist.cli.single_process import (
    add_model_shape_arguments,
    model_config_from_args,
    one_rank_world,
)

KINDS = ("norm", "attention", "swiglu")


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _kind_work(config, policy: str, tokens: int, batch: int, dtype: torch.dtype):
    """Per kind: a callable running the work the 8-bit policy adds to one block and
    micro-batch (see the module doc), on random tensors of the block's shapes."""
    from actcomp_dist.storage import storage_for, stores_attention_output

    packer = storage_for(policy)
    seq = tokens // batch
    h, f = config.hidden_size, config.ffn_hidden_size
    heads, groups, d = config.num_attention_heads, config.query_groups, config.head_dim
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    y = randn(seq, batch, h)
    gate_up = randn(seq, batch, 2 * f)
    q, k, v = (
        randn(batch, heads, seq, d),
        randn(batch, groups, seq, d),
        randn(batch, groups, seq, d),
    )
    out = randn(seq, batch, heads * d)

    def round_trip(x, unpacks: int = 1):
        packed = packer.pack(x)
        for _ in range(unpacks):
            packer.unpack(packed, x)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups != heads)

    # On the CPU flash kernel the attention keeps its packed output and the log-sum-exp:
    # no SDPA forward again, the output unpacked twice (the attention's backward, proj's).
    keeps_output = stores_attention_output(q, k, v, groups != heads, packer)

    def attention_packing():
        for t in (q, k, v):
            round_trip(t)
        round_trip(out, unpacks=2 if keeps_output else 1)

    if keeps_output:
        return {
            "norm": lambda: [round_trip(y, unpacks=2) for _ in range(2)],
            "attention": attention_packing,
            "swiglu": lambda: round_trip(gate_up),
        }
    return {
        "norm": lambda: [round_trip(y, unpacks=2) for _ in range(2)],
        "attention": lambda: (attention_packing(), sdpa()),
        "swiglu": lambda: round_trip(gate_up),
        # The attention's two parts, reported beside it.
        "attention: packing": attention_packing,
        "attention: SDPA again": sdpa,
    }


def _bytes_removed(config, policy: str, batch: int, seq: int, dtype_bytes: int) -> dict:
    from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
    from actcomp_dist.storage import StoragePolicy

    def per_block(storage: StoragePolicy) -> int:
        setting = ActivationSetting(batch, seq, dtype_bytes=dtype_bytes, storage=storage)
        # The last block: the first also holds the rotary tables.
        return predict_saved_activations(config, None, setting).per_layer[-1]

    keep = per_block(StoragePolicy())
    removed = {kind: keep - per_block(StoragePolicy.from_mapping({kind: policy})) for kind in KINDS}
    return {"keep": keep, **removed}


def _alternating_ratios(config, mixes, batch, seq, dtype, rounds: int) -> dict:
    from actcomp_dist.ablation import parse_variant
    from actcomp_dist.models import build_llama
    from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing

    models, optimizers = {}, {}
    for name in ("none", *mixes):
        variant = parse_variant(name)
        storage = variant.storage_policy({})
        model = build_llama(config, storage_policy=storage, init_seed=0).to(dtype)
        apply_activation_checkpointing(model, variant.ac_mode, None)
        models[name] = model
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    data = (tokens, torch.roll(tokens, -1, 1), torch.ones(batch, seq))

    def step(name):
        models[name].loss(*data).mean().backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    names = list(models)
    times = {name: [] for name in names}
    for index in range(rounds + 2):
        for name in names if index % 2 == 0 else names[::-1]:
            elapsed = _cpu(lambda name=name: step(name))
            if index >= 2:  # warm-up: allocator, Adam state
                times[name].append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--policy", choices=("int8", "fp8"), default="int8")
    parser.add_argument("--repeats", type=int, default=50, help="rounds of the per-kind timing")
    parser.add_argument("--mixes", default="", help="comma-separated storage variants")
    parser.add_argument("--rounds", type=int, default=20, help="alternating steps per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with one_rank_world():
        _report(args)
    return 0


def _report(args) -> None:
    config = model_config_from_args(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    batch, seq = args.micro_batch, args.seq_length
    print(
        f"{args.model} ({config.num_layers} layers), {args.dtype}, micro-batch {batch} x {seq}, "
        f"policy {args.policy}"
    )

    removed = _bytes_removed(config, args.policy, batch, seq, 4 if dtype == torch.float32 else 2)
    work = _kind_work(config, args.policy, batch * seq, batch, dtype)
    times = {name: [] for name in work}
    for _ in range(args.repeats):
        for name, fn in work.items():
            times[name].append(_cpu(fn))
    print(f"\nper block and micro-batch (`none` keeps {removed['keep']:,} B per block):\n")
    print("| kind | bytes removed | x block | time added (CPU, median) | bytes per us |")
    print("|---|---:|---:|---:|---:|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        kind = name.partition(":")[0]
        if name in KINDS:
            gone = removed[kind]
            print(
                f"| {name} | {gone:,} | {gone / removed['keep']:.3f} | {seconds * 1e6:.0f} us | "
                f"{gone / (seconds * 1e6):,.0f} |"
            )
        else:
            print(f"| ({name}) | | | {seconds * 1e6:.0f} us | |")

    mixes = [m for m in args.mixes.split(",") if m]
    if mixes:
        steps = _alternating_ratios(config, mixes, batch, seq, dtype, args.rounds)
        # Ratios per round against none and, where it is a mix, ac_selective (the exact
        # baseline's cheapest recompute).
        references = [r for r in ("none", "ac_selective") if r in steps]
        print(f"\nalternating training steps ({args.rounds} rounds), CPU time per step:\n")
        print(
            "| mix | step (CPU, median) | "
            + " | ".join(f"x {r}: median [quartiles]" for r in references)
            + " |"
        )
        print("|---|---:|" + "---:|" * len(references))
        for name, samples in steps.items():
            cells = []
            for reference in references:
                ratios = [t / r for t, r in zip(samples, steps[reference], strict=True)]
                low, _, high = statistics.quantiles(ratios, n=4)
                cells.append(f"{statistics.median(ratios):.3f} [{low:.3f}-{high:.3f}]")
            print(f"| `{name}` | {statistics.median(samples) * 1e3:.1f} ms | {' | '.join(cells)} |")


if __name__ == "__main__":
    raise SystemExit(main())
