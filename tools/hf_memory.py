"""Saved activation bytes, step time and loss of ``actcomp_dist.hf`` policies on a transformers
model: plain PEFT LoRA vs ``"exact"`` / ``"loract"`` (and its layer / sublayer modes), and full
fine-tuning vs CompAct (CPU).

    python tools/hf_memory.py --steps 200 --out results/hf_cpu
    python tools/hf_memory.py --base RUN_DIR/hf --words 15 --batch 16 --seeds 0 1 2 \
        --out results/hf_cpu_pretrained

Without ``--base``: a tiny Llama-shaped ``LlamaForCausalLM`` (random init, built from its
config: nothing is downloaded) learns a synthetic prompt/response task: the prompt is
``--words`` random tokens and a separator, the response a chain of a fixed random successor map
started from the last prompt word, then an end token. With ``--base DIR`` (a Hugging Face
LLaMA directory, e.g. the ``train.export_hf`` of a pretraining run of this project): that
pretrained model learns the fine-tuning demo's ``reverse_words`` task
(:func:`actcomp_dist.data.jsonl.synthetic_rows`) in its own tokenizer, rows padded to
``2 --words + 2`` tokens. The loss is on the response only. Every variant starts from the same
weights and sees the same batches.

Per variant and seed (``--seeds``: the random init, the LoRA init and the order of the
batches): ``saved_bytes`` (bytes autograd keeps for backward in one micro-batch's forward,
measured by :func:`actcomp_dist.memory.saved_activation_bytes`, exact), ``step_ms`` (median
wall time of a training step: forward, backward, AdamW) and ``step_cpu_ms`` (median CPU time
of this thread in the step: with one thread, the step's compute, which other jobs on a shared
machine disturb far less than wall time; variants take their steps in turn, so load on the
machine slows them alike), and three losses: ``last_loss`` (the training loss of the last step:
one batch), ``final_loss`` (the mean training loss of the last ``--loss-window`` steps) and
``heldout_loss`` (the mean loss on ``--heldout-rows`` held-out rows after the last step, in
batches of ``--batch``). ``results.json`` keeps every seed's numbers and, per variant, their
mean and sample standard deviation (``*_sd``); ``results.md`` shows the means, the spread of
the two averaged losses and each mean's ratio against the variant's baseline (plain LoRA for
the LoRA variants, unpatched full fine-tuning for the full ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import transformers  # noqa: E402

from actcomp_dist.config import CompressionConfig  # noqa: E402
from actcomp_dist.data.jsonl import synthetic_rows  # noqa: E402
from actcomp_dist.data.tokenizer import load_tokenizer  # noqa: E402
from actcomp_dist.hf import apply_memory_policy  # noqa: E402
from actcomp_dist.hf.policy import LORACT_RANK_DIVISOR  # noqa: E402
from actcomp_dist.layers import find_schedule  # noqa: E402
from actcomp_dist.memory import saved_activation_bytes  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEP, EOS, FIRST_WORD = 1, 2, 8
RNG_SEED_OFFSET = 1000  # a variant's global-RNG stream starts at manual_seed(1000 + seed)
COMPACT = CompressionConfig(method="compact", rank=0.25, resample_every=50, seed=1)

#: name -> (baseline, LoRA?, policy or None, compression or None). ``+hf_loss``: the policy
#: with transformers' own loss (``loss_chunk_tokens=None``: the fp32 log-probabilities kept).
#: In a policy mapping, ``lowrank:R`` is the preset's rank (hidden // 8, see
#: :func:`resolved`); ``loract_norm`` / ``loract_swiglu`` are ``"loract"`` with only one of its
#: two kinds factorised (the other ``keep``, as in ``"exact"``); ``int8``: no LoRAct, gate / up
#: and q / k / v in 8 bits (norms kept as ``"exact"`` keeps them).
VARIANTS = {
    "lora": ("lora", True, None, None),
    "lora+exact": ("lora", True, "exact", None),
    "lora+loract": ("lora", True, "loract", None),
    "lora+loract+hf_loss": ("lora", True, "loract", None),
    "lora+loract_norm": ("lora", True, {"norm": "lowrank:R"}, None),
    "lora+loract_swiglu": ("lora", True, {"swiglu": "lowrank:R"}, None),
    "lora+loract-layer": ("lora", True, "loract-layer", None),
    "lora+loract-sublayer": ("lora", True, "loract-sublayer", None),
    "lora+lowrank_h/4": ("lora", True, {"norm": "lowrank:32", "swiglu": "lowrank:88"}, None),
    "lora+int8": ("lora", True, {"swiglu": "int8", "attention": "int8"}, None),
    "lora+loract+int8_attention": (
        "lora",
        True,
        {"norm": "lowrank:16", "swiglu": "lowrank:44", "attention": "int8"},
        None,
    ),
    "full": ("full", False, None, None),
    "full+exact": ("full", False, "exact", None),
    "full+exact+compact": ("full", False, "exact", COMPACT),
    "full+loract": ("full", False, "loract", None),
}


def resolved(policy, model: torch.nn.Module):
    """``policy`` with ``lowrank:R`` in a mapping replaced by the presets' rank, hidden // 8
    (:data:`actcomp_dist.hf.policy.LORACT_RANK_DIVISOR`) of ``model``."""
    if not isinstance(policy, dict):
        return policy
    rank = max(1, model.config.hidden_size // LORACT_RANK_DIVISOR)
    return {k: f"lowrank:{rank}" if v == "lowrank:R" else v for k, v in policy.items()}


def build_model(args, seed: int) -> torch.nn.Module:
    if args.base is not None:
        model = transformers.LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        model.config.use_cache = False
        return model.train()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2 * args.words + 2,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).train()


def successor(vocab: int) -> torch.Tensor:
    """The task's fixed random map word -> next word (a permutation of the word ids)."""
    perm = torch.randperm(vocab - FIRST_WORD, generator=torch.Generator().manual_seed(12345))
    return torch.cat([torch.arange(FIRST_WORD), perm + FIRST_WORD])


