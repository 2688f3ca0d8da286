"""What a person reads and what the loggers keep: the progress line, the end-of-run summary,
interval means in metrics.jsonl, a resume that changes the schedule, a weighted data blend,
model flops, and the TensorBoard / W&B loggers on resume.

References: closed forms (flops per token, tokens seen, ``fsum`` of the steps' losses over the
interval: the same float operations as the trainer's, so equality is exact), the values written
in the test, and the run's own per-step history. The end-to-end test runs 2 gloo ranks forked by
:func:`tests.helpers.distributed.run_distributed` on the small corpus of ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from actcomp_dist.training.config import parse_blend, run_config_from_dict
from actcomp_dist.training.flops import model_flops_per_token, peak_flops
from actcomp_dist.training.metrics import MetricsLogger, format_duration
from actcomp_dist.training.schedule import learning_rate
from tests.helpers.distributed import run_distributed
from tests.helpers.runs import read_metrics, tiny_config


def test_progress_line_names_each_value():
    cpu = {
        "step": 40,
        "loss": 5.12344,
        "interval_steps": 10,
        "lr": 3e-4,
        "grad_norm": 0.5,
        "tokens_per_s": 12345.4,
        "step_time_s": 0.25,
        "elapsed_s": 3725.0,
        "eta_s": 90061.0,
        "saved_activation_bytes": 3 * 2**20,
        "peak_rss_bytes": 2**30,
    }
    assert MetricsLogger.format(cpu, total_steps=100) == (
        "step 40/100 | elapsed 1:02:05, eta 1 days, 1:01:01 | loss 5.1234 (mean of 10 steps) | "
        "lr 3.00e-04 | grad_norm 0.500 | 12345 tok/s | 250 ms/step | saved act 3.0 MiB | "
        "peak RSS 1.0 GiB"
    )
    gpu = {
        "step": 1,
        "loss": float("nan"),
        "mfu": 0.4123,
        "allocated_bytes": 2**30,
        "reserved_bytes": 2 * 2**30,
        "peak_allocated_bytes": 3 * 2**30,
        "peak_bytes": 3 * 2**30,
    }
    assert MetricsLogger.format(gpu) == (
        "step 1 | loss nan | MFU 41.2% | GPU mem allocated 1.0 GiB, reserved 2.0 GiB, peak "
        "allocated 3.0 GiB"
    )
    assert format_duration(59.6) == "0:01:00"


def test_model_flops_per_token_is_6p_plus_12lhs():
    from actcomp_dist.models import get_model_config, parameter_count

    config = get_model_config("tiny", seq_length=128, vocab_size=512)
    expected = 6 * parameter_count(config) + 12 * config.num_layers * config.hidden_size * 128
    assert model_flops_per_token(config, 128) == expected
    assert (
        peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    )
    assert peak_flops("cpu") is None and peak_flops("cpu", override_tflops=2.0) == 2e12


# -- end to end: interval means, summary, a resume that changes the schedule, a blend -----------


def _run_rank(rank: int, world_size: int, raws: list[dict]) -> list[dict]:
    """Each config in turn through ``run_pretraining``; this rank's history and stdout."""
    from actcomp_dist.training.trainer import run_pretraining

    out = []
    for raw in raws:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            result = run_pretraining(run_config_from_dict(raw))
        out.append({"history": result.history, "stdout": stdout.getvalue()})
    return out


