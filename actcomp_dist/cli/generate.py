r"""Answer a fine-tuning run's held-out prompts with the trained model; print the exact-match accuracy.

    actcomp-generate runs/finetune_tiny_lori                       # newest complete checkpoint
    actcomp-generate runs/finetune_tiny_lori --no-adapter          # the base model, for comparison
    actcomp-generate runs/ft/checkpoints/step_0000060 --rows 8 --json eval.json
    actcomp-generate runs/ft --prompt $'reverse: apple river stone\n'  # your own prompts

(``python tools/generate.py`` is the same command.) The run is read as ``actcomp-convert-hf
to-hf`` reads it: its run directory, ``checkpoints/`` folder or one step (the newest complete
step), the model config and the tokenizer the run trained with. The base weights come from that
checkpoint; a LoRA / LoRI run's adapter from ``finetune.adapter_dir`` (``--adapter DIR`` for
another). ``--no-adapter`` leaves it out: for these modes, whose adapters start at B = 0, that
is the model before fine-tuning.

The held-out prompts are the run's validation rows: ``data.valid`` files, or for a synthetic
task the rows the trainer validates on (the same generator and seed). Each prompt is encoded as
in training (``[BOS] + tokens(prompt_template(prompt))``) and answered by greedy decoding
(:func:`actcomp_dist.models.generate.greedy_generate`) until EOS, at most ``--max-new-tokens``
tokens (default: the longest reference answer's token count + 4). An answer counts when its
decoded text equals the reference response exactly. Also reported: the fraction of reference
response tokens (and the EOS after them) that are the model's most likely next token given the
reference before them (teacher-forced), which shows progress before whole answers come out
right. One CPU process, tensor parallelism 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("run", help="a fine-tuning run directory, its checkpoints/ or one step")
    parser.add_argument("--adapter", help="adapter directory (default: the run's adapter_dir)")
    parser.add_argument(
        "--no-adapter", action="store_true", help="evaluate the base model without the adapter"
    )
    parser.add_argument("--tokenizer", help="the run's tokenizer, if it has moved")
    parser.add_argument(
        "--prompt", action="append", help="answer this prompt instead (repeatable; no accuracy)"
    )
    parser.add_argument("--rows", type=int, help="only the first N held-out rows")
    parser.add_argument("--max-new-tokens", type=int, help="default: longest reference + 4")
    parser.add_argument("--json", help="also write the answers and the accuracy here")
    return parser.parse_args(argv)


def held_out_rows(run: dict) -> list[dict[str, str]]:
    """The validation rows of a fine-tuning run's config (as the trainer builds them)."""
    from actcomp_dist.training.finetune import read_jsonl, synthetic_rows

    data, seed = run.get("data", {}), run.get("train", {}).get("seed", 1234)
    if data.get("synthetic_task"):
        count = max(data.get("synthetic_rows", 512) // 8, 1)
        return synthetic_rows(data["synthetic_task"], count, seed + 1)
    rows = [row for path in data.get("valid") or [] for row in read_jsonl(path)]
    rows = [row for row in rows if "prompt" in row]
    if not rows:
        raise ValueError(
            "the run has no held-out prompt/response rows (data.valid / data.synthetic_task); "
            "pass --prompt"
        )
    return rows


@torch.no_grad()
def _response_token_hits(model, tokenizer, prompts, rows) -> tuple[int, int]:
    """Teacher-forced: of the reference response tokens (and the EOS after them), how many are
    the model's most likely next token given everything before them."""
    hits = total = 0
    for prompt, row in zip(prompts, rows, strict=True):
        if row["response"] is None:
            continue
        ids = (prompt + tokenizer.encode(row["response"]) + [tokenizer.eod])[
            : model.config.seq_length + 1
        ]
        target = ids[len(prompt) :]  # what was cut off past seq_length is not scored
        logits = model(torch.tensor([ids[:-1]]))[0, len(prompt) - 1 :]  # [len(target), V]
        predicted = logits.argmax(dim=-1).tolist()
        hits += sum(p == t for p, t in zip(predicted, target, strict=True))
        total += len(target)
    return hits, total


def evaluate(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from actcomp_dist.cli.convert_hf import read_run_checkpoint, run_tokenizer
    from actcomp_dist.data.tokenizer import load_tokenizer
    from actcomp_dist.models import build_llama, load_full_weights, merge_shards
    from actcomp_dist.models.generate import greedy_generate
    from actcomp_dist.parallel import state as parallel_state

    config, shards, step, trainer_state = read_run_checkpoint(Path(args.run))
    if trainer_state is None:
        raise ValueError(f"{step} has no trainer.json: not a checkpoint of a fine-tuning run")
    run = trainer_state["config"]
    tokenizer = load_tokenizer(args.tokenizer or run_tokenizer(step, trainer_state))
    finetune = run.get("finetune") or {}
    adapter = None
    if finetune.get("mode") in ("lora", "lori") and not args.no_adapter:
        adapter = args.adapter or finetune.get("adapter_dir") or Path(run["run_dir"]) / "adapter"
    if args.prompt:
        rows = [{"prompt": prompt, "response": None} for prompt in args.prompt]
    else:
        rows = held_out_rows(run)[: args.rows]
    template = run.get("data", {}).get("prompt_template", "{prompt}")
    bos = [tokenizer.bos] if tokenizer.bos is not None else []
    prompts = [bos + tokenizer.encode(template.format(prompt=r["prompt"])) for r in rows]
    max_new = args.max_new_tokens or 4 + max(
        (len(tokenizer.encode(r["response"])) for r in rows if r["response"] is not None),
        default=28,
    )

    full = merge_shards(shards, config)
    answers = []
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group(
            "gloo", init_method=f"file://{Path(scratch) / 'store'}", rank=0, world_size=1
        )
        try:
            parallel_state.initialize_model_parallel(1)
            model = build_llama(config, device="cpu")
            load_full_weights(model, full)
            if adapter is not None:
                from actcomp_dist.adapters import load_adapter

                load_adapter(model, adapter)
            for prompt in prompts:
                ids = greedy_generate(model, prompt, max_new, eos_id=tokenizer.eod)
                if ids and ids[-1] == tokenizer.eod:
                    ids = ids[:-1]
                answers.append(tokenizer.decode(ids))
            hits, total = _response_token_hits(model, tokenizer, prompts, rows)
        finally:
            if parallel_state.is_initialized():
                parallel_state.destroy()
            dist.destroy_process_group()

    results = [
        {"prompt": r["prompt"], "answer": a, "reference": r["response"]}
        for r, a in zip(rows, answers, strict=True)
    ]
    scored = [r for r in results if r["reference"] is not None]
    correct = sum(r["answer"] == r["reference"] for r in scored)
    return {
        "response_token_accuracy": hits / total if total else None,
        "checkpoint": str(step),
        "adapter": None if adapter is None else str(adapter),
        "rows": results,
        "correct": correct,
        "total": len(scored),
        "exact_match": correct / len(scored) if scored else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for row in report["rows"]:
        mark = (
            ""
            if row["reference"] is None
            else ("  ok" if row["answer"] == row["reference"] else "  MISS")
        )
        print(f"{row['prompt'].strip()!r} -> {row['answer']!r}{mark}")
        if row["reference"] is not None and row["answer"] != row["reference"]:
            print(f"    expected {row['reference']!r}")
    model = f"{report['checkpoint']}" + (
        f" + adapter {report['adapter']}" if report["adapter"] else ""
    )
    if report["total"]:
        print(
            f"exact match: {report['correct']}/{report['total']} = "
            f"{report['exact_match']:.1%}, response tokens predicted (teacher-forced): "
            f"{report['response_token_accuracy']:.1%} ({model})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
