"""Damaged checkpoints and data files met by a real 2-rank run: refused, nothing touched.

Gloo ranks forked by :func:`tests.helpers.distributed.run_distributed` run the launcher's own ``main``
(the ``compact`` model of ``tests/helpers/runs.py``). A good 2-step run leaves a checkpoint;
copies of its run directory are damaged three ways (a flipped byte in DeepSpeed's model
states, a truncated per-rank file, a marker that is not JSON) and resumed with
``checkpoint.resume=latest``; a copy of the corpus with a truncated ``.bin`` is trained on.
Each must end every rank with exit code 2 and one line naming the file, no traceback, the run
directory byte for byte as before (or not created). The same refusals through separately
started processes and the launcher are in ``tests/integration/test_pretrain.py`` (``BAD_INPUTS``).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.run_files import flip_a_byte, tree_hashes, truncate
from tests.helpers.runs import tiny_config

STEP = "step_0000002"
DAMAGE = {
    # name: (damage the copied checkpoint directory, expected message)
    "flipped_byte": (
        lambda ckpts: flip_a_byte(ckpts / STEP / STEP / "mp_rank_00_model_states.pt"),
        f"is damaged: {STEP}/mp_rank_00_model_states.pt differs from what was saved",
    ),
    "truncated_rank_file": (
        lambda ckpts: truncate(ckpts / STEP / "rank_00001.pt"),
        "is damaged: rank_00001.pt differs from what was saved",
    ),
    "garbage_marker": (
        lambda ckpts: (ckpts / STEP / "COMPLETE").write_text("{not json"),
        "unreadable COMPLETE marker (JSONDecodeError",
    ),
}


def _main(config_file: str, overrides: list[str]) -> dict:
    from actcomp_dist.training.cli import main

    argv = ["--config", config_file]
    for override in overrides:
        argv += ["--set", override]
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return {"code": code, "stderr": stderr.getvalue()}


def _damaged_rank(rank: int, world_size: int, config_file: str, bad_prefix: str) -> dict:
    tmp = Path(config_file).parent
    results = {"good": _main(config_file, [f"run_dir={tmp / 'good'}"])}
    if rank == 0:
        for name, (damage, _) in DAMAGE.items():
            shutil.copytree(tmp / "good", tmp / name)
            damage(tmp / name / "checkpoints")
        results["before"] = {name: tree_hashes(tmp / name) for name in DAMAGE}
    torch.distributed.barrier()
    for name in DAMAGE:
        resume = [f"run_dir={tmp / name}", "checkpoint.resume=latest", "train.steps=4"]
        results[name] = _main(config_file, resume)
    torch.distributed.barrier()
    if rank == 0:
        results["after"] = {name: tree_hashes(tmp / name) for name in DAMAGE}
    data = [f"run_dir={tmp / 'bad_data'}", f"data.paths={json.dumps([bad_prefix])}"]
    results["bad_data"] = _main(config_file, data)
    return results


@pytest.mark.distributed
def test_damaged_checkpoints_and_data_are_refused_on_every_rank(tmp_path, corpus):
    raw = tiny_config(tmp_path / "good", corpus, "train.steps=2", "train.eval_interval=0")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(raw))
    prefix = json.loads(corpus[0].split("=", 1)[1])[0]
    bad_prefix = tmp_path / "data" / "truncated"
    bad_prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, str(bad_prefix) + suffix)
    truncate(Path(str(bad_prefix) + ".bin"))  # 100 bytes short of what the index describes
    ranks = run_distributed(_damaged_rank, 2, tmp_path, str(config_file), str(bad_prefix))

    for rank, results in enumerate(ranks):
        assert results["good"]["code"] == 0, results["good"]["stderr"]
        for name, (_, message) in DAMAGE.items():
            result = results[name]
            assert result["code"] == 2, (name, result["stderr"])
            assert f"error (rank {rank}/2): checkpoint {tmp_path / name}" in result["stderr"]
            assert message in result["stderr"], (name, result["stderr"])
            assert "Traceback" not in result["stderr"]
        bad_data = results["bad_data"]
        assert bad_data["code"] == 2, bad_data["stderr"]
        assert f"error (rank {rank}/2): data.paths: {bad_prefix}.bin holds " in bad_data["stderr"]
        assert "Traceback" not in bad_data["stderr"]
    assert ranks[0]["before"] == ranks[0]["after"]
    assert not (tmp_path / "bad_data").exists()
