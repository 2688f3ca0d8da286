"""kill -9 of a rank mid-step and mid-save, then a resume that repeats the run bit for bit.

Real 2-rank runs (gloo ranks forked by :func:`tests.helpers.distributed.run_distributed`, the launcher's
own ``main``, the ``compact`` model of ``tests/helpers/runs.py``: 6 steps, a checkpoint every
2, resampling every 2, validation at 3 and 6). Rank 1 sends itself SIGKILL — no handler, no
``finally``, what the OOM killer or a node failure does — at a chosen point; the harness then
kills rank 0, which waits in a collective. ``checkpoint.resume=latest`` then finishes the run in
the same directory. The reference: the same config run uninterrupted; on CPU every step is
deterministic, so any difference in loss, lr, gradient norm or validation loss is a resume bug.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training.config import load_run_config
from tests.helpers.distributed import DistributedError, run_distributed
from tests.helpers.run_files import tree_hashes
from tests.helpers.runs import compared_fields, read_metrics, tiny_config


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_mid_step(trainer, rank: int) -> None:
    """Rank 1 dies in the forward pass of step 4 (steps 1-3 applied, step 2 saved)."""
    if rank == 1:
        trainer.model.register_forward_pre_hook(lambda *_: _die() if trainer.step == 3 else None)


def _kill_mid_save(trainer, rank: int) -> None:
    """Rank 1 dies while DeepSpeed writes its optimizer shard of step 4: the file is left
    half-written (its first bytes), every other file of the save may or may not exist."""
    if rank == 1:
        save = torch.save

        def torn_save(obj, path, *args, **kwargs):
            if ckpt.checkpoint_name(4) in str(path):
                with open(path, "wb") as stream:
                    stream.write(b"PK\x03\x04 torn")
                _die()
            return save(obj, path, *args, **kwargs)

        torch.save = torn_save


FAULTS = {"mid_step": _kill_mid_step, "mid_save": _kill_mid_save}


def _run(config, fault: str | None):
    from actcomp_dist.training.trainer import Trainer

    trainer = Trainer(config)
    try:
        if fault is not None:
            FAULTS[fault](trainer, torch.distributed.get_rank())
        return trainer.train()
    finally:
        trainer.close()


def _main(config_file: str, fault: str | None = None) -> dict:
    from actcomp_dist.training.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--config", config_file], run=functools.partial(_run, fault=fault))
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _killed_rank(rank: int, world_size: int, config_file: str, fault: str) -> dict:
    return _main(config_file, fault)  # rank 1 never returns; rank 0 is killed by the harness


def _finish_rank(rank: int, world_size: int, config_files: list[str]) -> list[dict]:
    return [_main(config_file) for config_file in config_files]


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_mid_step_and_mid_save_resume_bit_identically(tmp_path, corpus):
    """After each kill: the newest complete checkpoint is step 2 (``latest`` names it), the
    interrupted save of step 4 has no marker, and no file of step 2 changed. The resumed run
    (which takes over the dead run's lock) finishes with exit 0, and metrics.jsonl of the whole
    interrupted run equals the uninterrupted run's bit for bit, each step once."""
    files = {}
    for name in ("reference", *FAULTS):
        raw = tiny_config(
            tmp_path / name, corpus, "checkpoint.interval=2", "checkpoint.resume=latest"
        )
        files[name] = str(tmp_path / f"{name}.json")
        Path(files[name]).write_text(json.dumps(raw))

    step_2_files = {}
    for fault in FAULTS:
        with pytest.raises(DistributedError) as error:
            run_distributed(_killed_rank, 2, tmp_path, files[fault], fault, timeout=300)
        assert "process died without reporting (exit code -9)" in error.value.failures[1]
        checkpoints = tmp_path / fault / "checkpoints"
        assert [p.name for p in ckpt.complete_checkpoints(checkpoints)] == ["step_0000002"]
        assert (checkpoints / "latest").read_text() == "step_0000002/step_0000002"
        step_2 = checkpoints / "step_0000002"
        step_2_files[fault] = tree_hashes(step_2)
        assert json.loads((step_2 / ckpt.MARKER).read_text())["format_version"] == 1
        if fault == "mid_save":
            torn = checkpoints / "step_0000004"
            assert torn.is_dir() and not (torn / ckpt.MARKER).exists()

    ranks = run_distributed(_finish_rank, 2, tmp_path, list(files.values()), timeout=300)
    for rank, results in enumerate(ranks):
        for name, result in zip(files, results, strict=True):
            assert result["code"] == 0, (name, rank, result["stderr"])
    reference = read_metrics(tmp_path / "reference")
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    for fault in FAULTS:
        assert compared_fields(read_metrics(tmp_path / fault)) == compared_fields(reference), fault
        assert (
            f"resumed from {tmp_path / fault / 'checkpoints' / 'step_0000002'}"
            in (ranks[0][list(files).index(fault)]["stdout"])
        )
        # Step 2's files were read, not rewritten; the torn step 4 was replaced by a good one.
        checkpoints = tmp_path / fault / "checkpoints"
        assert tree_hashes(checkpoints / "step_0000002") == step_2_files[fault]
        names = [p.name for p in ckpt.complete_checkpoints(checkpoints)]
        assert names == ["step_0000002", "step_0000004", "step_0000006"]
        compression = load_run_config(files[fault]).compression.to_dict()
        ckpt.verify_checkpoint(checkpoints / "step_0000004", compression)
