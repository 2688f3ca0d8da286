"""End-to-end pretraining (issue 4): the tiny LLaMA on 2 CPU ranks (gloo) on a small real corpus.

References: an untrained model's first loss is ln(vocabulary); plain data parallelism (ZeRO 0)
for the other ZeRO stages and tensor-parallel layouts; the uninterrupted run for resumed and
preempted ones; no activation checkpointing for checkpointing; ``SubspaceAdamW`` (plain PyTorch,
one process) for DeepSpeed's subspace path; closed forms for the learning rate and tokens/s.

Where the time goes (2 cores): a ``deepspeed`` launch costs about 10 s of start-up, a rank
forked by :func:`tests.helpers.distributed.run_distributed` about 1 s, and ``run_pretraining`` can run
again in the same process. So:

- through the ``deepspeed`` launcher, three runs: uninterrupted, preempted by SIGTERM to one
  rank, resumed from ``latest``; and one bad-input run for the launcher's exit status;
- in forked gloo ranks: ZeRO stages and TP layouts, exact resume, activation checkpointing,
  the subspace update rule, the stop file, several configs per call;
- bad inputs: two processes per case started as ``srun`` starts them (``SLURM_PROCID``...), so
  every rank's message and exit status are seen on their own (the ``deepspeed`` launcher kills
  the other ranks as soon as one fails).

Resumed runs must match bit for bit: on CPU every step is deterministic (same data, same
reduction order, RNG and optimizer state restored), so any difference is a resume bug. Runs
with another ZeRO stage or TP layout compute the same sums in another order: their losses
agree within :data:`LOSS_ATOL` (derived next to its definition), and their losses and gradient
norms, like the weights after a few AdamW steps (the subspace rule, ``train.lr_scale``), are as
accurate as an fp32 replay of the same steps against the model's float64 replay
(``model.double()``, :func:`tests.helpers.replay.replay_run`); a bf16 run's as accurate as the
fp32 run's, in bf16's unit roundoff.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from actcomp_dist.training.config import load_run_config
from actcomp_dist.training.schedule import learning_rate
from tests.helpers.distributed import run_distributed
from tests.helpers.launcher import (
    free_port,
    launch_deepspeed,
    rank_pid,
    srun_ranks,
    startup_saved_bytes,
    wait_for_step,
    wait_or_kill,
)
from tests.helpers.replay import (
    assert_as_accurate_as_replay,
    fp32_and_float64_replays,
    history_losses,
    history_norms,
    replay_run,
    train_and_replay_rank,
)
from tests.helpers.run_files import flip_a_byte, tree_hashes, truncate
from tests.helpers.runs import (
    TINY,
    VOCAB,
    compared_fields,
    read_metrics,
    tiny_config,
    train_rank,
)
from tests.helpers.tolerances import assert_as_accurate_as, gamma

METRIC_KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "saved_activation_bytes",
}

# Tolerances between runs that compute the same fp32 sums in another order (another ZeRO stage,
# TP layout or activation-checkpointing mode). A ZeRO stage at DP 2 changes no forward or
# backward sum (a rank's gradients are added to one other rank's: two floats commute, the mean's
# halving is exact); it groups the gradient norm's sum of squares by partition. A TP layout
# splits the row-parallel sums (k = 128, 352) and the vocabulary-parallel softmax in halves.
#
# Losses: the longest reordered sum of the forward is each token's softmax denominator over
# V = 512 positive terms; at either layout it is within gamma_V of itself (relative: positive
# terms do not cancel), so each token's log-sum-exp and the mean loss differ by at most
# 2 gamma_V = 6.1e-5 absolute (tests/helpers/tolerances.py). That is the softmax's share; the
# shorter reordered sums (the logits' and the row-parallel ones, k <= 352) and, after the first
# step, the weights' differences (carried by Adam) are not bounded here through the nested
# sums: the check relies on their roundings not lining up with the softmax's. Measured:
# <= 9.5e-7 absolute over 6 steps (0.016 of LOSS_ATOL); ZeRO stages without subspace state: 0.
# Where the whole trajectory matters (gradient norms, the weights after Adam steps, bf16 against
# fp32) the runs are compared with the model's float64 replay instead:
# :func:`tests.helpers.replay.replay_run`.
LOSS_ATOL = 2 * gamma(VOCAB, torch.float32)


def _assert_loss_falls(history: list[dict]) -> None:
    losses = history_losses(history)
    # An untrained model predicts close to uniformly: cross-entropy ln(V).
    assert abs(losses[0].item() - math.log(VOCAB)) < 0.15, losses
    assert losses[-1] < losses[0] - 0.4, losses


# -- layouts: ZeRO stages, tensor and sequence parallelism, subspace ---------------------------

LAYOUTS = {
    "zero0": ["deepspeed.zero_optimization.stage=0"],
    "zero1": ["deepspeed.zero_optimization.stage=1"],
    "zero2": ["deepspeed.zero_optimization.stage=2"],
    "zero3": ["deepspeed.zero_optimization.stage=3"],
    "tp2": ["parallel.tensor_parallel=2"],
    "tp2_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    "subspace_zero0": ["compression.grad_mode=subspace", "deepspeed.zero_optimization.stage=0"],
    "subspace_zero1": ["compression.grad_mode=subspace", "deepspeed.zero_optimization.stage=1"],
    "subspace_zero2": ["compression.grad_mode=subspace", "deepspeed.zero_optimization.stage=2"],
    # FC2's dense row-parallel G_hat is the same on both TP ranks: its m x r state is
    # replicated, counted once in the norm, and each rank lifts it with its own rows of P.
    "subspace_tp2": ["compression.grad_mode=subspace", "parallel.tensor_parallel=2"],
    "subspace_tp2_sp": [
        "compression.grad_mode=subspace",
        "parallel.tensor_parallel=2",
        "parallel.sequence_parallel=true",
    ],
    # Uncompressed: the memory-efficient FC2 takes [gate | up] and recomputes the SwiGLU
    # product, through ZeRO-3's parameter gathering hooks too.
    "none_zero0": ["compression.method=none", "deepspeed.zero_optimization.stage=0"],
    "none_zero3": ["compression.method=none", "deepspeed.zero_optimization.stage=3"],
}


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_stages_and_tensor_parallel_match_plain_data_parallel(tmp_path, corpus):
    """``compact`` in ``lift`` mode under ZeRO 1/2/3 and at TP=2 (+SP), and in ``subspace`` mode
    under ZeRO 1/2 and at TP=2 (+SP), train like ZeRO 0 (DP=2; at TP=2 DP=1 with 2 accumulated
    micro-batches of the same samples). Uncompressed, ZeRO-3 trains like ZeRO 0.

    Each ZeRO 0 run is replayed on one process (fp32 and the model's float64 replay, the same
    samples, projections and lr; :func:`replay_run`), and every layout's losses and gradient norms
    are as accurate as the fp32 replay against the float64 one: the layouts compute the same
    sums in other orders. The norms agreeing means the m x r gradients (on proxies at ZeRO 0,
    partitioned at ZeRO 1/2) are in the norm DeepSpeed clips with under every stage: without
    them it is 0.99 of itself or less (test_deepspeed_subspace_path_is_the_subspace_adamw_rule),
    about 10^4 times the replay's error. Measured: losses 0.20-0.31 of the bound (lift and
    ``none`` at every layout: bit for bit the fp32 replay's), norms 0.01-0.47 (ZeRO 0 computes
    its norm as the replay does: 0.44-0.47)."""
    raws = [
        tiny_config(tmp_path / name, corpus, "train.eval_interval=0", *overrides)
        for name, overrides in LAYOUTS.items()
    ]
    replays = [{} if name.endswith("zero0") else None for name in LAYOUTS]
    results = run_distributed(train_and_replay_rank, 2, tmp_path, raws, replays, timeout=600)
    names = list(LAYOUTS)
    histories = {name: result["history"] for name, result in zip(names, results[0], strict=True)}
    for name, history in histories.items():
        prefix = name.split("_")[0]
        family = f"{prefix}_zero0" if prefix in ("subspace", "none") else "zero0"
        replay, exact = fp32_and_float64_replays(results, names.index(family))
        _assert_loss_falls(history)
        torch.testing.assert_close(
            history_losses(history), history_losses(histories[family]), rtol=0, atol=LOSS_ATOL
        )
        assert_as_accurate_as_replay(history, replay, exact, name)
    # The two gradient modes really are different training paths.
    assert not torch.allclose(
        history_losses(histories["zero0"]), history_losses(histories["subspace_zero0"])
    )
    # Per rank, TP=2 saves less than TP=1 (sharded heads and FFN), and SP less again (the
    # sequence-sharded norms and residual stream).
    saved = {name: h[0]["saved_activation_bytes"] for name, h in histories.items()}
    assert saved["zero0"] > saved["tp2"] > saved["tp2_sp"]


# -- exact resume ----------------------------------------------------------------------------

RESUME_CASES = {
    "compact_lift_zero2": ["deepspeed.zero_optimization.stage=2"],
    "compact_subspace_zero1": ["compression.grad_mode=subspace"],
    "compact_subspace_tp2_sp": [
        "compression.grad_mode=subspace",
        "deepspeed.zero_optimization.stage=0",
        "parallel.tensor_parallel=2",
        "parallel.sequence_parallel=true",
    ],
    # The fp32 masters of the bf16 weights are partitioned over the 2 data-parallel ranks.
    "compact_subspace_bf16_zero2": [
        "compression.grad_mode=subspace",
        "train.precision=bf16",
        "deepspeed.zero_optimization.stage=2",
    ],
    # Sub-token vectors are set from the first batch: they must come back from the checkpoint.
    "subtoken_zero1": ["compression.method=subtoken", "compression.groups=8"],
    # Four param groups by learning-rate factor: each group's lr comes back with it.
    "lr_scale_zero1": ['train.lr_scale={"qkv": 0.25, "proj": 0.125, "norm": 2, "default": 0.5}'],
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_from_step_3_repeats_steps_4_to_6_exactly(tmp_path, corpus, case):
    """6 steps with a checkpoint at 3, resampling P every 2 steps (steps 3-4 use one
    projection, 5-6 the next: the resumed run crosses a boundary), then a new run dir resuming
    from step 3: metrics.jsonl of the two agree bit for bit on steps 4-6 (loss, lr, grad norm,
    validation loss, saved bytes)."""
    overrides = ["checkpoint.interval=3", *RESUME_CASES[case]]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    step3 = full / "checkpoints" / "step_0000003"
    raws = [
        tiny_config(full, corpus, *overrides),
        tiny_config(resumed, corpus, *overrides, f"checkpoint.resume={step3}"),
    ]
    run_distributed(train_rank, 2, tmp_path, raws, timeout=300)

    reference, after_resume = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    assert compared_fields(after_resume) == compared_fields(reference[3:])
    assert "val_loss" in after_resume[-1]
    for path in (
        step3,
        full / "checkpoints" / "step_0000006",
        resumed / "checkpoints" / "step_0000006",
    ):
        assert (path / "COMPLETE").is_file(), path


def _stop_file_rank(rank: int, world_size: int, raw: dict, stop_file: str) -> tuple:
    """Train with the stop file already there, then continue from ``latest`` to the end."""
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import run_pretraining

    if rank == 0:
        Path(stop_file).parent.mkdir(parents=True)
        Path(stop_file).touch()
    torch.distributed.barrier()
    stopped = run_pretraining(run_config_from_dict(raw))
    stop_file_left = Path(stop_file).exists()
    torch.distributed.barrier()
    finished = run_pretraining(run_config_from_dict(raw))
    again = run_pretraining(run_config_from_dict(raw))  # a finished run: nothing to do
    step1 = Path(raw["run_dir"]) / "checkpoints" / "step_0000001"
    redo = run_pretraining(run_config_from_dict(dict(raw, checkpoint={"resume": str(step1)})))
    return stopped, stop_file_left, finished, again, redo


@pytest.mark.distributed
def test_stop_file_checkpoints_at_the_next_step_and_the_run_resumes(tmp_path, corpus):
    """The SLURM script's stop file (``RUN_DIR/STOP``) stops every rank after the step it sees
    it in, with a checkpoint; it is consumed, so the resumed run goes on to the end. Resuming
    a finished run trains nothing and writes no new checkpoint. Resuming the older checkpoint
    in the same run dir redoes steps 2-3 identically, and metrics.jsonl keeps each step once."""
    run_dir = tmp_path / "run"
    raw = tiny_config(run_dir, corpus, "train.steps=3", "train.eval_interval=0")
    stopped, stop_file_left, finished, again, redo = run_distributed(
        _stop_file_rank, 2, tmp_path, raw, str(run_dir / "STOP"), timeout=300
    )[0]
    assert (stopped.preempted, stopped.steps_done) == (True, 1)
    assert not stop_file_left
    assert (finished.preempted, finished.steps_done) == (False, 3)
    assert [r["step"] for r in finished.history] == [2, 3]
    assert (again.steps_done, again.history) == (3, [])
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_0000001", "step_0000003"]
    assert compared_fields(redo.history) == compared_fields(finished.history)
    assert compared_fields(read_metrics(run_dir)) == compared_fields(
        stopped.history + finished.history
    )


# -- activation checkpointing ----------------------------------------------------------------


@pytest.mark.distributed
def test_activation_checkpointing_modes_match_and_saved_bytes_fall(tmp_path, corpus):
    """With method ``none`` every checkpointing mode trains like no checkpointing: the first
    loss is bit-identical (the forward runs the same float operations); later losses within
    :data:`LOSS_ATOL` (recompute may add a tensor's gradient contributions in another order, and
    Adam carries that rounding into the weights; no forward sum is reordered, so the bound for a
    TP layout covers it; measured: identical). With ``compact``: the trainer's
    ``saved_activation_bytes`` fall none > compact > compact + selective > compact + full in the
    naive block (``memory.efficient_ops=false``; in the memory-efficient block compression adds
    its compressed copy, see tests/distributed/test_efficient_ops.py)."""
    runs = {
        "none": ["compression.method=none"],
        "none_selective": ["compression.method=none", "activation_checkpointing.mode=selective"],
        "none_full": ["compression.method=none", "activation_checkpointing.mode=full"],
        "none_full_1": [
            "compression.method=none",
            "activation_checkpointing.mode=full",
            "activation_checkpointing.num_layers=1",
        ],
        "compact": [],
        "compact_selective": ["activation_checkpointing.mode=selective"],
        "compact_full": ["activation_checkpointing.mode=full"],
    }
    raws = [
        tiny_config(
            tmp_path / name,
            corpus,
            "train.steps=3",
            "train.eval_interval=0",
            "memory.efficient_ops=false",
            *overrides,
        )
        for name, overrides in runs.items()
    ]
    results = run_distributed(train_rank, 1, tmp_path, raws, timeout=300)[0]
    histories = dict(zip(runs, results, strict=True))
    reference = history_losses(histories["none"])
    for name in ("none_selective", "none_full", "none_full_1"):
        losses = history_losses(histories[name])
        assert losses[0] == reference[0], name
        torch.testing.assert_close(losses, reference, rtol=0, atol=LOSS_ATOL, msg=name)
    saved = {name: h[0]["saved_activation_bytes"] for name, h in histories.items()}
    assert saved["none"] > saved["compact"] > saved["compact_selective"] > saved["compact_full"]
    assert saved["none"] > saved["none_selective"] > saved["none_full"]
    assert saved["none_full"] < saved["none_full_1"] < saved["none"]


# -- the subspace update rule inside DeepSpeed -------------------------------------------------


def _subspace_rank(rank: int, world_size: int, raws: list[dict]) -> list[dict]:
    """Train with the Trainer (DeepSpeed, proxies, merger), and replay the same steps on the
    same samples with ``SubspaceAdamW`` on a fresh model in this process."""
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import Trainer

    results = []
    for raw in raws:
        config = run_config_from_dict(raw)
        trainer = Trainer(config)
        history = trainer.train().history
        replays = {
            dtype: replay_run(trainer, config, world_size, dtype)
            for dtype in (torch.float32, torch.float64)
        }
        trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        results.append({"history": history, "trained": trained, "replays": replays})
        trainer.close()
    return results


@pytest.mark.distributed
def test_deepspeed_subspace_path_is_the_subspace_adamw_rule(tmp_path, corpus):
    """Proxies + merger (ZeRO 0) and the partitioned m x r state (ZeRO 1, 2) inside DeepSpeed
    (fp32; DP=2) do what ``SubspaceAdamW`` does on the whole batch:
    ``W <- W (1 - lr wd) - lr alpha N P^T`` with N from the m x r Adam moments, one global clip
    over ordinary and compressed gradients, the scheduled lr.

    Weight decay and clipping are on (clip 0.5 < every step's norm, so the clip coefficient
    is in every update) and P is resampled every step. The replay runs twice, in fp32 and as
    the model's float64 replay (``model.double()``): norms and weights after 3 Adam steps as
    accurate as the fp32 replay against the float64 one."""
    raws = [
        tiny_config(
            tmp_path / f"zero{stage}",
            corpus,
            "compression.grad_mode=subspace",
            "compression.resample_every=1",
            f"deepspeed.zero_optimization.stage={stage}",
            "train.steps=3",
            "train.warmup_steps=2",
            "train.weight_decay=0.1",
            "train.clip_grad=0.5",
            "train.eval_interval=0",
        )
        for stage in (0, 1, 2)
    ]
    for result in run_distributed(_subspace_rank, 2, tmp_path, raws, timeout=300)[0]:
        history, trained = result["history"], result["trained"]
        replay, exact = result["replays"][torch.float32], result["replays"][torch.float64]
        assert min(r["grad_norm"] for r in history) > 0.5  # the clip is active in every step
        # The trainer's fp32 run and the fp32 replay compute the same steps with other
        # reduction orders (DP / ZeRO partitions, proxies): both against the float64 replay,
        # the trainer as accurate as the replay (tests/helpers/tolerances.py), norms and
        # weights tensor by tensor. A missing clip coefficient or a weight stepped at another
        # lr is off by ~lr = 3e-3, 10^4 times the replay's error. Measured: norms 0.35, weights
        # 0.55 of the bound (ZeRO 0, 1, 2).
        assert_as_accurate_as(
            {"norms": history_norms(history)},
            {"norms": replay["norms"]},
            {"norms": exact["norms"]},
            torch.float32,
            "norms",
        )
        # Without the m x r gradients the norm would be visibly smaller.
        assert (exact["ordinary_norms"] < 0.99 * exact["norms"]).all()
        train = load_run_config(TINY, ["train.steps=3", "train.warmup_steps=2"]).train
        assert [r["lr"] for r in history] == pytest.approx(
            [learning_rate(s, train) for s in range(3)], rel=1e-12
        )
        assert len(exact["subspace"]) == 6  # qkv, fc1, fc2 of both layers
        assert {w.dtype for w in exact["weights"].values()} == {torch.float64}
        ours = {name: trained[name] for name in exact["weights"]}
        assert_as_accurate_as(ours, replay["weights"], exact["weights"], torch.float32, "weights")


# -- train.lr_scale: per-group learning rates inside DeepSpeed ------------------------------------

LR_SPLIT = {"qkv": 0.25, "fc1": 0.25, "fc2": 0.25, "proj": 0.125, "norm": 2.0, "default": 0.5}


def _lr_scale_rank(rank: int, world_size: int, raws: list[dict], replay: list[bool]) -> list:
    """Train with the Trainer, recording each optimizer param group's (lr_scale, lr) before
    every step; where ``replay``, repeat the steps on the same samples (:func:`replay_run`: a
    plain ``torch.optim.AdamW`` whose groups are set to factor x the closed-form schedule)."""
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import Trainer

    results = []
    for raw, with_replay in zip(raws, replay, strict=True):
        config = run_config_from_dict(raw)
        trainer = Trainer(config)
        groups_by_step = []
        step_once = trainer._train_one_step

        def recorded_step(
            data,
            step_once=step_once,
            optimizer=trainer.lr_scheduler.optimizer,
            record=groups_by_step,
        ):
            record.append([(g["lr_scale"], g["lr"]) for g in optimizer.param_groups])
            return step_once(data)

        trainer._train_one_step = recorded_step
        history = trainer.train().history
        trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        result = {"history": history, "groups": groups_by_step, "trained": trained}
        if with_replay:
            replays = {
                dtype: replay_run(trainer, config, world_size, dtype)
                for dtype in (torch.float32, torch.float64)
            }
            result["factors"] = replays[torch.float32]["factors"]
            result["expected"] = {dtype: r["weights"] for dtype, r in replays.items()}
        results.append(result)
        trainer.close()
    return results


@pytest.mark.distributed
def test_lr_scale_steps_each_group_at_its_factor_and_ones_change_nothing(tmp_path, corpus):
    """``train.lr_scale`` under ZeRO 0, 1 and 2 (DP=2, fp32, CompAct lift on qkv/fc1/fc2):
    before every step each optimizer param group's lr is its factor x the closed-form
    schedule (warm-up then cosine), and after 4 steps every weight is as accurate as a plain
    fp32 AdamW replay with per-parameter lr = factor x schedule on the same samples, both
    against that replay in float64 (``model.double()``; measured: the trainer's error equals
    the fp32 replay's, 0.5 of the bound). The factors are 2x to 8x apart: a weight stepped at
    another group's lr would be off by about lr = 3e-3 per step, 10^4 times the bound.
    Factors of 1 spelled out (``default`` and a site) train bit for bit like no field."""
    steps = ["train.steps=4", "train.warmup_steps=2", "train.eval_interval=0"]
    split = f"train.lr_scale={json.dumps(LR_SPLIT)}"
    runs = {
        **{
            f"zero{stage}": [split, f"deepspeed.zero_optimization.stage={stage}"]
            for stage in (0, 1, 2)
        },
        "none": [],
        "ones": ['train.lr_scale={"default": 1, "qkv": 1.0}'],
    }
    raws = [tiny_config(tmp_path / name, corpus, *steps, *o) for name, o in runs.items()]
    replay = [name.startswith("zero") for name in runs]
    results = run_distributed(_lr_scale_rank, 2, tmp_path, raws, replay, timeout=300)[0]
    by_name = dict(zip(runs, results, strict=True))
    train = load_run_config(TINY, steps).train
    for name in ("zero0", "zero1", "zero2"):
        result = by_name[name]
        assert len(result["groups"]) == 4
        for step, groups in enumerate(result["groups"]):
            # embedding and output at default 0.5, qkv/fc1/fc2 0.25, proj 0.125, the norms 2
            assert sorted({factor for factor, _ in groups}) == [0.125, 0.25, 0.5, 2.0]
            for factor, lr in groups:
                assert lr == pytest.approx(factor * learning_rate(step, train), rel=1e-12)
        # The logged lr is the schedule's, without a factor.
        assert [r["lr"] for r in result["history"]] == pytest.approx(
            [learning_rate(s, train) for s in range(4)], rel=1e-12
        )
        assert set(result["factors"].values()) == {0.125, 0.25, 0.5, 2.0}
        replay, exact = result["expected"][torch.float32], result["expected"][torch.float64]
        assert {w.dtype for w in exact.values()} == {torch.float64}
        ours = {n: result["trained"][n] for n in exact}
        assert_as_accurate_as(ours, replay, exact, torch.float32, name)
    none, ones = by_name["none"], by_name["ones"]
    assert compared_fields(ones["history"]) == compared_fields(none["history"])
    assert [[lr for _, lr in g] for g in ones["groups"]] == [
        [lr for _, lr in g] for g in none["groups"]
    ]
    for n, weight in none["trained"].items():
        assert torch.equal(ones["trained"][n], weight), n
    # The split really trains differently.
    assert by_name["zero1"]["history"][-1]["loss"] != none["history"][-1]["loss"]


def _bf16_subspace_rank(
    rank: int, world_size: int, raws: list[dict], replays: list[dict | None]
) -> list[dict]:
    """:func:`train_and_replay_rank`, and each subspace weight with its fp32 master."""
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import Trainer

    dtype = {0: torch.float64, 1: torch.float32}[rank]
    results = []
    for raw, replay in zip(raws, replays, strict=True):
        config = run_config_from_dict(raw)
        trainer = Trainer(config)
        history = trainer.train().history
        layers = trainer.merger.layers
        masters = [trainer.merger.masters.get(id(layer)) for layer in layers]
        result = {
            "history": history,
            "weights": [layer.weight.detach().clone() for layer in layers],
            # (first row, fp32 master of this rank's rows) or None
            "masters": [None if m is None else (m[0], m[1].clone()) for m in masters],
        }
        if replay is not None:
            result["replay"] = replay_run(trainer, config, world_size, dtype, **replay)
        results.append(result)
        trainer.close()
    return results


@pytest.mark.distributed
def test_bf16_subspace_keeps_fp32_masters_of_the_compressed_weights(tmp_path, corpus):
    """In bf16 (ZeRO 1 and 2) each subspace weight is updated in an fp32 master and copied to
    the bf16 weight, so updates far below bf16's resolution accumulate; training follows the
    fp32 run: over 3 steps the bf16 losses are as accurate as the fp32 run's in bf16's unit
    roundoff, both against the model's float64 replay. Each of the 2 data-parallel ranks
    keeps the master of its half of the rows only."""
    common = ["compression.grad_mode=subspace", "train.steps=3", "train.eval_interval=0"]
    raws = [
        tiny_config(tmp_path / "fp32", corpus, *common),
        tiny_config(tmp_path / "bf16_zero1", corpus, *common, "train.precision=bf16"),
        tiny_config(
            tmp_path / "bf16_zero2",
            corpus,
            *common,
            "train.precision=bf16",
            "deepspeed.zero_optimization.stage=2",
        ),
    ]
    results = run_distributed(_bf16_subspace_rank, 2, tmp_path, raws, [{}, None, None], timeout=300)
    fp32, *bf16_runs = results[0]
    replay, exact = fp32_and_float64_replays(results, 0)
    assert all(m is None for m in fp32["masters"])  # fp32 weights are their own masters
    # The fp32 run against its replays (as the layouts are), so that its error is a rounding
    # error: a wrong replay would make it O(1) and the bound below vacuous.
    assert_as_accurate_as_replay(fp32["history"], replay, exact, "fp32")
    for name, run in zip(("bf16_zero1", "bf16_zero2"), bf16_runs, strict=True):
        # The bf16 run rounds the weights, activations and gradients that the fp32 run rounds,
        # with u = 2^-8 for 2^-24 (its GEMMs accumulate in fp32, so fewer of its roundings are
        # 2^-8 than the fp32 run's are 2^-24): its losses' error is bounded by the fp32 run's
        # bound scaled by 2^16 (tests/helpers/tolerances.py, baseline_dtype). A scale, not a
        # proof, and a loose one: measured 8.2e-4 absolute (bf16, ZeRO 1 and 2) against a
        # bound of 0.11 (the fp32 run's error 4.7e-7; 0.007 of it).
        steps = [r["step"] - 1 for r in run["history"]]
        assert_as_accurate_as(
            {"loss": history_losses(run["history"])},
            {"loss": history_losses(fp32["history"])},
            {"loss": exact["losses"][steps]},
            torch.bfloat16,
            name,
            baseline_dtype=torch.float32,
        )
        for weight, (start, master) in zip(run["weights"], run["masters"], strict=True):
            rows = weight[start : start + master.shape[0]]
            assert weight.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert master.shape[0] == weight.shape[0] // 2  # rank 0's half
            assert torch.equal(rows, master.to(torch.bfloat16))
            assert not torch.equal(master, rows.float())  # finer than bf16


# -- through the deepspeed launcher --------------------------------------------------------------


LAUNCHED_STEPS = 16
LAUNCHED = [f"train.steps={LAUNCHED_STEPS}", "checkpoint.interval=4", "train.eval_interval=4"]


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory, corpus) -> dict:
    """One uninterrupted 16-step run through the launcher: ``compact``/``lift``, ZeRO 1, DP=2,
    a checkpoint and a validation loss every 4 steps."""
    tmp = tmp_path_factory.mktemp("launched")
    config_file = tmp / "config.json"
    config_file.write_text(json.dumps(tiny_config(tmp / "run", corpus)))
    log = tmp / "launcher.log"
    port = free_port()
    returncode = wait_or_kill(launch_deepspeed(config_file, LAUNCHED, log, port))
    return {
        "returncode": returncode,
        "port": port,
        "run_dir": tmp / "run",
        "config_file": config_file,
        "output": log.read_text(),
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_launched_cpu_run_leaves_no_shared_memory_behind(launched_run):
    """DeepSpeed's CPU backend maps a 69 MB /dev/shm buffer per rank and never removes it; the
    launcher unlinks the names once every rank mapped them, so a finished run leaves no RAM
    behind (a suite of such runs once filled a 24 GB machine)."""
    from actcomp_dist.training.distributed import CPU_ALLREDUCE_BUFFER_PREFIX

    assert launched_run["returncode"] == 0, launched_run["output"][-3000:]
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this system")
    left = [
        p.name
        for p in shm.iterdir()
        if p.name.startswith(CPU_ALLREDUCE_BUFFER_PREFIX) and f"_{launched_run['port']}_" in p.name
    ]
    assert left == []


@pytest.mark.slow
@pytest.mark.distributed
def test_launcher_trains_the_tiny_config(launched_run):
    """What a user sees: the loss falls from ln(V); metrics.jsonl has every required field with
    the scheduled lr and consistent tokens/s; validation every 4 steps; the resolved config in
    RUN_DIR/config.json; complete checkpoints every 4 steps; a progress line per step."""
    assert launched_run["returncode"] == 0, launched_run["output"][-3000:]
    run_dir = launched_run["run_dir"]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, LAUNCHED_STEPS + 1))
    _assert_loss_falls(records)
    config = load_run_config(launched_run["config_file"], LAUNCHED)
    for record in records:
        assert METRIC_KEYS <= record.keys()
        # The trainer's float64 closed forms: a few roundings (~1e-16) apart at most.
        assert record["lr"] == pytest.approx(
            learning_rate(record["step"] - 1, config.train), rel=1e-12
        )
        tokens = config.train.global_batch_size * config.data.seq_length
        assert record["tokens_per_s"] == pytest.approx(tokens / record["step_time_s"], rel=1e-12)
        assert record["saved_activation_bytes"] == records[0]["saved_activation_bytes"] > 0
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
        assert ("val_loss" in record) == (record["step"] % 4 == 0)
    assert records[-1]["val_loss"] < records[3]["val_loss"]
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict())
    )
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{s:07d}" for s in (4, 8, 12, 16)]
    # DeepSpeed's own tools find the newest step through `latest` (written after its marker).
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == "step_0000016/step_0000016"
    assert all((run_dir / "checkpoints" / name / "COMPLETE").is_file() for name in checkpoints)
    # The model as built is recorded, so export tools need no guessing.
    from actcomp_dist.models import LlamaConfig

    state = json.loads((run_dir / "checkpoints" / checkpoints[-1] / "trainer.json").read_text())
    assert LlamaConfig.from_dict(state["model_config"]).vocab_size == VOCAB
    output = launched_run["output"]
    # One progress line per step on rank 0 only, and one end-of-run summary.
    for step in range(1, LAUNCHED_STEPS + 1):
        assert output.count(f"step {step}/{LAUNCHED_STEPS} | elapsed ") == 1, step
    assert output.count(f"done: step {LAUNCHED_STEPS}/{LAUNCHED_STEPS}, ") == 1
    assert f"checkpoint: {run_dir / 'checkpoints' / checkpoints[-1]}" in output
    # The start-up report: measured bytes equal the analytic prediction, and the same batch
    # run uncompressed saves more.
    measured, predicted, uncompressed = startup_saved_bytes(output)
    assert measured == predicted != uncompressed
    # Model states of the second step, measured and predicted (tests/distributed/test_model_states.py
    # checks them by category); lift mode reduces no m x n gradient as m x r.
    match = re.search(
        r"model states per rank: measured ([\d.]+) MiB \(.+?\); predicted ([\d.]+) MiB \| "
        r"data-parallel gradient reduction per step: 0 B compressed",
        output,
    )
    assert match, output[-3000:]
    assert abs(float(match.group(1)) - float(match.group(2))) <= 0.05 * float(match.group(2))


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_one_rank_checkpoints_and_resume_matches(launched_run, tmp_path):
    """SIGTERM to rank 1 only, mid-run: both ranks stop at the same step boundary, save one
    checkpoint and exit 0; ``checkpoint.resume=latest`` then runs to the end, and the losses of
    the whole interrupted run equal the uninterrupted run's bit for bit."""
    assert launched_run["returncode"] == 0
    run_dir = tmp_path / "run"
    overrides = [*LAUNCHED, f"run_dir={run_dir}"]
    launcher = launch_deepspeed(launched_run["config_file"], overrides, tmp_path / "preempted.log")
    try:
        rank1 = rank_pid(launcher, 1)
        wait_for_step(run_dir, 2, launcher)
        os.kill(rank1, signal.SIGTERM)
    finally:
        returncode = wait_or_kill(launcher)
    output = (tmp_path / "preempted.log").read_text()
    assert returncode == 0, output[-3000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 2 <= stopped_at < LAUNCHED_STEPS
    assert f"preemption requested: saving at step {stopped_at} and exiting" in output
    # Every rank knows it stopped; rank 0 alone says so, and sums the run up.
    assert output.count("resume with checkpoint.resume=latest") == 1
    assert output.count(f"stopped early (preemption): step {stopped_at}/{LAUNCHED_STEPS}") == 1
    assert (run_dir / "checkpoints" / f"step_{stopped_at:07d}" / "COMPLETE").is_file()

    resume = launch_deepspeed(launched_run["config_file"], overrides, tmp_path / "resumed.log")
    assert wait_or_kill(resume) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert (
        f"resumed from {run_dir / 'checkpoints'}/step_{stopped_at:07d}"
        in (tmp_path / "resumed.log").read_text()
    )
    assert compared_fields(read_metrics(run_dir)) == compared_fields(
        read_metrics(launched_run["run_dir"])
    )


# -- bad inputs --------------------------------------------------------------------------------


def _copy_run(source: Path, target: Path) -> None:
    """A copy of a finished run with only its latest checkpoint (what resume=latest reads)."""
    older = [f"step_{s:07d}" for s in range(1, LAUNCHED_STEPS)]
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*older))