def reverse_words_pool(args, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``--base``: the fine-tuning demo's ``reverse_words`` task (:mod:`actcomp_dist.data.jsonl`)
    in the pretrained run's tokenizer: ``[BOS] prompt response EOS`` rows, padded to
    ``2 --words + 2`` tokens with EOS at the end (labels -100 there, as on the prompt)."""
    tokenizer = load_tokenizer(args.base)
    length = 2 * args.words + 2
    tokens = torch.full((args.pool, length), tokenizer.eod)
    labels = torch.full((args.pool, length), -100)
    for i, row in enumerate(synthetic_rows("reverse_words", args.pool, seed)):
        bos = [] if tokenizer.bos is None else [tokenizer.bos]
        prompt = bos + tokenizer.encode(row["prompt"])
        response = tokenizer.encode(row["response"]) + [tokenizer.eod]
        ids = (prompt + response)[:length]
        tokens[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(prompt) : len(ids)] = torch.tensor(ids[len(prompt) :])
    return tokens, labels


def batch(args, generator: torch.Generator, rows: int | None = None):
    """``rows`` (default ``--batch``) ``[words | SEP | response | EOS]`` rows, the response a
    chain of the task's successor map from the last prompt word; labels only on the response
    and EOS. With ``--base``: rows drawn from the ``reverse_words`` pool."""
    rows = args.batch if rows is None else rows
    if args.base is not None:
        tokens, labels = args.pool_rows
        picked = torch.randint(0, args.pool, (rows,), generator=generator)
        return tokens[picked], labels[picked]
    nxt = successor(args.vocab)
    words = torch.randint(FIRST_WORD, args.vocab, (rows, args.words), generator=generator)
    response = [nxt[words[:, -1]]]
    for _ in range(args.words - 1):
        response.append(nxt[response[-1]])
    sep = torch.full((rows, 1), SEP)
    eos = torch.full((rows, 1), EOS)
    tokens = torch.cat([words, sep, torch.stack(response, 1), eos], dim=1)  # [b, 2 words + 2]
    labels = tokens.clone()
    labels[:, : args.words + 1] = -100  # the prompt and the separator
    return tokens, labels


class Variant:
    """One model of the comparison, its optimizer and its measurements."""

    def __init__(self, name: str, args, seed: int) -> None:
        _, lora, policy, compression = VARIANTS[name]
        model = build_model(args, seed)
        if lora:
            config = peft.LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR
            )
            torch.manual_seed(seed + 1)
            model = peft.get_peft_model(model, config)
        if policy is not None:
            chunk = None if name.endswith("+hf_loss") else args.loss_chunk_tokens
            apply_memory_policy(
                model,
                resolved(policy, model),
                compression=compression,
                loss_chunk_tokens=chunk or None,
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.optimizer = torch.optim.AdamW(trainable, lr=args.lr_lora if lora else args.lr_full)
        schedule = find_schedule(model)
        if schedule is not None:
            schedule.attach(self.optimizer)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        # The variant's own stream of the global CPU RNG, which LoRAct's per-call column draws
        # consume: its numbers do not depend on which other variants run beside it.
        self.rng_state = torch.Generator().manual_seed(RNG_SEED_OFFSET + seed).get_state()

    def loss(self, tokens, labels):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            loss = self.model(input_ids=tokens, labels=labels).loss
            self.rng_state = torch.get_rng_state()
        return loss

    def step(self, tokens, labels) -> None:
        start, start_cpu = time.perf_counter(), time.thread_time()
        loss = self.loss(tokens, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.thread_time() - start_cpu)
        self.losses.append(loss.item())


def held_out_rows(args) -> tuple[torch.Tensor, torch.Tensor]:
    """``--heldout-rows`` rows no training batch draws from (another generator seed)."""
    if args.base is not None:
        tokens, labels = reverse_words_pool(args, seed=10_000)
        return tokens[: args.heldout_rows], labels[: args.heldout_rows]
    return batch(args, torch.Generator().manual_seed(10_000), rows=args.heldout_rows)


def run(names: list[str], args, seed: int) -> dict:
    """Train every variant on the same batches, one step of each in turn (so a busy machine
    slows all of them alike), and measure them."""
    variants = {name: Variant(name, args, seed) for name in names}
    held_tokens, held_labels = held_out_rows(args)
    # Copies: a slice is a view of all held-out rows, and a trained embedding keeps its input
    # ids, so the saved-bytes count would charge it the whole held-out tensor's storage.
    first = held_tokens[: args.batch].clone(), held_labels[: args.batch].clone()
    results = {
        name: {"saved_bytes": saved_activation_bytes(lambda v=v: v.loss(*first))}
        for name, v in variants.items()
    }
    data = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        tokens, labels = batch(args, data)
        for variant in variants.values():
            variant.step(tokens, labels)
    for name, variant in variants.items():
        with torch.no_grad():
            # Mean over rows of equal weight per batch: every batch has --batch rows but the
            # last, weighted by its rows.
            held = [
                (variant.loss(held_tokens[i : i + args.batch], held_labels[i : i + args.batch]))
                .mul(min(args.batch, len(held_tokens) - i))
                .item()
                for i in range(0, len(held_tokens), args.batch)
            ]
        results[name]["heldout_loss"] = sum(held) / len(held_tokens)
        results[name]["step_ms"] = 1000 * statistics.median(variant.times[args.warmup :])
        results[name]["step_cpu_ms"] = 1000 * statistics.median(variant.cpu_times[args.warmup :])
        results[name]["last_loss"] = variant.losses[-1]
        results[name]["final_loss"] = statistics.fmean(variant.losses[-args.loss_window :])
    return results


METRICS = ("saved_bytes", "step_ms", "step_cpu_ms", "last_loss", "final_loss", "heldout_loss")


def summarise(per_seed: dict[int, dict]) -> dict:
    """Per variant and metric: the mean over seeds and the sample standard deviation."""
    names = next(iter(per_seed.values()))
    out = {}
    for name in names:
        row = {}
        for metric in METRICS:
            values = [results[name][metric] for results in per_seed.values()]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[name] = row
    return out


def _ratio(row: dict, base: dict, metric: str, digits: int = 2) -> str:
    return f"{row[metric] / base[metric]:.{digits}f}"


def _spread(row: dict, metric: str, seeds: int) -> str:
    sd = f" ± {row[f'{metric}_sd']:.4f}" if seeds > 1 else ""
    return f"{row[metric]:.4f}{sd}"


def table(results: dict, seeds: int, window: int) -> str:
    """Means over the seeds (``± sd``: sample standard deviation) and ratios of the means."""
    lines = [
        "| variant | saved MiB | x baseline | step CPU ms | x baseline | step ms | x baseline "
        f"| train loss, last {window} steps | x baseline | held-out loss | x baseline "
        "| last-step loss | x baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        base = results[VARIANTS[name][0]]
        lines.append(
            f"| {name} | {row['saved_bytes'] / 2**20:.2f} | "
            f"{_ratio(row, base, 'saved_bytes', 3)} | {row['step_cpu_ms']:.1f} | "
            f"{_ratio(row, base, 'step_cpu_ms')} | {row['step_ms']:.1f} | "
            f"{_ratio(row, base, 'step_ms')} | {_spread(row, 'final_loss', seeds)} | "
            f"{_ratio(row, base, 'final_loss', 3)} | {_spread(row, 'heldout_loss', seeds)} | "
            f"{_ratio(row, base, 'heldout_loss', 3)} | {row['last_loss']:.4f} | "
            f"{_ratio(row, base, 'last_loss', 3)} |"
        )
    return "\n".join(lines)


def merged_seeds(paths: list[Path]) -> dict[int, dict]:
    """The per-seed results of several runs (one process per seed spreads them over cores)."""
    per_seed: dict[int, dict] = {}
    for path in paths:
        for seed, results in json.loads(path.read_text())["seeds"].items():
            if int(seed) in per_seed:
                raise SystemExit(f"--merge: seed {seed} appears twice ({path})")
            per_seed[int(seed)] = results
    variants = {tuple(results) for results in per_seed.values()}
    if len(variants) != 1:
        raise SystemExit(f"--merge: the runs have different variants {sorted(variants)}")
    return per_seed


def _args_json(args) -> dict[str, str]:
    return {k: str(v) for k, v in vars(args).items() if k != "pool_rows"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of step_ms")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--words", type=int, default=31, help="prompt tokens (seq = 2 words + 2)")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA r")
    parser.add_argument("--lr-lora", type=float, default=1e-2)
    parser.add_argument("--lr-full", type=float, default=1e-3)
    parser.add_argument(
        "--loss-window", type=int, default=20, help="final_loss: mean of the last N steps"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one run of every variant per seed"
    )
    parser.add_argument(
        "--heldout-rows", type=int, default=256, help="held-out rows for heldout_loss"
    )
    parser.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=1024,
        help="apply_memory_policy's loss_chunk_tokens (0: transformers' loss)",
    )
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a Hugging Face LLaMA directory (e.g. a run's train.export_hf) to fine-tune "
        "instead of a random-init model, on the reverse_words task in its tokenizer",
    )
    parser.add_argument("--pool", type=int, default=4096, help="--base: reverse_words rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="results.json files of runs of other seeds (same variants and arguments) to "
        "summarise together instead of running",
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    torch.set_num_threads(args.threads)
    if args.base is not None:
        args.pool_rows = reverse_words_pool(args, seed=0)
    names = [n for n in VARIANTS if n in args.variants]
    missing = {VARIANTS[n][0] for n in names} - set(names)
    if missing:
        parser.error(f"--variants needs the baselines {sorted(missing)} too")
    run_args = _args_json(args)
    if args.merge is not None:
        per_seed = merged_seeds(args.merge)
        names = list(next(iter(per_seed.values())))
        # The runs' own arguments (of the first; --merge checks the variants only).
        run_args = json.loads(args.merge[0].read_text())["args"] | {
            "merged_from": [str(path) for path in args.merge]
        }
    else:
        per_seed = {seed: run(names, args, seed) for seed in args.seeds}
    results = summarise(per_seed)
    text = table(results, len(per_seed), args.loss_window)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps({"args": run_args, "results": results, "seeds": per_seed})
        )
        (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
