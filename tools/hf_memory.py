"""Saved activation bytes, step time and loss of ``actcomp_dist.hf`` policies on a transformers
model: plain PEFT LoRA vs ``"exact"`` / ``"loract"`` (and its layer / sublayer modes), and full
fine-tuning vs CompAct (CPU).

    python tools/hf_memory.py --steps 200 --out results/hf_cpu
    python tools/hf_memory.py --base RUN_DIR/hf --words 15 --batch 16 --out results/hf_cpu_pretrained

Without ``--base``: a tiny Llama-shaped ``LlamaForCausalLM`` (random init, built from its
config: nothing is downloaded) learns a synthetic prompt/response task: the prompt is
``--words`` random tokens and a separator, the response a chain of a fixed random successor map
started from the last prompt word, then an end token. With ``--base DIR`` (a Hugging Face
LLaMA directory, e.g. the ``train.export_hf`` of a pretraining run of this project): that
pretrained model learns the fine-tuning demo's ``reverse_words`` task
(:func:`actcomp_dist.data.jsonl.synthetic_rows`) in its own tokenizer, rows padded to
``2 --words + 2`` tokens. The loss is on the response only. Every variant starts from the same
weights and sees the same batches.

Per variant: ``saved_MiB`` (bytes autograd keeps for backward in one micro-batch's forward,
measured by :func:`actcomp_dist.memory.saved_activation_bytes`, exact), ``step_ms`` (median
wall time of a training step: forward, backward, AdamW) and ``step_cpu_ms`` (median CPU time
of this thread in the step: with one thread, the step's compute, which other jobs on a shared
machine disturb far less than wall time), ``final_loss`` (the mean training loss of the last
``--loss-window`` steps; ``heldout_loss``: on a held-out batch after the last step; variants
take their steps in turn, so load on the machine slows them alike) and each ratio against the
variant's baseline (plain LoRA for the LoRA variants, unpatched full fine-tuning for the full
ones). Writes ``results.json`` and ``results.md`` to ``--out``.
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
from actcomp_dist.layers import find_schedule  # noqa: E402
from actcomp_dist.memory import saved_activation_bytes  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEP, EOS, FIRST_WORD = 1, 2, 8
COMPACT = CompressionConfig(method="compact", rank=0.25, resample_every=50, seed=1)

#: name -> (baseline, LoRA?, policy or None, compression or None)
VARIANTS = {
    "lora": ("lora", True, None, None),
    "lora+exact": ("lora", True, "exact", None),
    "lora+loract": ("lora", True, "loract", None),
    "lora+loract-layer": ("lora", True, "loract-layer", None),
    "lora+loract-sublayer": ("lora", True, "loract-sublayer", None),
    "lora+lowrank_h/4": ("lora", True, {"norm": "lowrank:32", "swiglu": "lowrank:88"}, None),
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


def build_model(args) -> torch.nn.Module:
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
    torch.manual_seed(args.seed)
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


def batch(args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[words | SEP | response | EOS]`` rows, the response a chain of the task's successor
    map from the last prompt word; labels only on the response and EOS. With ``--base``: rows
    drawn from the ``reverse_words`` pool."""
    if args.base is not None:
        tokens, labels = args.pool_rows
        rows = torch.randint(0, args.pool, (args.batch,), generator=generator)
        return tokens[rows], labels[rows]
    nxt = successor(args.vocab)
    words = torch.randint(FIRST_WORD, args.vocab, (args.batch, args.words), generator=generator)
    response = [nxt[words[:, -1]]]
    for _ in range(args.words - 1):
        response.append(nxt[response[-1]])
    sep = torch.full((args.batch, 1), SEP)
    eos = torch.full((args.batch, 1), EOS)
    tokens = torch.cat([words, sep, torch.stack(response, 1), eos], dim=1)  # [b, 2 words + 2]
    labels = tokens.clone()
    labels[:, : args.words + 1] = -100  # the prompt and the separator
    return tokens, labels


class Variant:
    """One model of the comparison, its optimizer and its measurements."""

    def __init__(self, name: str, args) -> None:
        _, lora, policy, compression = VARIANTS[name]
        model = build_model(args)
        if lora:
            config = peft.LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR
            )
            torch.manual_seed(args.seed + 1)
            model = peft.get_peft_model(model, config)
        if policy is not None:
            apply_memory_policy(model, policy, compression=compression)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.optimizer = torch.optim.AdamW(trainable, lr=args.lr_lora if lora else args.lr_full)
        schedule = find_schedule(model)
        if schedule is not None:
            schedule.attach(self.optimizer)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def loss(self, tokens, labels):
        return self.model(input_ids=tokens, labels=labels).loss

    def step(self, tokens, labels) -> None:
        start, start_cpu = time.perf_counter(), time.thread_time()
        loss = self.loss(tokens, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.thread_time() - start_cpu)
        self.losses.append(loss.item())


def run(names: list[str], args) -> dict:
    """Train every variant on the same batches, one step of each in turn (so a busy machine
    slows all of them alike), and measure them."""
    variants = {name: Variant(name, args) for name in names}
    if args.base is not None:
        held_tokens, held_labels = reverse_words_pool(args, seed=10_000)
        held_out = held_tokens[: args.batch], held_labels[: args.batch]
    else:
        held_out = batch(args, torch.Generator().manual_seed(10_000))
    results = {
        name: {"saved_bytes": saved_activation_bytes(lambda v=v: v.loss(*held_out))}
        for name, v in variants.items()
    }
    data = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        tokens, labels = batch(args, data)
        for variant in variants.values():
            variant.step(tokens, labels)
    for name, variant in variants.items():
        with torch.no_grad():
            results[name]["heldout_loss"] = variant.loss(*held_out).item()
        results[name]["step_ms"] = 1000 * statistics.median(variant.times[args.warmup :])
        results[name]["step_cpu_ms"] = 1000 * statistics.median(variant.cpu_times[args.warmup :])
        results[name]["final_loss"] = statistics.fmean(variant.losses[-args.loss_window :])
    return results


def table(results: dict) -> str:
    lines = [
        "| variant | saved MiB | x baseline | step ms | x baseline | step CPU ms | x baseline "
        "| final loss | x baseline | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        base = results[VARIANTS[name][0]]
        lines.append(
            f"| {name} | {row['saved_bytes'] / 2**20:.2f} | "
            f"{row['saved_bytes'] / base['saved_bytes']:.3f} | {row['step_ms']:.1f} | "
            f"{row['step_ms'] / base['step_ms']:.2f} | {row['step_cpu_ms']:.1f} | "
            f"{row['step_cpu_ms'] / base['step_cpu_ms']:.2f} | {row['final_loss']:.4f} | "
            f"{row['final_loss'] / base['final_loss']:.3f} | {row['heldout_loss']:.4f} |"
        )
    return "\n".join(lines)


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a Hugging Face LLaMA directory (e.g. a run's train.export_hf) to fine-tune "
        "instead of a random-init model, on the reverse_words task in its tokenizer",
    )
    parser.add_argument("--pool", type=int, default=4096, help="--base: reverse_words rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    torch.set_num_threads(args.threads)
    if args.base is not None:
        args.pool_rows = reverse_words_pool(args, seed=args.seed)
    names = [n for n in VARIANTS if n in args.variants]
    missing = {VARIANTS[n][0] for n in names} - set(names)
    if missing:
        parser.error(f"--variants needs the baselines {sorted(missing)} too")
    results = run(names, args)
    text = table(results)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps({"args": _args_json(args), "results": results})
        )
        (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
