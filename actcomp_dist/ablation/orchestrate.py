"""Plan and run an ablation: every variant, every repeat, the same model, data and init.

Fairness rules:

- **Same model, data and initialisation**: each run is the base config with only the variant's
  settings changed (:meth:`Variant.apply`); ``train.seed`` fixes the weight init and the data
  order, and with no ``data.paths`` the embedded corpus is built once in ``OUT/data`` and every
  run reads that copy.
- **Time ratios from one session**: runs of one repeat go through all variants back to back;
  odd repeats go in reverse order, so a slow drift of the machine (thermal, other jobs) falls
  on both sides of every ratio. The report gives each ratio per repeat and their spread.
- **Nothing is reused between runs**: each run has its own ``run_dir`` under ``OUT/runs`` (old
  ones of the same variants are removed first), no checkpoint is resumed, and checkpoints are
  deleted after the run (the ablation does not need them).

``nproc == 1`` runs in this process (one process group, created once); ``nproc > 1`` starts the
``deepspeed`` launcher for each run with :mod:`actcomp_dist.ablation.worker` and streams its
output.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actcomp_dist.ablation.variants import Variant, VariantError, check_variant_fits_model
from actcomp_dist.training.config import (
    ConfigError,
    DataSection,
    RunConfig,
    read_raw_config,
    run_config_from_dict,
    validate_run,
    with_plugins,
)
from actcomp_dist.training.metrics import format_bytes


class AblationError(RuntimeError):
    """A run failed; the message names the variant, the command and its log."""


@dataclass
class Run:
    variant: Variant
    repeat: int
    config: RunConfig
    raw: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


@dataclass
class AblationPlan:
    config_path: Path
    variants: list[Variant]
    steps: int
    out: Path
    overrides: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # --plugin: added to the config's list
    nproc: int = 1
    repeats: int = 1
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "nproc", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name}={value!r} must be an int >= 1")
        if self.warmup_steps is None:
            # The first steps pay one-time costs (allocator growth, lazy init): skip a few.
            self.warmup_steps = min(5, self.steps // 4)
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"--warmup-steps={self.warmup_steps} must be in [0, --steps={self.steps})"
            )


def load_base_raw(plan: AblationPlan) -> dict[str, Any]:
    raw = with_plugins(read_raw_config(plan.config_path, plan.overrides), plan.plugins)
    run_config_from_dict(raw, source=str(plan.config_path))  # the base itself must be valid
    return raw


def _shared_data(raw: dict[str, Any], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Point every run at one copy of the data (the embedded corpus is built once here)."""
    data = raw.setdefault("data", {})
    if data.get("paths"):
        return raw
    from actcomp_dist.data.corpus import ensure_embedded_corpus

    vocab = data.get("embedded_vocab_size", DataSection().embedded_vocab_size)
    log(f"building / reusing the embedded corpus in {out / 'data'} (vocabulary {vocab})")
    corpus = ensure_embedded_corpus(out / "data", vocab_size=vocab)
    data["paths"] = [corpus.data_prefix]
    data["tokenizer"] = str(corpus.tokenizer_model)
    return raw


