"""``apply_memory_policy`` and ``ScheduleCallback`` under the HF ``Trainer``'s DeepSpeed
integration (``TrainingArguments(deepspeed=...)``: accelerate builds a real
``DeepSpeedEngine``), ZeRO stage 2, DeepSpeed's ``Adam`` with ``torch_adam`` (no compiled op),
one CPU process on gloo.

Reference: the uninterrupted run, as in tests/unit/test_hf_trainer.py. The projections resample
every 2 optimizer steps; resuming from ``checkpoint-3`` (DeepSpeed's engine checkpoint:
ZeRO-partitioned optimizer state, and the callback's ``actcomp_schedule.json``) must give the
uninterrupted run's losses for steps 4-6 exactly (same weights, optimizer state, data order and
projections), and the schedule must have advanced once per optimizer step; resuming without
the callback must not (its projections from step 4 on differ).

The run happens in a subprocess (``python -m tests.integration.test_hf_trainer_deepspeed OUT``): it
initialises ``torch.distributed``, which must not leak into the other tests of this session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

ZERO_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "Adam", "params": {"lr": "auto", "torch_adam": True}},
}


def _run(out: Path) -> dict:
    import torch

    from actcomp_dist.hf import ScheduleCallback
    from actcomp_dist.layers import find_schedule
    from tests.helpers.hf_trainer import logged_losses, make_trainer

    def trainer(callbacks):
        return make_trainer(out, callbacks, deepspeed=ZERO_CONFIG, use_cpu=False)

    full = trainer([ScheduleCallback()])
    full.train()
    engine_class = type(full.model_wrapped).__name__
    expected = logged_losses(full)
    schedule_step = find_schedule(full.model).step
    checkpoint = out / "checkpoint-3"
    resumed = trainer([ScheduleCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    unscheduled = trainer([])
    unscheduled.train(resume_from_checkpoint=str(checkpoint))
    return {
        "engine": engine_class,
        "zero_stage": full.model_wrapped.zero_optimization_stage(),
        "expected": expected,
        "resumed": logged_losses(resumed),
        "unscheduled": logged_losses(unscheduled),
        "schedule_step": schedule_step,
        "schedule_file": (checkpoint / "actcomp_schedule.json").is_file(),
        "torch": torch.__version__,
    }


def test_deepspeed_zero2_trainer_resumes_the_schedule(tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        HF_HUB_OFFLINE="1",
    )
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_hf_trainer_deepspeed", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 2
    expected = {int(k): v for k, v in result["expected"].items()}
    resumed = {int(k): v for k, v in result["resumed"].items()}
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert result["schedule_step"] == 6  # once per optimizer step (2 micro-batches each)
    assert result["schedule_file"]
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: expected[s] for s in (4, 5, 6)}
    # Without the callback the resumed run draws other projections from step 4 on.
    assert result["unscheduled"]["5"] != result["expected"]["5"]


def _main(out: str) -> None:
    import socket

    import deepspeed

    with socket.socket() as s:  # a free port for the one-process gloo group
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    result = _run(Path(out))
    (Path(out) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1])