@pytest.mark.distributed
def test_interval_means_summary_and_a_changed_schedule_on_resume(tmp_path, corpus):
    """4 steps logged every 2 on a 0.3/0.7 blend of two copies of the corpus, then a resume
    from step 4 to step 6 with another peak lr. Each record's loss is the mean of its two
    steps' losses; tokens, flops and memory are in every record; the resume's changes are in
    the first record it logs and in its output; only rank 0 prints."""
    prefix = corpus[0].split("=", 1)[1]
    prefix = json.loads(prefix)[0]
    copy = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, str(copy) + suffix)
    blend = json.dumps(["0.3", prefix, "0.7", str(copy)])
    run_dir = tmp_path / "run"
    base = [f"data.paths={blend}", corpus[1], "logging.interval=2", "train.eval_interval=0"]
    first = tiny_config(run_dir, [], *base, "train.steps=4")
    resumed = tiny_config(
        run_dir, [], *base, "train.steps=6", "train.lr=0.002", "checkpoint.resume=latest"
    )
    ranks = run_distributed(_run_rank, 2, tmp_path, [first, resumed], timeout=300)
    history = ranks[0][0]["history"] + ranks[0][1]["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    # Saved activations and model states are measured on each run's first two steps, the
    # logged steps (every 2) and the last; step 3 runs without the hooks and has neither key.
    measured = [r["step"] for r in history if "saved_activation_bytes" in r]
    assert measured == [1, 2, 4, 5, 6]
    assert [r["step"] for r in history if "model_state_bytes" in r] == measured
    assert len({r["saved_activation_bytes"] for r in history if r["step"] in measured}) == 1
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6]
    config = run_config_from_dict(resumed)
    tokens_per_step = config.train.global_batch_size * config.data.seq_length
    from actcomp_dist.models import get_model_config

    model = get_model_config("tiny", seq_length=config.data.seq_length, vocab_size=512)
    flops = model_flops_per_token(model, config.data.seq_length)
    for record in records:
        steps = history[record["step"] - 2 : record["step"]]
        assert record["interval_steps"] == 2
        assert record["loss"] == math.fsum(r["loss"] for r in steps) / 2
        # The trainer's float64 arithmetic in another order: a few roundings (~1e-16) apart.
        assert record["step_time_s"] == pytest.approx(
            sum(r["step_time_s"] for r in steps) / 2, rel=1e-12
        )
        assert record["tokens"] == record["step"] * tokens_per_step
        assert record["tokens_per_s"] == pytest.approx(
            tokens_per_step / record["step_time_s"], rel=1e-12
        )
        # Per device: the whole model's flops over 2 ranks.
        assert record["model_tflops_per_s"] == pytest.approx(
            record["tokens_per_s"] * flops / 1e12 / 2, rel=1e-12
        )
        assert "mfu" not in record  # no peak for a CPU
        assert record["peak_rss_bytes"] == record["peak_bytes"] > 0
        assert record["elapsed_s"] > 0 and record["time"] > 1.7e9
    assert records[0]["time"] < records[1]["time"] < records[2]["time"]
    changed = {"train.steps": [4, 6], "train.lr": [0.003, 0.002]}
    assert [r.get("resume_changed") for r in records] == [None, None, changed]

    out0, out1 = ranks[0][0]["stdout"], ranks[0][1]["stdout"]
    assert "step 2/4 | elapsed " in out0 and "(mean of 2 steps)" in out0
    assert f"done: step 4/4, 4 steps this run ({4 * tokens_per_step:,} tokens)" in out0
    assert f"checkpoint: {run_dir / 'checkpoints' / 'step_0000004'}" in out0
    assert f"metrics: {run_dir / 'metrics.jsonl'}" in out0
    assert (
        "warning: resumed from step 4 with changed settings: train.steps 4 -> 6, "
        "train.lr 0.003 -> 0.002" in out1
    )
    assert "done: step 6/6, 2 steps this run" in out1
    # Rank 1 says none of it (DeepSpeed's own start-up lines aside).
    for part in ranks[1]:
        for ours in ("step ", "done:", "warning:", "saved checkpoint", "resumed from"):
            assert ours not in part["stdout"], part["stdout"]
    # The resumed steps follow the new schedule from the first one (closed form).
    for record in history[4:]:
        # The same closed form in float64: a few roundings apart at most.
        assert record["lr"] == pytest.approx(
            learning_rate(record["step"] - 1, config.train), rel=1e-12
        )


def test_weighted_blend_draws_samples_in_proportion(tmp_path, corpus):
    """``["0.3", A, "0.7", B]`` through megatron-core's blended dataset: of N samples, within
    one of 0.3 N come from A (its greedy blending keeps every prefix of the order within one
    sample of the weights)."""
    from actcomp_dist.data.datasets import build_gpt_datasets
    from actcomp_dist.data.tokenizer import load_tokenizer

    prefix = json.loads(corpus[0].split("=", 1)[1])[0]
    copy = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, str(copy) + suffix)
    prefixes, weights = parse_blend(["0.3", prefix, "0.7", str(copy)])
    train, _ = build_gpt_datasets(
        prefixes,
        load_tokenizer(corpus[1].split("=", 1)[1]),
        seq_length=64,
        seed=3,
        split="100,0,0",
        train_samples=500,
        valid_samples=0,
        cache_dir=tmp_path / "cache",
        weights=weights,
    )
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert len(ids) == 500
    assert abs(int((ids == 0).sum()) - 0.3 * 500) <= 1


# -- loggers on resume --------------------------------------------------------------------------


def _log_steps(run_dir: Path, steps, loss: float, resume_step=None, **backends) -> None:
    logger = MetricsLogger(run_dir, enabled=True, resume_step=resume_step, **backends)
    with contextlib.redirect_stdout(io.StringIO()):
        for step in steps:
            logger.log({"step": step, "loss": loss})
    logger.close()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed"
)
def test_tensorboard_purges_the_steps_after_the_checkpoint(tmp_path):
    """Steps 1-4 logged, the run resumed from step 2: TensorBoard shows steps 1-2 from the
    first run and 3-4 from the resumed one, each once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_steps(tmp_path, [1, 2, 3, 4], 1.0, tensorboard=True)
    _log_steps(tmp_path, [3, 4], 2.0, resume_step=2, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    seen = [(e.step, e.value) for e in events.Scalars("loss")]
    assert seen == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_is_continued_on_resume(tmp_path, monkeypatch):
    """Offline W&B needs no network; a resumed run logs into the same W&B run (its id kept in
    RUN_DIR/wandb_run_id)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    section = {"project": "test", "name": "run", "mode": "offline"}
    _log_steps(tmp_path, [1, 2], 1.0, wandb=section)
    first_id = (tmp_path / "wandb_run_id").read_text().strip()
    _log_steps(tmp_path, [3], 2.0, resume_step=2, wandb=section)
    assert (tmp_path / "wandb_run_id").read_text().strip() == first_id
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first_id}"))
    assert runs and all((run / f"run-{first_id}.wandb").is_file() for run in runs)
