r"""Validate the CUDA path and measure memory and speed on one GPU, in one command.

    python tools/gpu_check.py                              # one CUDA GPU, about 8 minutes
    make gpu-check                                         # the same
    python tools/gpu_check.py --dry-run --out /tmp/gpu     # CPU: tiny shapes, the same code path

Writes ``OUT/results.md`` and ``OUT/results.json`` (default ``OUT``:
``results/gpu/<device name>/``). Three stages; each is recorded even when it fails, so one
failure never hides the others, and a stage that the time budget (``--budget-s``) no longer
covers is recorded as skipped:

1. **tests**: the CUDA tests (``pytest -m gpu``, tests/gpu/test_gpu.py): compressed layers in bf16
   on the device against float64, the parallel layers on an NCCL world of one, SDPA's fused
   attention kernels against the math kernel, saved bytes on the device against the analytic
   model, apex's fused norm when importable, the 8-bit and LoRAct low-rank storage policies on the
   device, and ``offload`` (pinned host copies: bit-identical to ``keep``, saved bytes split by
   device as the memory model predicts, the allocator's bytes lower by the prediction).
2. **runs**: ``--steps`` steps of the 60m and 350m configs through the real trainer
   (:func:`actcomp_dist.ablation.run_ablation`, one process) for each variant: peak allocated
   bytes (``torch.cuda.max_memory_allocated``), saved-activation bytes, tokens/s and model flops
   utilisation, beside the memory planner's prediction of the peak and its error.
3. **max_batch**: the 1B config at s = 2048: the largest micro-batch that fits for each variant,
   found by trying real steps from the planner's prediction up or down, with tokens/s there.

Model flops per token are ``6 P + 12 L h s`` (parameters ``P``, forward and backward, plus the
attention score and value products; recomputation is not counted, as in the usual MFU
definition). The peak dense bf16 rate comes from a table of known devices (``--peak-tflops``
overrides it; unknown devices report no MFU); both live in
:mod:`actcomp_dist.training.flops`, shared with the trainer's progress output.

``--dry-run`` takes the same path on the CPU: the tiny config at s = 64, a few steps, MemTracker's
peak in place of the CUDA allocator's, and at most two micro-batch sizes per variant. CI runs it
(tests/integration/test_gpu_check.py), so the script cannot rot between GPU sessions. Without a CUDA device
and without ``--dry-run`` it exits with code 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from actcomp_dist.training.flops import model_flops_per_token, peak_flops

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = "tests/gpu/test_gpu.py"
# The best storage policies by the planner (README "Choosing a policy"): 8-bit attention and
# SwiGLU, LoRAct's low-rank norms and SwiGLU at r = h/16 (the --budget pick at 1B, s = 4096).
VARIANTS = ("none", "ac_selective", "ac_full", "compact:0.25", "int8", "fp8", "ac_lowrank:0.0625")
MAX_BATCH_VARIANTS = ("none", "ac_full", "compact:0.25", "int8", "ac_lowrank:0.0625")


class Setup:
    """What a full check and a dry run differ in (everything else is one code path)."""

    def __init__(self, dry_run: bool, steps: int | None) -> None:
        self.dry_run = dry_run
        if dry_run:
            self.run_configs = ["configs/tiny_baseline.json"]
            self.run_overrides = ["data.seq_length=64", "train.micro_batch_size=2"]
            self.batch_config = "configs/tiny_baseline.json"
            self.batch_seq_length = 64
            self.max_tries = 2
            self.steps = steps or 3
        else:
            self.run_configs = ["configs/llama60m_baseline.json", "configs/llama350m_baseline.json"]
            self.run_overrides = []
            self.batch_config = "configs/llama1b_baseline.json"
            self.batch_seq_length = 2048
            self.max_tries = 4
            self.steps = steps or 20


def _log(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def device_name(dry_run: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu-dry-run" if dry_run else "cpu"


# -- stage 1: the CUDA tests ---------------------------------------------------------------------


def stage_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    report = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", GPU_TESTS, f"--junitxml={report}"]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    cases = []
    if report.is_file():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = "skipped" if child.tag == "skipped" else "failed"
                    message = (child.get("message") or "").strip()
                    detail = message.splitlines()[0][:300] if message else ""
            cases.append({"test": case.get("name"), "outcome": outcome, "detail": detail})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {
        "command": " ".join(command[1:]),
        "returncode": completed.returncode,
        "seconds": time.perf_counter() - started,
        "counts": counts,
        "cases": cases,
        "output_tail": (completed.stdout + completed.stderr)[-3000:],
    }


# -- stage 2: short runs through the trainer -----------------------------------------------------


def _predicted_peak(record: dict[str, Any], config) -> dict[str, int]:
    """The planner's peak for the run ``record`` describes (no reserve: the measured peak is
    what the allocator handed out, without the CUDA context)."""
    from actcomp_dist.memory_model import ActivationSetting, plan_memory
    from actcomp_dist.models import get_model_config

    overrides = dict(config.model.overrides)
    overrides.update(seq_length=config.data.seq_length, vocab_size=record["vocab_size"])
    model = get_model_config(config.model.name, **overrides)
    zero = config.deepspeed.get("zero_optimization", {})
    setting = ActivationSetting(
        micro_batch_size=config.train.micro_batch_size,
        seq_length=config.data.seq_length,
        dtype_bytes=4 if config.train.precision == "fp32" else 2,
        rope_positions=config.data.seq_length,
        efficient_ops=config.memory.efficient_ops,
        loss_chunk_tokens=config.memory.chunked_loss_tokens,
        storage=config.memory.storage_policy,
        device_type=record["device"].split(":")[0],  # "cuda", or "cpu" in a dry run
    )
    plan = plan_memory(
        model,
        config.compression,
        setting,
        ac_mode=config.activation_checkpointing.mode,
        ac_num_layers=config.activation_checkpointing.num_layers,
        precision=config.train.precision,
        zero_stage=zero.get("stage", 0),
        data_parallel=1,
        reserve=0,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
    )
    return {
        "states": plan.states.total,
        "activations": plan.activations.total,
        "transient": plan.transient,
        "total": plan.total,
    }


def _run_overrides(setup: Setup) -> list[str]:
    # One micro-batch per step (the measurement is per step), no evaluation, no checkpoint.
    return [
        *setup.run_overrides,
        "train.eval_interval=0",
        "checkpoint.at_end=false",
        "logging.tensorboard=false",
    ]


def stage_runs(setup: Setup, out: Path, flops_peak: float | None) -> list[dict[str, Any]]:
    from actcomp_dist.ablation import parse_variants
    from actcomp_dist.ablation.orchestrate import AblationPlan, run_ablation
    from actcomp_dist.models import get_model_config
    from actcomp_dist.training.config import read_raw_config, run_config_from_dict

    rows = []
    for config_path in setup.run_configs:
        raw = read_raw_config(ROOT / config_path, setup.run_overrides)
        micro = raw["train"]["micro_batch_size"]
        plan = AblationPlan(
            config_path=ROOT / config_path,
            variants=parse_variants(",".join(VARIANTS)),
            steps=setup.steps,
            out=out / "runs" / Path(config_path).stem,
            overrides=[*_run_overrides(setup), f"train.global_batch_size={micro}"],
        )
        for record in run_ablation(plan, log=_log):
            config = run_config_from_dict(
                json.loads((Path(record["run_dir"]) / "config.json").read_text())
            )
            predicted = _predicted_peak(record, config)
            model = get_model_config(
                config.model.name,
                seq_length=config.data.seq_length,
                vocab_size=record["vocab_size"],
                **config.model.overrides,
            )
            flops = model_flops_per_token(model, config.data.seq_length) * record["tokens_per_s"]
            measured = record["peak_bytes"]
            rows.append(
                {
                    "config": config_path,
                    "variant": record["variant"],
                    "micro_batch_size": config.train.micro_batch_size,
                    "seq_length": config.data.seq_length,
                    "precision": config.train.precision,
                    "peak_bytes": measured,
                    "predicted_peak_bytes": predicted["total"],
                    "predicted_parts": predicted,
                    "peak_error": (predicted["total"] - measured) / measured,
                    "saved_activation_bytes": record["saved_activation_bytes"],
                    "predicted_saved_activation_bytes": record["predicted_saved_activation_bytes"],
                    "tokens_per_s": record["tokens_per_s"],
                    "step_time_s": record["step_time_s"],
                    "tflops": flops / 1e12,
                    "mfu": None if flops_peak is None else flops / flops_peak,
                    "final_loss": record["final_loss"],
                }
            )
    return rows


# -- stage 3: the largest micro-batch ------------------------------------------------------------


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _attempt(setup: Setup, variant, micro_batch: int, out: Path) -> float | None:
    """Tokens/s of a few real steps at ``micro_batch``, or ``None`` when it does not fit."""
    import torch

    from actcomp_dist.ablation.orchestrate import AblationPlan, prepare_runs
    from actcomp_dist.training.trainer import Trainer

    plan = AblationPlan(
        config_path=ROOT / setup.batch_config,
        variants=[variant],
        steps=3,
        out=out,
        overrides=[
            *_run_overrides(setup),
            f"data.seq_length={setup.batch_seq_length}",
            f"train.micro_batch_size={micro_batch}",
            f"train.global_batch_size={micro_batch}",
        ],
        warmup_steps=1,
    )
    (run,) = prepare_runs(plan, log=_log)
    trainer = None
    try:
        trainer = Trainer(run.config)
        history = trainer.train().history
        return statistics.median(r["tokens_per_s"] for r in history[1:] or history)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not _is_out_of_memory(error):
            raise
        return None
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _planned_micro_batch(setup: Setup, variant, gpu_memory: int) -> int:
    from actcomp_dist.memory_model import largest_micro_batch, plan_memory
    from actcomp_dist.models import get_model_config
    from actcomp_dist.training.config import load_run_config
    from actcomp_dist.training.trainer import padded_vocab_size

    config = load_run_config(ROOT / setup.batch_config, setup.run_overrides)
    # The runs train on the embedded corpus (the configs name no data): its vocabulary.
    model = get_model_config(
        config.model.name,
        seq_length=setup.batch_seq_length,
        vocab_size=padded_vocab_size(config.data.embedded_vocab_size, 1),
        **config.model.overrides,
    )
    zero = config.deepspeed.get("zero_optimization", {})

    def plan_for(batch: int):
        setting = variant.activation_setting(
            config.memory,
            batch,
            setup.batch_seq_length,
            dtype_bytes=4 if config.train.precision == "fp32" else 2,
            rope_positions=setup.batch_seq_length,
            device_type="cpu" if setup.dry_run else "cuda",
        )
        return plan_memory(
            model,
            variant.compression(config.compression),
            setting,
            ac_mode=variant.ac_mode,
            precision=config.train.precision,
            zero_stage=zero.get("stage", 0),
            gpu_memory=gpu_memory,
            reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        )

    return largest_micro_batch(plan_for)


def stage_max_batch(setup: Setup, out: Path, gpu_memory: int, deadline: float) -> list[dict]:
    """Per variant: start at the planner's micro-batch, grow by a quarter while it fits, shrink
    by a quarter while it does not; at most ``setup.max_tries`` real attempts each."""
    from actcomp_dist.ablation import parse_variants

    rows = []
    for variant in parse_variants(",".join(MAX_BATCH_VARIANTS)):
        planned = max(1, _planned_micro_batch(setup, variant, gpu_memory))
        tried: dict[int, float | None] = {}
        batch = planned
        while len(tried) < setup.max_tries and batch not in tried and time.time() < deadline:
            _log(f"max_batch {variant.name}: micro-batch {batch} (planner: {planned})")
            tried[batch] = _attempt(setup, variant, batch, out / "max_batch")
            fitting = [b for b, t in tried.items() if t is not None]
            failing = [b for b, t in tried.items() if t is None]
            low = max(fitting, default=0)
            high = min(failing, default=None)
            if high is None:
                batch = low + max(1, math.ceil(low / 4))
            elif low == 0:
                batch = max(1, math.floor(high * 3 / 4))
                if batch in tried:
                    break
            else:
                batch = (low + high) // 2
                if batch == low:
                    break
        fitting = {b: t for b, t in tried.items() if t is not None}
        best = max(fitting, default=None)
        rows.append(
            {
                "variant": variant.name,
                "seq_length": setup.batch_seq_length,
                "planned_micro_batch": planned,
                "largest_fitting_micro_batch": best,
                "tokens_per_s": None if best is None else fitting[best],
                "tried": {str(b): t for b, t in sorted(tried.items())},
                "bounded_above": any(t is None for t in tried.values()),
            }
        )
    return rows


# -- report --------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    from actcomp_dist.training.metrics import format_bytes

    return "-" if n is None else format_bytes(n)


def _pct(x: float | None, sign: str = "+") -> str:
    return "-" if x is None else f"{100 * x:{sign}.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def write_report(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = [
        f"# GPU check: {result['device']}",
        "",
        f"`{result['command']}` — {result['date']}, torch {result['torch']}, "
        f"{'dry run (CPU)' if result['dry_run'] else 'CUDA'}; {result['seconds']:.0f} s.",
        "",
    ]
    stages = result["stages"]
    tests = stages.get("tests", {})
    lines += ["## CUDA tests (`pytest -m gpu`)", ""]
    if "error" in tests or "skipped" in tests:
        lines.append(f"not run: {tests.get('error') or tests.get('skipped')}")
    else:
        c = tests["counts"]
        lines.append(f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
        lines += [f"- `{t['test']}`: {t['outcome']} {t['detail']}" for t in tests["cases"]]
    lines += ["", "## Short runs through the trainer", ""]
    runs = stages.get("runs", {})
    if "rows" in runs:
        lines += [
            "| config | variant | micro-batch x seq | peak | predicted peak | error | "
            "saved activations | tokens/s | TFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs["rows"]:
            lines.append(
                f"| {Path(r['config']).stem} | {r['variant']} | {r['micro_batch_size']} x "
                f"{r['seq_length']} | {_bytes(r['peak_bytes'])} | "
                f"{_bytes(r['predicted_peak_bytes'])} | {_pct(r['peak_error'])} | "
                f"{_bytes(r['saved_activation_bytes'])} | {r['tokens_per_s']:.0f} | "
                f"{r['tflops']:.1f} | {_pct(r['mfu'], '')} |"
            )
    else:
        lines.append(f"not run: {runs.get('error') or runs.get('skipped')}")
    lines += ["", "## Largest micro-batch", ""]
    batch = stages.get("max_batch", {})
    if "rows" in batch:
        lines += [
            "| variant | seq | planner | largest that ran | tokens/s there | tried (tokens/s; - = OOM) |",
            "|---|---|---|---|---|---|",
        ]
        for r in batch["rows"]:
            tried = ", ".join(f"{b}: {_num(t)}" for b, t in r["tried"].items())
            bound = "" if r["bounded_above"] else " (no OOM seen: a lower bound)"
            lines.append(
                f"| {r['variant']} | {r['seq_length']} | {r['planned_micro_batch']} | "
                f"{r['largest_fitting_micro_batch']}{bound} | "
                f"{_num(r['tokens_per_s'])} | {tried} |"
            )
    else:
        lines.append(f"not run: {batch.get('error') or batch.get('skipped')}")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (for CI)")
    parser.add_argument("--out", help="default: results/gpu/<device name>/")
    parser.add_argument("--steps", type=int, help="steps per run (default 20; dry run 3)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time budget (default 480)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument(
        "--stages", default="tests,runs,max_batch", help="comma-separated subset to run"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' start-up warnings that actcomp_dist/training/quiet.py filters",
    )
    args = parser.parse_args(argv)
    from actcomp_dist.training.quiet import quiet_third_party

    quiet_third_party(args.verbose)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: no CUDA device is visible; run on a GPU machine, or pass --dry-run for the "
            "CPU check of the same code path",
            file=sys.stderr,
        )
        return 2
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - {"tests", "runs", "max_batch"})
    if unknown:
        print(
            f"error: --stages {unknown} unknown; choose from tests, runs, max_batch",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    setup = Setup(args.dry_run, args.steps)
    name = device_name(args.dry_run)
    out = Path(args.out) if args.out else ROOT / "results" / "gpu" / _slug(name)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.budget_s
    if torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu_memory = 2 * 2**30  # the dry run plans against a small pretend device
    result: dict[str, Any] = {
        "device": name,
        "dry_run": args.dry_run,
        "command": "python tools/gpu_check.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "gpu_memory_bytes": gpu_memory,
        "peak_flops": peak_flops(name, args.peak_tflops),
        "stages": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for stage in stages:
        if time.time() > deadline:
            result["stages"][stage] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        _log(f"stage {stage}")
        stage_started = time.perf_counter()
        try:
            if stage == "tests":
                value = stage_tests(out, timeout_s=max(60.0, deadline - time.time()))
            elif stage == "runs":
                value = {"rows": stage_runs(setup, scratch, result["peak_flops"])}
            else:
                value = {"rows": stage_max_batch(setup, scratch, gpu_memory, deadline)}
        except Exception as error:  # recorded: one failing stage must not hide the others
            value = {"error": f"{type(error).__name__}: {error}"}
            _log(f"stage {stage} failed: {value['error']}")
        value["seconds"] = time.perf_counter() - stage_started
        result["stages"][stage] = value
        result["seconds"] = time.time() - started
        write_report(result, out)  # after every stage: a time-out still leaves the rest
    result["seconds"] = time.time() - started
    write_report(result, out)
    _log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    failed = [s for s, v in result["stages"].items() if "error" in v]
    tests = result["stages"].get("tests", {})
    if tests.get("counts", {}).get("failed"):
        failed.append("tests")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
