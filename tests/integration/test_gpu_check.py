"""``tools/gpu_check.py --dry-run``: the GPU check's whole code path on the CPU, so the script a
lent GPU runs for a few minutes cannot rot between GPU sessions (CI runs this)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "tools/gpu_check.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_measures_every_stage_and_writes_the_report(tmp_path):
    result = _run("--dry-run", "--steps", "2", "--out", str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"tests", "runs", "max_batch"}
    assert not [name for name, stage in stages.items() if "error" in stage], stages
    # The CUDA tests were collected and ran (each skips on a CPU machine).
    counts = stages["tests"]["counts"]
    assert counts["failed"] == 0 and counts["skipped"] >= 5
    # Every variant ran through the trainer; saved bytes are exact against the analytic model
    # on any device, and the planner's peak is within the 5% the GPU check reports against.
    rows = stages["runs"]["rows"]
    assert [r["variant"] for r in rows] == [
        "none",
        "ac_selective",
        "ac_full",
        "compact:0.25",
        "int8",
        "fp8",
        "ac_lowrank:0.0625",
    ]
    for row in rows:
        assert row["saved_activation_bytes"] == row["predicted_saved_activation_bytes"], row
        assert abs(row["peak_error"]) < 0.05, row
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no known peak rate on a CPU
    # The micro-batch search tried real steps and found at least one size that runs.
    for row in stages["max_batch"]["rows"]:
        assert row["largest_fitting_micro_batch"] >= 1, row
        assert len(row["tried"]) <= 2, row
    text = (tmp_path / "results.md").read_text()
    assert "## Largest micro-batch" in text and "compact:0.25" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    result = _run("--out", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "no CUDA device is visible" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results.json").exists()