def _set_format_version(path: Path, version: int) -> None:
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["format_version"] == 1  # what a save records
    (path / "COMPLETE").write_text(json.dumps({**marker, "format_version": version}))


BAD_INPUTS = {
    # name: (overrides, prepare the copied run dir or None for a fresh one, expected message)
    "unknown_key": (
        ["train.stepz=3"],
        None,
        "unknown key(s) ['train.stepz']; valid keys in 'train'",
    ),
    # Refused without CUDA; on a CUDA machine a policy a kind cannot take stands in.
    "storage_policy_refused": (
        ["memory.policy.swiglu=offload"],
        None,
        "memory.policy.swiglu='offload' needs a CUDA device (it keeps the tensor in pinned host "
        "memory instead of device memory",
    )
    if not torch.cuda.is_available()
    else (
        ["memory.policy.fc1=int8"],
        None,
        "memory.policy.fc1='int8' is not implemented yet for kind 'fc1'",
    ),
    "recompute_removes_nothing": (
        ["memory.policy.norm=recompute"],
        None,
        "memory.policy.norm='recompute' removes no bytes: it would keep the norm's input",
    ),
    "block_input_needs_full_checkpointing": (
        ["memory.policy.block_input=lowrank:16"],
        None,
        "memory.policy.block_input='lowrank:16' packs the block input that full checkpointing "
        "keeps; it needs activation_checkpointing.mode='full' (got 'none')",
    ),
    "unknown_lr_scale_group": (
        ["train.lr_scale.attention=0.5"],
        None,
        "unknown key(s) ['train.lr_scale.attention']; valid keys in 'train.lr_scale': "
        "['default', 'qkv', 'proj', 'fc1', 'fc2', 'embedding', 'norm', 'output']",
    ),
    "changed_lr_scale": (
        ["checkpoint.resume=latest", "train.lr_scale.qkv=0.25"],
        lambda ckpts: None,
        "was written with other settings that an exact resume needs (train.lr_scale.qkv: "
        "checkpoint 1.0 -> config 0.25)",
    ),
    "missing_data": (
        ['data.paths=["/nonexistent/corpus"]'],
        None,
        "data.paths: /nonexistent/corpus.bin not found",
    ),
    "tp_not_dividing": (
        ["parallel.tensor_parallel=3"],
        None,
        "parallel.tensor_parallel=3 does not divide the world size 2",
    ),
    "block_projection_tp": (
        [
            "parallel.tensor_parallel=2",
            "compression.row_parallel_projection=block",
            "compression.row_parallel_blocks=3",
        ],
        None,
        "compression.row_parallel_projection='block' needs the tensor-parallel size 2",
    ),
    "subspace_zero3": (
        ["compression.grad_mode=subspace", "deepspeed.zero_optimization.stage=3"],
        None,
        "compression.grad_mode='subspace' is not supported with ZeRO stage 3",
    ),
    "flipped_byte": (
        ["checkpoint.resume=latest"],
        lambda ckpts: flip_a_byte(
            ckpts / "step_0000016" / "step_0000016" / "mp_rank_00_model_states.pt"
        ),
        "is damaged: step_0000016/mp_rank_00_model_states.pt differs from what was saved",
    ),
    "truncated_file": (
        ["checkpoint.resume=latest"],
        lambda ckpts: truncate(ckpts / "step_0000016" / "rank_00001.pt"),
        "is damaged: rank_00001.pt differs from what was saved",
    ),
    "newer_format_version": (
        ["checkpoint.resume=latest"],
        lambda ckpts: _set_format_version(ckpts / "step_0000016", 2),
        "has format version 2; this actcomp_dist reads version 1 only (it was written by a "
        "newer actcomp_dist: resume with that version, or start a new run_dir)",
    ),
    "changed_compression": (
        ["checkpoint.resume=latest", "compression.rank=0.5", "compression.resample_every=4"],
        lambda ckpts: None,
        "different compression config (rank: checkpoint 0.25 -> config 0.5; resample_every: "
        "checkpoint 2 -> config 4)",
    ),
    # DeepSpeed's own parser reads the section before the data cache or run dir is written.
    "bad_deepspeed_key": (
        ["deepspeed.zero_optimization.stagee=1"],
        None,
        "deepspeed: 1 validation error for DeepSpeedZeroConfig stagee Extra inputs",
    ),
    "tokenizer_without_paths": (
        ["data.paths=[]"],
        None,
        "is set but data.paths is not: the embedded corpus brings its own tokenizer",
    ),
    # Resume drift (issue 16 item 3): refused before the engine is built, not a state_dict
    # traceback after it; the launched run has 2 layers, seed 1234, fp32.
    "changed_model_shape": (
        ["checkpoint.resume=latest", "model.overrides.num_layers=3", "train.seed=7"],
        lambda ckpts: None,
        "was written with other settings that an exact resume needs (model.num_layers: "
        "checkpoint 2 -> config 3; train.seed: checkpoint 1234 -> config 7)",
    ),
    "shape_change_not_allowable": (
        ["checkpoint.resume=latest", 'checkpoint.allow_changes=["model.num_layers"]'],
        lambda ckpts: None,
        "checkpoint.allow_changes: 'model.num_layers' cannot be allowed",
    ),
    "checkpoints_without_resume": (
        ["checkpoint.resume=null"],
        lambda ckpts: None,
        "already holds checkpoints of a run; set checkpoint.resume=latest",
    ),
}


