"""``launch/slurm/pretrain.sbatch`` as a SLURM job runs it, on this machine.

``srun`` and ``scontrol`` are replaced by stand-ins on ``PATH`` that do what SLURM does for a
one-node job (``scontrol show hostnames`` lists the node; ``srun`` starts the task once with
``SLURM_NODEID=0``); everything else is real: the batch script, ``node_launch.sh``, DeepSpeed's
per-node launcher and two CPU ranks training the tiny config. The overrides carry quotes,
spaces and JSON, and must reach ``pretrain.py`` byte for byte (the resolved ``config.json``
shows what arrived).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actcomp_dist.data.corpus import ensure_embedded_corpus
from tests.helpers.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]

FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's own options, run the one task as node 0.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo localhost ;;
    requeue*) echo "$2" >> "$REQUEUE_LOG" ;;
    *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_sbatch_passes_quoted_overrides_through_byte_for_byte(tmp_path):
    # Data and run directory whose names need quoting in any shell.
    awkward = tmp_path / "my 'corpus' dir"
    built = ensure_embedded_corpus(tmp_path / "corpus", vocab_size=512, max_bytes=60_000)
    awkward.mkdir()
    prefix = awkward / "docs"
    for suffix in (".bin", ".idx"):
        shutil.copy(built.data_prefix + suffix, str(prefix) + suffix)
    run_dir = tmp_path / "run $HOME dir"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHON=sys.executable,
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_GPUS_ON_NODE="2",
        MASTER_PORT=str(free_port()),
        REQUEUE_LOG=str(tmp_path / "requeued"),
        OMP_NUM_THREADS="1",
    )
    overrides = [
        f"run_dir={run_dir}",
        f"data.paths={json.dumps([str(prefix)])}",
        f"data.tokenizer={built.tokenizer_model}",
        "train.steps=2",
        "train.eval_interval=0",
        "checkpoint.interval=0",
    ]
    command = ["bash", "launch/slurm/pretrain.sbatch", "configs/tiny_compact.json"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["data"]["paths"] == [str(prefix)]
    assert resolved["run_dir"] == str(run_dir)
    assert resolved["checkpoint"]["resume"] == "latest"  # the script's own override
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps[-1] == 2
    assert not (tmp_path / "requeued").exists()  # not preempted: no requeue
