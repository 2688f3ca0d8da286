"""A write that fails mid-save (disk full) stops every rank cleanly; the run then resumes.

Real 2-rank runs (gloo ranks forked by :func:`tests.helpers.distributed.run_distributed`, the launcher's
own ``main``, the ``compact`` model of ``tests/helpers/runs.py``, ZeRO 1, a checkpoint every 2
steps). The fault is injected where the bytes are written: ``torch.save`` in rank 1 (used by
DeepSpeed's checkpoint engine for its optimizer shard, and by the trainer) raises what a full
disk raises, for the files of step 4 only. The space check before a save passes (the disk
"fills" during the save). References: the uninterrupted run's metrics, the checkpoint files of
step 2 before the failure.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
from pathlib import Path

import pytest
import torch

from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training.config import load_run_config
from tests.helpers.distributed import run_distributed
from tests.helpers.runs import compared_fields, read_metrics, tiny_config

ERRORS = {
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    # What torch's stream writer raises when the disk fills under it.
    "iostream": RuntimeError("[enforce fail at inline_container.cc:672] . basic_ios::clear"),
}


def _main(config_file: str) -> dict:
    from actcomp_dist.training.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--config", config_file])
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _disk_full_rank(rank: int, world_size: int, config_files: dict[str, str]) -> dict:
    results = {}
    save = torch.save
    for kind, config_file in config_files.items():
        if kind in ERRORS and rank == 1:

            def full_disk(obj, path, *args, error=ERRORS[kind], **kwargs):
                if ckpt.checkpoint_name(4) in str(path):
                    raise error
                return save(obj, path, *args, **kwargs)

            torch.save = full_disk
        first = _main(config_file)
        torch.save = save
        torch.distributed.barrier()
        checkpoints = Path(config_file).parent / kind / "checkpoints"
        left = sorted(p.name for p in checkpoints.iterdir())
        if kind not in ERRORS:
            results[kind] = {"first": first}
            continue
        latest = (checkpoints / ckpt.LATEST).read_text()
        # Step 2's files are what its marker lists (sizes and SHA-256): nothing touched them.
        compression = load_run_config(config_file).compression.to_dict()
        ckpt.verify_checkpoint(checkpoints / "step_0000002", compression)
        torch.distributed.barrier()
        resumed = _main(config_file)
        results[kind] = {"first": first, "left": left, "latest": latest, "resumed": resumed}
    return results


@pytest.mark.distributed
def test_a_write_error_mid_save_stops_every_rank_and_the_run_resumes(tmp_path, corpus):
    """A full disk on rank 1 while DeepSpeed writes step 4 (``OSError`` ENOSPC, or torch's
    stream-writer ``RuntimeError``): both ranks exit 2 with one line naming rank 1, the error
    and the free bytes, and no traceback; step 4's directory is gone, step 2 and ``latest``
    are as they were. ``resume=latest`` then finishes the run, bit-identical to the
    uninterrupted one."""
    files = {}
    for kind in ("reference", *ERRORS):
        raw = tiny_config(
            tmp_path / kind,
            corpus,
            "checkpoint.interval=2",
            "checkpoint.resume=latest",
        )
        files[kind] = str(tmp_path / f"{kind}.json")
        Path(files[kind]).write_text(json.dumps(raw))
    ranks = run_distributed(_disk_full_rank, 2, tmp_path, files, timeout=300)

    reference = read_metrics(tmp_path / "reference")
    assert ranks[0]["reference"]["first"]["code"] == 0
    for kind, error in ERRORS.items():
        for rank in range(2):
            result = ranks[rank][kind]
            failed = result["first"]
            assert failed["code"] == 2, (kind, failed["stderr"])
            checkpoints = tmp_path / kind / "checkpoints"
            assert (
                f"error (rank {rank}/2): step 4: writing checkpoint {checkpoints / 'step_0000004'} "
                f"failed on rank 1: {type(error).__name__}: {error} (" in failed["stderr"]
            ), failed["stderr"]
            assert "bytes free on the file system of" in failed["stderr"]
            assert "Traceback" not in failed["stderr"]
            assert result["left"] == ["latest", "step_0000002"]
            assert result["resumed"]["code"] == 0, result["resumed"]["stderr"]
        assert ranks[0][kind]["latest"] == "step_0000002/step_0000002"
        assert compared_fields(read_metrics(tmp_path / kind)) == compared_fields(reference), kind