@pytest.mark.slow
@pytest.mark.distributed
def test_bad_inputs_fail_on_every_rank_and_change_nothing(launched_run, tmp_path):
    """Every rank prints the one clear message and exits 2 (before any collective: no hang),
    no traceback; a fresh run dir is not created, an existing one (a copy of the launched run,
    damaged as the case says) is byte-for-byte unchanged afterwards."""
    assert launched_run["returncode"] == 0
    names = list(BAD_INPUTS)
    for batch in (names[i : i + 2] for i in range(0, len(names), 2)):  # 4 processes at a time
        started = {name: _start_bad_input(name, launched_run, tmp_path) for name in batch}
        for name, (ranks, run_dir, before) in started.items():
            message = BAD_INPUTS[name][2]
            for rank, process in enumerate(ranks):
                assert wait_or_kill(process, timeout=120) == 2, (name, rank)
                err = (tmp_path / name / f"rank{rank}.err").read_text()
                assert f"error (rank {rank}/2): " in err and message in err, (name, err)
                assert "Traceback" not in err, (name, err)
            if before is None:
                assert not run_dir.exists(), name
            else:
                assert tree_hashes(run_dir) == before, name


def _start_bad_input(name: str, launched_run: dict, tmp_path: Path) -> tuple:
    overrides, prepare, _ = BAD_INPUTS[name]
    case_dir = tmp_path / name
    run_dir = case_dir / "run"
    case_dir.mkdir()
    if prepare is not None:
        _copy_run(launched_run["run_dir"], run_dir)
        prepare(run_dir / "checkpoints")
    before = tree_hashes(run_dir) if run_dir.exists() else None
    config = launched_run["config_file"]
    ranks = srun_ranks(config, [*overrides, f"run_dir={run_dir}"], case_dir)
    return ranks, run_dir, before


