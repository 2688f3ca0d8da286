"""Elastic resume (issue 16 item 8): a run resumes at another data-parallel or TP size.

Real runs of the ``compact`` and ``none`` models of ``tests/helpers/runs.py`` (gloo ranks
forked by :func:`tests.helpers.distributed.run_distributed`, DeepSpeed ZeRO 0, 1 and 2, 4 steps with a
checkpoint at step 2, the projection resampled every 2 steps so steps 3-4 use a new one,
global batch 8 = micro-batch 4 x DP 2, or x 2 accumulated micro-batches at DP 1):

- DP 2 -> 1 and DP 1 -> 2, ``compact`` in ``subspace`` mode (at ZeRO 1/2 its m x r state
  partitioned by rows outside DeepSpeed; at ZeRO 0 on proxies) and ``none``: steps 3-4 after
  the elastic resume against the run continued at the old layout, and against the run
  trained at the new layout from the start;
- TP 2 -> 1, ``compact`` in ``lift`` mode (weights, fp32 masters and AdamW moments through the
  full-weight mapping): against the run continued at TP 2; with ``checkpoint.reset_optimizer``
  against a resume at TP 2 with the same flag (the same weights, fresh optimizer state at the
  old layout). In ``subspace`` mode the resume is refused without the flag (exit 2, every
  rank, nothing written).

Tolerances. At another data-parallel size the forward and backward are identical: each
micro-batch's loss and gradient come from bit-identical weights on the same 4 samples, and
the step's gradient is the sum of the same two micro-batch gradients, over 2 ranks or
accumulated over 2 micro-batches (a sum of two floats commutes; the mean's halving is exact).
So the first loss after the resume and every learning rate equal the uninterrupted run's bit
for bit. What is summed in another grouping is the gradient norm (ZeRO splits its sum of
squares by partition): :data:`NORM_RTOL`; through the clip coefficient it scales the step's
update by at most that much, and the next loss moves by at most that fraction of the step's
loss change, well inside :data:`NORM_RTOL` of the loss. After a TP change the row-parallel
products and the vocabulary's softmax are summed in another order too: the resumed run and the
run it continues (at TP 2) are each as accurate as an fp32 replay of the 4 steps (with the
optimizer state reset at step 2 where the resume resets it), all against the model's float64
replay (``tests/helpers/replay.py`` ``replay_run``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from actcomp_dist.models import get_model_config, parameter_count
from tests.helpers.distributed import run_distributed
from tests.helpers.replay import (
    assert_as_accurate_as_replay,
    fp32_and_float64_replays,
    train_and_replay_rank,
)
from tests.helpers.runs import read_metrics, tiny_config, train_rank

STEPS = ["train.steps=4", "checkpoint.interval=2", "train.eval_interval=0"]
CASES = {
    # ZeRO 0: DeepSpeed's own files hold everything per TP rank; the m x r gradients on proxies.
    "zero0_subspace": ["deepspeed.zero_optimization.stage=0", "compression.grad_mode=subspace"],
    "zero1_subspace": ["deepspeed.zero_optimization.stage=1", "compression.grad_mode=subspace"],
    "zero2_subspace": ["deepspeed.zero_optimization.stage=2", "compression.grad_mode=subspace"],
    "zero1_none": ["deepspeed.zero_optimization.stage=1", "compression.method=none"],
    "zero2_none": ["deepspeed.zero_optimization.stage=2", "compression.method=none"],
}
TP2 = ["parallel.tensor_parallel=2", "deepspeed.zero_optimization.stage=1"]
SUBSPACE = ["compression.grad_mode=subspace"]
# The gradient norm's sum of squares over every parameter, grouped by ZeRO partition: float32
# cascade sums of n terms in two groupings, each within log2(n) roundings (2^-24) of the sum;
# the square root halves the relative difference of the two.
PARAMETERS = parameter_count(get_model_config("tiny", seq_length=128, vocab_size=512))
NORM_RTOL = math.log2(PARAMETERS) * 2.0**-24


def _step2(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_0000002"


def _raw(run_dir: Path, corpus: list[str], *overrides: str) -> dict:
    return tiny_config(run_dir, corpus, *STEPS, *overrides)


def _after_step_2(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["step"] > 2]


def _assert_continues(reference: list[dict], resumed: list[dict], rtol: float) -> None:
    """Steps 3-4 of ``resumed`` against those of ``reference`` (see the module docstring):
    the learning rates exactly, losses and gradient norms within ``rtol``."""
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [3, 4]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    for key in ("loss", "grad_norm"):
        actual = torch.tensor([r[key] for r in resumed], dtype=torch.float64)
        expected = torch.tensor([r[key] for r in reference], dtype=torch.float64)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=0)


def _assert_resumed_as_accurate_as(
    reference: list[dict], resumed: list[dict], replay: dict, exact: dict, msg: str
) -> None:
    """Steps 3-4 of ``resumed`` and of the run it continues (``reference``) at another TP
    size: the learning rates exactly, losses and gradient norms each as accurate as the fp32
    ``replay`` against the float64 one (``exact``)."""
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [3, 4]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    assert_as_accurate_as_replay(reference, replay, exact, (msg, "continued"))
    assert_as_accurate_as_replay(resumed, replay, exact, (msg, "resumed"))


def _refused_rank(rank: int, world_size: int, config_file: str) -> dict:
    """``launch/pretrain.py``'s ``main`` in this rank: exit code and stderr."""
    from actcomp_dist.training.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["--config", config_file])
    return {"code": code, "stderr": stderr.getvalue()}


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_at_another_data_parallel_and_tensor_parallel_size(tmp_path, corpus):
    old = {name: tmp_path / "dp2" / name for name in CASES}
    one = {name: tmp_path / "dp1" / name for name in CASES}
    tp2, tp2_subspace = tmp_path / "tp2", tmp_path / "tp2_subspace"
    # The runs at DP 2 (and TP 2), each with its step-2 checkpoint.
    raws = [_raw(old[n], corpus, *o) for n, o in CASES.items()]
    raws += [_raw(tp2, corpus, *TP2), _raw(tp2_subspace, corpus, *TP2, *SUBSPACE)]
    run_distributed(train_rank, 2, tmp_path, raws, timeout=600)
    # At DP 1: the uninterrupted runs, and the resumes from the DP 2 checkpoints.
    raws = [_raw(one[n], corpus, *o) for n, o in CASES.items()]
    raws += [
        _raw(tmp_path / "dp2to1" / n, corpus, *o, f"checkpoint.resume={_step2(old[n])}")
        for n, o in CASES.items()
    ]
    run_distributed(train_rank, 1, tmp_path, raws, timeout=600)
    # At DP 2: the resumes from the DP 1 checkpoints; TP 2 -> 1 without and with the flag, and
    # the reference for the flag: TP 2 -> 2 with it.
    raws = [
        _raw(tmp_path / "dp1to2" / n, corpus, *o, f"checkpoint.resume={_step2(one[n])}")
        for n, o in CASES.items()
    ]
    tp1 = ["deepspeed.zero_optimization.stage=1", f"checkpoint.resume={_step2(tp2)}"]
    reset = [*tp1, "checkpoint.reset_optimizer=true"]
    raws += [
        _raw(tmp_path / "tp2to1", corpus, *tp1),
        _raw(tmp_path / "tp2to2_reset", corpus, *TP2, *reset),
        _raw(tmp_path / "tp2to1_reset", corpus, *reset),
    ]
    refused_file = tmp_path / "refused.json"
    refused_dir = tmp_path / "refused"
    refused_file.write_text(
        json.dumps(
            _raw(
                refused_dir,
                corpus,
                "deepspeed.zero_optimization.stage=1",
                *SUBSPACE,
                f"checkpoint.resume={_step2(tp2_subspace)}",
            )
        )
    )
    refused = run_distributed(_refused_rank, 2, tmp_path, str(refused_file), timeout=300)
    # The TP 1 resumes are replayed (rank 0 in float64, rank 1 in fp32) from step 1.
    replays = [None] * len(CASES) + [{}, None, {"reset_optimizer_at": 2}]
    trained = run_distributed(train_and_replay_rank, 2, tmp_path, raws, replays, timeout=600)

    for name in CASES:
        for reference, resumed, new_layout in ((old, "dp2to1", one), (one, "dp1to2", old)):
            after = _after_step_2(tmp_path / resumed / name)
            expected = _after_step_2(reference[name])
            assert after[0]["loss"] == expected[0]["loss"]  # the same weights, samples, sums
            _assert_continues(expected, after, rtol=NORM_RTOL)
            # And the run that trained at the new layout from the start (the same argument).
            _assert_continues(_after_step_2(new_layout[name]), after, rtol=NORM_RTOL)
    # The layout change is in the first record of the resumed run.
    first = read_metrics(tmp_path / "dp2to1" / "zero1_subspace")[0]
    assert first["resume_changed"]["parallel.layout"] == [
        "2 ranks (TP 1 x DP 2, ZeRO 1)",
        "1 ranks (TP 1 x DP 1, ZeRO 1)",
    ]
    assert "parallel.layout" in first["warnings"][0]

    expected = (
        f"checkpoint {_step2(tp2_subspace)} was written by 2 ranks (TP 2 x DP 1, ZeRO 1); this "
        f"run has 2 ranks (TP 1 x DP 2, ZeRO 1): the subspace optimizer state "
        f"(grad_mode='subspace') lives in each TP shard's projection space and is not "
        f"resharded across TP sizes; resume at parallel.tensor_parallel=2, or set "
        f"checkpoint.reset_optimizer=true to resume the weights with fresh optimizer state"
    )
    for rank, result in enumerate(refused):
        assert result["code"] == 2, result["stderr"]
        assert f"error (rank {rank}/2): {expected}\n" in result["stderr"]
        assert "Traceback" not in result["stderr"]
    assert not refused_dir.exists()

    # TP 2 -> 1 (and DP 1 -> 2) with the optimizer state resharded: the run continued at TP 2.
    # Both compute steps 3-4 from the same step-2 weights with other reduction orders: each is
    # as accurate as the fp32 replay against the float64 one (a moment resharded to the wrong
    # rows moves those weights by up to lr = 3e-3 in step 3, where the bound on the losses and
    # norms is below 5e-6 absolute).
    tp2to1 = len(CASES)
    resumed = read_metrics(tmp_path / "tp2to1")
    assert "optimizer_state" not in resumed[0]["resume_changed"]
    replay, exact = fp32_and_float64_replays(trained, tp2to1)
    _assert_resumed_as_accurate_as(_after_step_2(tp2), resumed, replay, exact, "tp2to1")
    # With checkpoint.reset_optimizer: a resume with the flag at TP 2, against the replay whose
    # optimizer state starts afresh at step 3.
    reference = read_metrics(tmp_path / "tp2to2_reset")
    resumed = read_metrics(tmp_path / "tp2to1_reset")
    assert resumed[0]["resume_changed"]["optimizer_state"] == ["from checkpoint", "reset"]
    assert resumed[0]["resume_changed"]["parallel.layout"][1] == "2 ranks (TP 1 x DP 2, ZeRO 1)"
    replay, exact = fp32_and_float64_replays(trained, tp2to1 + 2)
    _assert_resumed_as_accurate_as(reference, resumed, replay, exact, "tp2to1_reset")