def _run_raw(plan: AblationPlan, base: dict[str, Any], variant: Variant, repeat: int) -> dict:
    raw = variant.apply(base)
    run_dir = plan.out / "runs" / variant.slug / f"repeat{repeat}"
    raw["run_dir"] = str(run_dir)
    checkpoint = raw.setdefault("checkpoint", {})
    checkpoint.update({"dir": str(run_dir / "checkpoints"), "resume": None, "interval": 0})
    train = raw.setdefault("train", {})
    train["steps"] = plan.steps
    if not train.get("eval_interval"):
        train["eval_interval"] = plan.steps  # at least the final validation loss
    logging = raw.setdefault("logging", {})
    logging["tensorboard"] = False
    if not any(o.startswith("logging.interval=") for o in plan.overrides):
        logging["interval"] = max(1, plan.steps // 10)
    return raw


def prepare_runs(
    plan: AblationPlan, log: Callable[[str], None] = print, build_data: bool = True
) -> list[Run]:
    """Every run in execution order, each config validated before anything trains (and
    before the shared data is built)."""
    base = load_base_raw(plan)
    runs = _make_runs(plan, base)
    if build_data and not base.get("data", {}).get("paths"):
        runs = _make_runs(plan, _shared_data(copy.deepcopy(base), plan.out, log))
    return runs


def _make_runs(plan: AblationPlan, base: dict[str, Any]) -> list[Run]:
    runs = []
    for repeat in range(plan.repeats):
        order = plan.variants if repeat % 2 == 0 else list(reversed(plan.variants))
        for variant in order:
            raw = _run_raw(plan, base, variant, repeat)
            source = f"{plan.config_path} with variant {variant.name!r}"
            config = run_config_from_dict(raw, source=source)
            try:
                validate_run(config, plan.nproc)
            except ConfigError as err:
                raise ConfigError(f"variant {variant.name!r}: {err}") from None
            if repeat == 0:
                _check_model_shape(variant, config)
            runs.append(Run(variant, repeat, config, raw))
    return runs


def _check_model_shape(variant: Variant, config: RunConfig) -> None:
    from actcomp_dist.models import get_model_config

    overrides = dict(config.model.overrides)
    overrides.setdefault("seq_length", config.data.seq_length)
    try:
        model = get_model_config(config.model.name, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    check_variant_fits_model(variant, config.compression, model)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_launcher() -> str:
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if found is None:
        raise AblationError("--nproc > 1 needs the deepspeed launcher, which was not found")
    return found


def _run_launched(run: Run, plan: AblationPlan, log: Callable[[str], None]) -> dict[str, Any]:
    from actcomp_dist.ablation import worker

    run.run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run.run_dir / "run_config.json"
    config_file.write_text(json.dumps(run.raw, indent=2))
    record_file = run.run_dir / "record.json"
    command = [
        _deepspeed_launcher(),
        "--master_port",
        str(_free_port()),
        "--num_gpus",
        str(plan.nproc),
        worker.__file__,
        "--config",
        str(config_file),
        "--out",
        str(record_file),
        "--warmup-steps",
        str(plan.warmup_steps),
    ]
    log_file = run.run_dir / "launcher.log"
    with open(log_file, "w") as sink:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
        )
        for line in process.stdout:
            sink.write(line)
            log("    | " + line.rstrip())
        process.wait()
    if process.returncode != 0 or not record_file.is_file():
        raise AblationError(
            f"variant {run.variant.name!r} (repeat {run.repeat}) failed with exit code "
            f"{process.returncode}; command: {' '.join(command)}; log: {log_file}"
        )
    return json.loads(record_file.read_text())


def run_ablation(plan: AblationPlan, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every variant ``plan.repeats`` times; returns one record per run."""
    runs = prepare_runs(plan, log)
    for variant in plan.variants:
        shutil.rmtree(plan.out / "runs" / variant.slug, ignore_errors=True)
    records = []
    started = time.perf_counter()
    for index, run in enumerate(runs, 1):
        log(
            f"[{index}/{len(runs)}] repeat {run.repeat + 1}/{plan.repeats}: {run.variant.name} "
            f"on {plan.nproc} process(es), {plan.steps} steps -> {run.run_dir}"
        )
        load_before = os.getloadavg()[0]
        if plan.nproc == 1:
            from actcomp_dist.ablation.runner import train_and_measure

            record = train_and_measure(run.config, plan.warmup_steps)
        else:
            record = _run_launched(run, plan, log)
        record.update(
            {
                "variant": run.variant.name,
                "method": run.variant.method,
                "argument": run.variant.argument,
                "ac_mode": run.variant.ac_mode,
                "efficient_ops": run.variant.efficient_ops,
                "storage": run.variant.storage,
                "grad_mode": run.config.compression.grad_mode,
                "repeat": run.repeat,
                "order": index,
                "nproc": plan.nproc,
                "run_dir": str(run.run_dir),
                # The machine's 1-minute load average before and after the run (step times on
                # a shared machine mean little without it).
                "load_average": [load_before, os.getloadavg()[0]],
            }
        )
        records.append(record)
        elapsed = time.perf_counter() - started
        log(
            f"    {run.variant.name}: saved {format_bytes(record['saved_activation_bytes'])} per "
            f"micro-batch | peak {format_bytes(record['peak_bytes'])} | "
            f"{record['step_time_s'] * 1e3:.1f} ms/step (median) | "
            f"{record['tokens_per_s']:.0f} tok/s | final loss {record['final_loss']:.4f} | "
            f"val loss {_fmt(record['val_loss'])} | {record['wall_s']:.1f} s "
            f"(total {elapsed:.0f} s, about {elapsed / index * (len(runs) - index):.0f} s left)"
        )
    return records


def describe(plan: AblationPlan, records: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """What the report says about the set-up: model, data, device, software, the command."""
    import platform

    import deepspeed
    import torch

    config = prepare_runs(plan, log=lambda _: None, build_data=False)[0].config
    first = records[0]
    train, data = config.train, config.data
    tokens = train.global_batch_size * data.seq_length
    if data.paths:
        data_text = f"indexed dataset {', '.join(data.prefixes)}"
    else:
        corpus = plan.out / "data"
        data_text = f"the embedded corpus (Python standard-library docstrings) built in {corpus}"
    if first["device"].startswith("cuda"):
        device = f"{torch.cuda.get_device_name(0)} x {plan.nproc}"
        peak_source = "`torch.cuda.max_memory_allocated` over the whole run"
    else:
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        device = (
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
            f"{plan.nproc} process(es) x {threads} thread(s)"
        )
        peak_source = (
            "MemTracker's total at the peak of one extra optimizer step after training "
            "(parameters, gradients, optimizer state, activations, temporaries incl. "
            "DeepSpeed's gradient bucket)"
        )
    model = (
        f"LLaMA `{config.model.name}` ({first['parameters']:,} parameters, "
        f"{first['num_layers']} blocks, vocabulary {first['vocab_size']})"
    )
    overrides = f" with {', '.join(plan.overrides)}" if plan.overrides else ""
    loads = [load for record in records for load in record.get("load_average", ())]
    load_text = (
        f" 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs "
        f"({os.cpu_count()} cores)."
        if loads
        else ""
    )
    return {
        "title": (
            f"{config.model.name} model, seq {data.seq_length}, {plan.steps} steps, "
            f"{plan.repeats} repeat(s), {first['device'].split(':')[0].upper()}"
        ),
        "setup": [
            f"Model: {model}; precision {train.precision}; compressed sites "
            f"{', '.join(config.compression.sites)}; ZeRO stage "
            f"{config.deepspeed.get('zero_optimization', {}).get('stage', 0)}.",
            f"Base config: `{plan.config_path}`{overrides}.",
            f"Data: {data_text}; sequence length {data.seq_length}, micro-batch "
            f"{train.micro_batch_size}, global batch {train.global_batch_size} "
            f"({tokens:,} tokens per step), {plan.steps} steps, lr {train.lr} "
            f"({train.lr_decay}, {train.warmup_steps} warm-up steps), seed {train.seed}.",
            f"Device: {device}; torch {torch.__version__}, deepspeed {deepspeed.__version__}."
            f"{load_text}",
        ],
        "peak_source": peak_source,
        "warmup_steps": plan.warmup_steps,
        "command": command,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


__all__ = [
    "AblationError",
    "AblationPlan",
    "Run",
    "VariantError",
    "describe",
    "prepare_runs",
    "run_ablation",
]
