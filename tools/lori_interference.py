r"""LoRI against LoRA on two tasks: each task with its own adapter, then both merged into the base.

    python tools/lori_interference.py --out results/lori_interference            # ~15 min, 2 CPUs
    python tools/lori_interference.py --out /tmp/li --steps 20 --rows 256 --eval-rows 16  # smoke

LoRI (arXiv 2504.07448) claims that adapters with frozen random A (independent per task) and
sparse B interfere less when merged than LoRA adapters. This tool measures that claim on the
tiny LLaMA and the two generated tasks (``reverse_words``: "reverse: a b c" -> "c b a";
``sort_words``: "sort: a b c" -> the words in alphabetical order):

1. six fine-tuning runs through the real command (``launch/finetune.py``, one CPU rank, the
   tiny configs of ``configs/``; the same randomly initialised base in every run, since it is
   built from ``train.seed``): per task LoRA, LoRI-D (dense B) and LoRI-S (90% of B masked,
   the mask from that task's LoRI-D adapter, as the paper's scripts do; 3x the learning rate,
   as ``tests/integration/test_finetune.py``'s LoRI-S). Each task's adapter has its own ``adapter.seed``
   (LoRI: its own A).
2. per method and task: the response loss (teacher-forced mean over the response and EOS
   tokens of the held-out rows) and greedy exact match, with the task's own adapter alone, and
   after both adapters are merged into the base weights (``merge_adapters``, weights 1: the
   sum of the two updates, LoRI's concatenated merge). The base without adapters is the floor.

3. continual learning (``finetune.previous``): a seventh run trains LoRI-S on
   ``sort_words`` as task 1 on top of the LoRI-S ``reverse_words`` adapter (task 0, frozen),
   its mask from a dense calibration adapter trained in the same run (``calibration_steps`` =
   ``--steps``, at the LoRI-S learning rate); measured as the merge: each task's loss with its
   own adapter alone and with both (the model after task 1).

Interference = merged loss - own-adapter loss; "gain lost" = interference / (base loss -
own-adapter loss), the share of what the adapter had gained that merging takes away. Writes
``results.json`` and ``results.md`` to ``--out``; the fine-tuning runs stay in ``--out/runs``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("reverse_words", "sort_words")
METHODS = ("lora", "lori_d", "lori_s")
CONTINUAL = "lori_s_continual"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="results and runs directory")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--rows", type=int, default=4096, help="generated training rows")
    parser.add_argument("--eval-rows", type=int, default=128, help="held-out rows per task")
    return parser.parse_args(argv)


def _continual_overrides(run_dir: Path, args) -> tuple[Path, list[str]]:
    """Task 1 (sort_words) on top of the LoRI-S reverse_words adapter (task 0, seed 1)."""
    previous = run_dir.parent / f"lori_s_{TASKS[0]}" / "adapter"
    mask = {"sparsity": 0.9, "calibration_steps": args.steps}
    return ROOT / "configs" / "finetune_tiny_lori.json", [
        f"run_dir={run_dir}",
        f"data.synthetic_task={TASKS[1]}",
        f"data.synthetic_rows={args.rows}",
        f"train.steps={args.steps}",
        f"train.eval_interval={args.steps}",
        "logging.interval=50",
        "finetune.adapter.seed=1",
        "train.lr=0.03",
        "train.min_lr=0.003",
        f"finetune.previous={json.dumps([str(previous)])}",
        f"finetune.mask={json.dumps(mask)}",
    ]


def _run_overrides(method: str, task_index: int, run_dir: Path, args) -> tuple[Path, list[str]]:
    config = (
        ROOT
        / "configs"
        / ("finetune_tiny_lora.json" if method == "lora" else "finetune_tiny_lori.json")
    )
    overrides = [
        f"run_dir={run_dir}",
        f"data.synthetic_task={TASKS[task_index]}",
        f"data.synthetic_rows={args.rows}",
        f"train.steps={args.steps}",
        f"train.eval_interval={args.steps}",
        "logging.interval=50",
        f"finetune.adapter.seed={1 + task_index}",
    ]
    if method == "lora":
        overrides.append("finetune.adapter.input_compression=null")
    if method == "lori_s":
        calibration = run_dir.parent / f"lori_d_{TASKS[task_index]}" / "adapter"
        overrides += [
            "train.lr=0.03",
            "train.min_lr=0.003",
            f'finetune.mask={{"sparsity": 0.9, "calibration_adapter": "{calibration}"}}',
        ]
    return config, overrides


def train_all(out: Path, args) -> dict[str, float]:
    """The seven fine-tuning runs (skipped when their adapter exists); seconds per run."""
    seconds = {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    runs = [(method, index, task) for method in METHODS for index, task in enumerate(TASKS)]
    for method, index, task in [*runs, (CONTINUAL, 1, TASKS[1])]:
        run_dir = out / "runs" / f"{method}_{task}"
        if (run_dir / "adapter" / "actcomp_adapter.json").is_file():
            continue
        if method == CONTINUAL:
            config, overrides = _continual_overrides(run_dir, args)
        else:
            config, overrides = _run_overrides(method, index, run_dir, args)
        command = [
            sys.executable,
            str(ROOT / "launch" / "finetune.py"),
            "--config",
            str(config),
        ]
        for override in overrides:
            command += ["--set", override]
        print(f"training {method} on {task}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"{method} on {task} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        seconds[f"{method}_{task}"] = time.perf_counter() - start
    return seconds


@torch.no_grad()
def response_loss(model, samples) -> float:
    """Mean per-token loss over every response (and EOS) token of ``samples``."""
    total = count = 0.0
    for start in range(0, len(samples), 32):
        batch = samples[start : start + 32]
        tokens = torch.from_numpy(numpy.stack([s["tokens"] for s in batch]))
        labels = torch.from_numpy(numpy.stack([s["labels"] for s in batch]))
        mask = torch.from_numpy(numpy.stack([s["loss_mask"] for s in batch]))
        losses = model(tokens, labels, mask)
        total += float((losses * mask).sum())
        count += float(mask.sum())
    return total / count


@torch.no_grad()
def exact_match(model, tokenizer, rows, template: str) -> float:
    from actcomp_dist.models.generate import greedy_generate

    bos = [tokenizer.bos] if tokenizer.bos is not None else []
    correct = 0
    for row in rows:
        prompt = bos + tokenizer.encode(template.format(prompt=row["prompt"]))
        max_new = len(tokenizer.encode(row["response"])) + 4
        ids = greedy_generate(model, prompt, max_new, eos_id=tokenizer.eod)
        if ids and ids[-1] == tokenizer.eod:
            ids = ids[:-1]
        correct += tokenizer.decode(ids) == row["response"]
    return correct / len(rows)


def evaluate_all(out: Path, args) -> dict:
    import torch.distributed as dist

    from actcomp_dist.adapters import load_adapter, merge_adapters, set_adapter_enabled
    from actcomp_dist.cli.convert_hf import read_run_checkpoint, run_tokenizer
    from actcomp_dist.cli.generate import held_out_rows
    from actcomp_dist.data.jsonl import encode_rows
    from actcomp_dist.data.tokenizer import load_tokenizer
    from actcomp_dist.models import build_llama, load_full_weights, merge_shards
    from actcomp_dist.parallel import state as parallel_state

    runs = out / "runs"
    first = runs / f"lora_{TASKS[0]}"
    config, shards, step, trainer_state = read_run_checkpoint(first)
    base = merge_shards(shards, config)
    # Every run must have trained on the same base (built from the same train.seed).
    for method in METHODS:
        for task in TASKS:
            _, other, _, _ = read_run_checkpoint(runs / f"{method}_{task}")
            merged = merge_shards(other, config)
            same = all(torch.equal(base[k], merged[k]) for k in base if ".adapters." not in k)
            if not same:
                raise RuntimeError(f"{method}_{task} trained on another base model than {first}")
    run = trainer_state["config"]
    tokenizer = load_tokenizer(run_tokenizer(step, trainer_state))
    template = run["data"].get("prompt_template", "{prompt}")
    data = {}
    for task in TASKS:
        task_run = copy.deepcopy(run)
        task_run["data"]["synthetic_task"] = task
        rows = held_out_rows(task_run)[: args.eval_rows]
        samples, _ = encode_rows(
            rows, tokenizer, run["data"]["seq_length"], prompt_template=template
        )
        data[task] = (rows, samples)

    def measure(model, task):
        rows, samples = data[task]
        return {
            "loss": response_loss(model, samples),
            "exact_match": exact_match(model, tokenizer, rows, template),
        }

    results: dict = {"base": {}, "methods": {}}
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group(
            "gloo", init_method=f"file://{Path(scratch) / 'store'}", rank=0, world_size=1
        )
        try:
            parallel_state.initialize_model_parallel(1)
            base_weights = {k: v for k, v in base.items() if ".adapters." not in k}

            def base_model():
                model = build_llama(config, device="cpu")
                load_full_weights(model, base_weights)
                return model.eval()

            model = base_model()
            for task in TASKS:
                results["base"][task] = measure(model, task)
            for method in (*METHODS, CONTINUAL):
                adapted = base_model()
                names = [f"task{i}" for i in range(len(TASKS))]
                directories = [runs / f"{method}_{task}" / "adapter" for task in TASKS]
                if method == CONTINUAL:  # task 0 is LoRI-S's reverse_words adapter
                    directories[0] = runs / f"lori_s_{TASKS[0]}" / "adapter"
                for name, directory in zip(names, directories, strict=True):
                    load_adapter(adapted, directory, name)
                entry = {"own": {}, "merged": {}}
                for name, task in zip(names, TASKS, strict=True):
                    for other in names:
                        set_adapter_enabled(adapted, other, other == name)
                    entry["own"][task] = measure(adapted, task)
                for other in names:
                    set_adapter_enabled(adapted, other, True)
                merge_adapters(adapted, names, {n: 1.0 for n in names})
                for task in TASKS:
                    entry["merged"][task] = measure(adapted, task)
                if method == CONTINUAL:
                    # Task 1 trained with task 0 in the forward: "own" for it is both adapters.
                    entry = {
                        "task0_before": entry["own"][TASKS[0]],
                        "task0_after": entry["merged"][TASKS[0]],
                        "task1": entry["merged"][TASKS[1]],
                        "task1_without_task0": entry["own"][TASKS[1]],
                    }
                    results["continual"] = entry
                else:
                    results["methods"][method] = entry
                print(f"{method}: {json.dumps(entry)}", flush=True)
        finally:
            if parallel_state.is_initialized():
                parallel_state.destroy()
            dist.destroy_process_group()
    return results


def table(results: dict, args) -> str:
    lines = [
        f"Tiny LLaMA (random init, base frozen), {args.steps} steps per adapter, {args.rows} "
        f"generated rows per task, {args.eval_rows} held-out rows per task. Loss: response "
        f"tokens, teacher-forced; EM: greedy exact match. Merged: both adapters added to the "
        f"base weights (weight 1 each). Gain lost: interference / (base loss - own loss).",
        "",
        "| method | task | loss own adapter | loss merged | interference (loss) | gain lost "
        "| EM own | EM merged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        base = results["base"][task]
        lines.append(
            f"| base (no adapter) | {task} | {base['loss']:.3f} | | | | "
            f"{base['exact_match']:.1%} | |"
        )
    for method, entry in results["methods"].items():
        for task in TASKS:
            own, merged = entry["own"][task], entry["merged"][task]
            gain = results["base"][task]["loss"] - own["loss"]
            lost = (merged["loss"] - own["loss"]) / gain
            lines.append(
                f"| {method} | {task} | {own['loss']:.3f} | {merged['loss']:.3f} | "
                f"{merged['loss'] - own['loss']:+.3f} | {lost:.0%} | {own['exact_match']:.1%} | "
                f"{merged['exact_match']:.1%} |"
            )
    continual = results.get("continual")
    if continual is not None:
        before, after, task1 = (
            continual["task0_before"],
            continual["task0_after"],
            continual["task1"],
        )
        lines += [
            "",
            f"LoRI-S continual learning: task 1 ({TASKS[1]}) trained on top of the frozen LoRI-S "
            f"{TASKS[0]} adapter (task 0), its mask from a dense calibration on task 1 in the "
            f"same run.",
            "",
            "| | loss | EM |",
            "|---|---|---|",
            f"| task 0 ({TASKS[0]}) before task 1 | {before['loss']:.3f} | "
            f"{before['exact_match']:.1%} |",
            f"| task 0 ({TASKS[0]}) after task 1 (forgetting: "
            f"{after['loss'] - before['loss']:+.3f}) | {after['loss']:.3f} | "
            f"{after['exact_match']:.1%} |",
            f"| task 1 ({TASKS[1]}), both adapters (as trained) | {task1['loss']:.3f} | "
            f"{task1['exact_match']:.1%} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = train_all(out, args)
    results = evaluate_all(out, args)
    results["settings"] = {"steps": args.steps, "rows": args.rows, "eval_rows": args.eval_rows}
    results["train_seconds"] = seconds
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results, args))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