# -- the layout check and the row resharding, without a run ------------------------------------


def _state(world_size: int, tp: int, stage: int, vocab: int = 512) -> dict:
    config = {
        "parallel": {"tensor_parallel": tp},
        "deepspeed": {"zero_optimization": {"stage": stage}},
    }
    return {"world_size": world_size, "config": config, "model_config": {"vocab_size": vocab}}


def _run_config(
    tp: int, stage: int, reset: bool = False, method: str = "compact", grad_mode: str = "lift"
):
    from actcomp_dist.training.config import run_config_from_dict

    return run_config_from_dict(
        {
            "compression": {"method": method, "grad_mode": grad_mode},
            "parallel": {"tensor_parallel": tp},
            "deepspeed": {"zero_optimization": {"stage": stage}},
            "checkpoint": {"reset_optimizer": reset},
        }
    )


def test_layout_changes_accepted_and_refused():
    """DP changes at ZeRO 0-2 pass (and are named); a changed ZeRO stage, ZeRO 3, a TP change
    without ``checkpoint.reset_optimizer`` and a vocabulary the new TP size does not divide
    are refused with old -> new."""
    from actcomp_dist.training.checkpoint import CheckpointError
    from actcomp_dist.training.elastic import check_layout_change

    path = Path("ckpt")
    assert check_layout_change(path, _state(2, 1, 1), _run_config(1, 1), 2) == {}
    assert check_layout_change(path, _state(2, 1, 2), _run_config(1, 2), 1) == {
        "parallel.layout": ["2 ranks (TP 1 x DP 2, ZeRO 2)", "1 ranks (TP 1 x DP 1, ZeRO 2)"]
    }
    assert check_layout_change(path, _state(2, 2, 1), _run_config(1, 1), 1)  # resharded
    assert check_layout_change(path, _state(2, 2, 1), _run_config(1, 1, reset=True), 2) == {
        "parallel.layout": ["2 ranks (TP 2 x DP 1, ZeRO 1)", "2 ranks (TP 1 x DP 2, ZeRO 1)"]
    }
    refusals = [
        (_state(2, 1, 1), _run_config(1, 2), 1, "keeps the ZeRO stage; resume with deepspeed"),
        (_state(2, 1, 3), _run_config(1, 3), 1, "ZeRO 3 checkpoints resume at the same layout"),
        (_state(2, 2, 1), _run_config(1, 1, grad_mode="subspace"), 1, "projection space"),
        (_state(1, 1, 1), _run_config(3, 1, True), 3, "vocabulary 512 does not divide"),
        (_state(1, 1, 1), _run_config(2, 1, True, "subtoken"), 2, "vectors are per TP shard"),
    ]
    from actcomp_dist.training.finetune_config import finetune_config_from_dict

    lori = finetune_config_from_dict(
        {
            "data": {"synthetic_task": "reverse_words"},
            "finetune": {"mode": "lori"},
            "parallel": {"tensor_parallel": 2},
            "checkpoint": {"reset_optimizer": True},
        }
    )
    refusals.append((_state(1, 1, 0), lori, 2, "finetune.mode='lori' \\(adapter B matrices"))
    for state, config, world_size, message in refusals:
        with pytest.raises(CheckpointError, match=message) as error:
            check_layout_change(path, state, config, world_size)
        assert "\n" not in str(error.value) and "this run has" in str(error.value)


def test_subspace_rows_are_regathered_and_resplit():
    """Masters and moments of 7 rows saved by 2 ranks (rows 0-3, 4-6) re-split for 3 ranks
    (rows 0-2, 3-5, 6): the whole tensors, sliced by ``owned_rows``."""
    from actcomp_dist.optim.subspace_proxy import owned_rows
    from actcomp_dist.training.elastic import reshard_subspace_state

    masters = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    moments = (torch.randn(7, 3), torch.rand(7, 3))
    saved = []
    for d in range(2):
        start, end = owned_rows(7, d, 2)
        saved.append(
            {
                "dp_size": 2,
                "dp_rank": d,
                "masters": {"0": masters[start:end]},
                "steps": 4,
                "moments": {"0": tuple(m[start:end] for m in moments)},
            }
        )
    for d in range(3):
        start, end = owned_rows(7, d, 3)
        out = reshard_subspace_state(saved, d, 3)
        assert (out["dp_size"], out["dp_rank"], out["steps"]) == (3, d, 4)
        assert torch.equal(out["masters"]["0"], masters[start:end])
        for mine, whole in zip(out["moments"]["0"], moments, strict=True):
            assert torch.equal(mine, whole[start:end])