@pytest.mark.slow
@pytest.mark.distributed
def test_allowed_change_resumes_and_is_logged(launched_run, tmp_path):
    """``checkpoint.allow_changes`` lets a deliberate change of an exactness setting through:
    the run resumes, trains its one more step, and says what changed (log and metrics)."""
    assert launched_run["returncode"] == 0
    run_dir = tmp_path / "run"
    _copy_run(launched_run["run_dir"], run_dir)
    overrides = [
        f"run_dir={run_dir}",
        "checkpoint.resume=latest",
        f"train.steps={LAUNCHED_STEPS + 1}",
        "train.seed=7",
        'checkpoint.allow_changes=["train.seed"]',
    ]
    ranks = srun_ranks(launched_run["config_file"], overrides, tmp_path)
    assert [wait_or_kill(process, timeout=180) for process in ranks] == [0, 0]
    record = read_metrics(run_dir)[-1]
    assert record["step"] == LAUNCHED_STEPS + 1
    assert record["resume_changed"] == {
        "train.steps": [LAUNCHED_STEPS, LAUNCHED_STEPS + 1],
        "train.seed": [1234, 7],
    }
    out = (tmp_path / "rank0.out").read_text()
    assert "train.seed 1234 -> 7" in out


@pytest.mark.slow
@pytest.mark.distributed
def test_launcher_exits_non_zero_on_a_changed_compression_config(launched_run, tmp_path):
    """The same refusal through the ``deepspeed`` launcher: it exits non-zero with the message
    (the launcher stops the other rank as soon as one fails)."""
    run_dir = tmp_path / "run"
    _copy_run(launched_run["run_dir"], run_dir)
    before = tree_hashes(run_dir)
    log = tmp_path / "launcher.log"
    launcher = launch_deepspeed(
        launched_run["config_file"],
        [*LAUNCHED, f"run_dir={run_dir}", "compression.method=lowrank"],
        log,
    )
    assert wait_or_kill(launcher, timeout=120) != 0
    assert "method: checkpoint 'compact' -> config 'lowrank'" in log.read_text()
    assert tree_hashes(run_dir) == before
