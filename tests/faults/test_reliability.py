"""Reliability (issue 16): the non-finite guard, safe checkpoint rotation, strict metrics.

Faults are injected into real runs (2 gloo ranks forked by :func:`tests.helpers.distributed.run_distributed`,
the launcher's own ``main`` so exit codes and messages are the ones a user sees, DeepSpeed
ZeRO 0 and 1, the ``compact`` model on the small test corpus of ``tests/conftest.py``):

- a NaN written into one weight on one rank (a memory fault, a corrupted shard): every step's
  loss is NaN on that rank;
- a NaN gradient on one rank for one step (the loss stays finite: only the gradient norm tells).

References: the state before the faulty step (parameters, AdamW moments and step counts, LR
schedule, compression schedule: all bit-identical after a skipped step), the closed-form LR
schedule, the checkpoint directory's bytes before the failing run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training import run_lock
from actcomp_dist.training.config import load_run_config
from actcomp_dist.training.guard import NONFINITE_EXIT_CODE, NonFiniteGuard
from actcomp_dist.training.schedule import learning_rate
from tests.helpers.distributed import run_distributed
from tests.helpers.launcher import srun_ranks, wait_or_kill
from tests.helpers.run_files import tree_hashes
from tests.helpers.runs import ROOT, tiny_config


def _strict(line: str) -> dict:
    """``json.loads`` that rejects NaN / Infinity, as strict JSON parsers do."""

    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def _strict_metrics(run_dir: Path) -> list[dict]:
    return [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- fault injection (in the rank) -------------------------------------------------------------


def _poison_weight(trainer, rank: int, at_step: int) -> None:
    """From the first forward of step ``at_step + 1`` on, one weight of rank 1 is NaN."""
    weight = trainer.model.final_norm.weight

    def pre_hook(module, args):
        if rank == 1 and trainer.step == at_step:
            with torch.no_grad():
                weight[0] = float("nan")

    trainer.model.register_forward_pre_hook(pre_hook)


def _snapshot(trainer) -> dict:
    """Everything a skipped step must leave alone."""
    engine = trainer.engine
    optimizer = engine.basic_optimizer  # the torch AdamW (over ZeRO's fp32 partitions at ZeRO 1)
    moments = [
        value.clone() if torch.is_tensor(value) else value
        for state in optimizer.state.values()
        for value in state.values()
    ]
    return {
        "parameters": [p.detach().clone() for p in trainer.model.parameters()],
        "optimizer_parameters": [
            p.detach().clone() for group in optimizer.param_groups for p in group["params"]
        ],
        "optimizer_state": moments,
        "lr_schedule": engine.lr_scheduler.state_dict()["last_epoch"],
        "compression_schedule": trainer.schedule.state_dict(),
    }


def _poison_gradient(trainer, rank: int, at_step: int, snapshots: dict) -> None:
    """Rank 0's gradient of one weight is NaN in step ``at_step + 1`` only; the state is
    recorded before that step and before the next one."""
    weight = trainer.model.final_norm.weight
    weight.register_hook(
        lambda grad: grad * float("nan") if rank == 0 and trainer.step == at_step else grad
    )

    def pre_hook(module, args):
        for name, step in (("before", at_step), ("after", at_step + 1)):
            if trainer.step == step and name not in snapshots:
                snapshots[name] = _snapshot(trainer)

    trainer.model.register_forward_pre_hook(pre_hook)


def _run_with_faults(config, faults, snapshots):
    from actcomp_dist.training.trainer import Trainer

    trainer = Trainer(config)
    try:
        rank = torch.distributed.get_rank()
        for kind, at_step in faults:
            if kind == "weight":
                _poison_weight(trainer, rank, at_step)
            else:
                _poison_gradient(trainer, rank, at_step, snapshots)
        return trainer.train()
    finally:
        trainer.close()


def _main(config_file: Path, overrides: list[str], faults=()) -> dict:
    """``launch/pretrain.py``'s ``main`` in this rank: exit code, stderr, recorded state."""
    from actcomp_dist.training.cli import main

    argv = ["--config", str(config_file)]
    for override in overrides:
        argv += ["--set", override]
    snapshots: dict = {}
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            argv, run=functools.partial(_run_with_faults, faults=faults, snapshots=snapshots)
        )
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "snapshots": snapshots,
    }


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))
    return path


# -- stop: the default ---------------------------------------------------------------------------


def _stop_rank(rank: int, world_size: int, config_file: str) -> dict:
    checkpoints = Path(config_file).parent / "run" / "checkpoints"
    metrics = checkpoints.parent / "metrics.jsonl"
    results = {"infinite_lr": _main(config_file, ["train.lr=Infinity"])}
    results["good"] = _main(config_file, ["train.steps=2"])
    torch.distributed.barrier()
    if rank == 0:
        results["hashes_before"] = tree_hashes(checkpoints)
    results["diverged"] = _main(config_file, ["train.steps=4"], faults=[("weight", 2)])
    if rank == 0:
        results["hashes_after"] = tree_hashes(checkpoints)
        results["metrics_after"] = metrics.read_text()
    torch.distributed.barrier()
    results["resumed"] = _main(config_file, ["train.steps=4"])
    return results


@pytest.mark.distributed
def test_non_finite_loss_stops_without_saving_and_the_good_checkpoint_resumes(tmp_path, corpus):
    """``train.lr=Infinity`` is refused (exit 2 on every rank, nothing written). Then a run
    resumes from a good checkpoint at step 2 (``keep=1``) and its loss turns NaN on one rank
    at step 3: both ranks exit with code 3 and one line; the checkpoint directory is byte for
    byte what it was (nothing saved, nothing rotated away); metrics.jsonl is strict JSON and
    logs step 3 as skipped with ``loss: null``. The same command without the fault resumes
    from step 2 and finishes, and its record of step 3 replaces the diverged one."""
    run_dir = tmp_path / "run"
    raw = tiny_config(
        run_dir,
        corpus,
        "train.eval_interval=0",
        "checkpoint.interval=1",
        "checkpoint.keep=1",
        "checkpoint.resume=latest",
    )
    config_file = _write_config(tmp_path / "config.json", raw)
    ranks = run_distributed(_stop_rank, 2, tmp_path, str(config_file), timeout=300)

    for rank, results in enumerate(ranks):
        refused = results["infinite_lr"]
        assert refused["code"] == 2
        assert f"error (rank {rank}/2): " in refused["stderr"]
        assert "train.lr=inf must be finite" in refused["stderr"]
        assert results["good"]["code"] == 0, results["good"]["stderr"]
        diverged = results["diverged"]
        assert diverged["code"] == NONFINITE_EXIT_CODE, diverged["stderr"]
        assert f"stopped (rank {rank}/2): step 3: non-finite loss" in diverged["stderr"]
        assert "Traceback" not in diverged["stderr"]
        assert results["resumed"]["code"] == 0, results["resumed"]["stderr"]

    before, after = ranks[0]["hashes_before"], ranks[0]["hashes_after"]
    assert before == after
    # The good step 2 and DeepSpeed's `latest` pointing at it, byte for byte as before.
    assert "latest" in before
    assert all(name.startswith("step_0000002/") for name in before if name != "latest")
    diverged_records = [_strict(line) for line in ranks[0]["metrics_after"].splitlines()]
    assert [r["step"] for r in diverged_records] == [1, 2, 3]
    last = diverged_records[-1]
    assert last["skipped"] is True and last["loss"] is None and last["skipped_steps"] == 1
    assert {"loss", "grad_norm"} <= set(last["nonfinite"])

    records = _strict_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and "nonfinite" not in r for r in records)
    assert [r["step"] for r in records[2:]] == [3, 4] and "skipped" not in records[2]
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in checkpoints.glob("step_*")] == ["step_0000004"]
    assert ckpt.is_healthy(checkpoints / "step_0000004")
    assert (checkpoints / "latest").read_text() == "step_0000004/step_0000004"


# -- skip --------------------------------------------------------------------------------------

SKIP_LAYOUTS = {
    # ZeRO 0 in fp32: the overflow check the trainer adds (engine.py).
    "lift_zero0": ["deepspeed.zero_optimization.stage=0"],
    # ZeRO 1 in bf16: DeepSpeed's check_grad_overflow.
    "lift_bf16_zero1": ["train.precision=bf16"],
    # ZeRO 1: DeepSpeed's own. The subspace merge (outside DeepSpeed) must be skipped too:
    # with weight decay, a merge changes the weights even when the proxies hold no update.
    "subspace_zero1": [
        "compression.grad_mode=subspace",
        "compression.resample_every=1",
        "train.weight_decay=0.1",
    ],
}


def _skip_rank(rank: int, world_size: int, config_files: list[str]) -> list[dict]:
    # Step 2: a NaN gradient (loss finite); from step 4 on: a NaN weight (loss NaN).
    faults = [("gradient", 1), ("weight", 3)]
    return [_main(config_file, [], faults=faults) for config_file in config_files]


@pytest.mark.distributed
def test_skip_policy_leaves_the_state_alone_counts_and_stops_after_n(tmp_path, corpus):
    """``train.on_nonfinite=skip``, ``max_skipped_steps=2``: step 2 (NaN gradient on one rank)
    is skipped — parameters, AdamW state, LR schedule and compression schedule bit-identical
    before and after it — and training goes on; steps 4 and 5 (NaN loss) are skipped and the
    run stops there with exit code 3. The lr of each step is the closed-form schedule at the
    number of steps applied before it; the checkpoint of step 3 is written and healthy; nothing
    after it; every metrics line is strict JSON."""
    files = []
    for name, overrides in SKIP_LAYOUTS.items():
        raw = tiny_config(
            tmp_path / name,
            corpus,
            *overrides,
            "train.eval_interval=0",
            "train.on_nonfinite=skip",
            "train.max_skipped_steps=2",
            "checkpoint.interval=3",
        )
        files.append(str(_write_config(tmp_path / f"{name}.json", raw)))
    ranks = run_distributed(_skip_rank, 2, tmp_path, files, timeout=300)

    for index, name in enumerate(SKIP_LAYOUTS):
        for rank in range(2):
            result = ranks[rank][index]
            assert result["code"] == NONFINITE_EXIT_CODE, (name, result["stderr"])
            assert "step 5: 2 steps in a row skipped (last: non-finite loss" in result["stderr"]
            before, after = result["snapshots"]["before"], result["snapshots"]["after"]
            assert before.keys() == after.keys()
            for key in before:
                assert _equal(before[key], after[key]), (name, rank, key)
        records = _strict_metrics(tmp_path / name)
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        assert [r.get("skipped", False) for r in records] == [False, True, False, True, True]
        assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]
        assert records[1]["nonfinite"] == ["grad_norm"] and records[1]["loss"] is not None
        assert {"loss", "grad_norm"} <= set(records[3]["nonfinite"])
        train = load_run_config(files[index]).train
        applied_before = [0, 1, 1, 2, 2]
        assert [r["lr"] for r in records] == pytest.approx(
            [learning_rate(n, train) for n in applied_before], rel=1e-12
        )
        checkpoints = tmp_path / name / "checkpoints"
        assert [p.name for p in checkpoints.glob("step_*")] == ["step_0000003"]
        assert ckpt.is_healthy(checkpoints / "step_0000003")


def _equal(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


# -- rotation ------------------------------------------------------------------------------------


def _fake_checkpoint(directory: Path, step: int, healthy: bool | None) -> Path:
    path = directory / ckpt.checkpoint_name(step)
    path.mkdir(parents=True)
    if healthy is not None:  # None: an incomplete save (no marker)
        (path / ckpt.MARKER).write_text(json.dumps({"step": step, "healthy": healthy}))
    return path


def test_rotation_keeps_the_newest_healthy_checkpoint(tmp_path):
    """``keep=1`` deletes older complete checkpoints but never the newest healthy one, and
    never a directory without a marker (a save that may be under way)."""
    states = {1: True, 2: True, 3: False, 4: False, 5: None}
    paths = {step: _fake_checkpoint(tmp_path, step, h) for step, h in states.items()}
    deleted = ckpt.rotate_checkpoints(tmp_path, keep=1)
    assert deleted == [paths[1], paths[3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ckpt.checkpoint_name(s) for s in (2, 4, 5)
    ]
    # With a healthy newest checkpoint, the older healthy one goes.
    _fake_checkpoint(tmp_path, 6, True)
    assert ckpt.rotate_checkpoints(tmp_path, keep=1) == [paths[2], paths[4]]


# -- one run per run directory -------------------------------------------------------------------


def _wait_for_metrics(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (
        not (run_dir / "metrics.jsonl").is_file()
        or not (run_dir / "metrics.jsonl").read_text().strip()
    ):
        assert process.poll() is None, "the first run ended too early"
        assert time.monotonic() < deadline, "the first run logged nothing"
        time.sleep(0.05)


@pytest.mark.distributed
def test_second_run_on_a_busy_run_dir_is_refused_and_the_first_goes_on(tmp_path, corpus):
    """While a run trains (one process), a second run on the same run_dir (two ranks started
    as ``srun`` starts them, before any process group) is refused on every rank with exit
    code 2 and one line naming the holder's host and pid; the first run then stops cleanly
    (stop file), with every step logged once and its checkpoint, and removes its lock."""
    run_dir = tmp_path / "run"
    raw = tiny_config(run_dir, corpus, "train.steps=10000", "train.eval_interval=0")
    config_file = _write_config(tmp_path / "config.json", raw)
    command = [sys.executable, "launch/pretrain.py", "--config", str(config_file)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_metrics(run_dir, first)
        lock = json.loads((run_dir / "LOCK").read_text())
        assert (lock["host"], lock["pid"]) == (socket.gethostname(), first.pid)
        second = srun_ranks(config_file, [], tmp_path)
        codes = [wait_or_kill(process, timeout=120) for process in second]
        (run_dir / "STOP").touch()
        assert wait_or_kill(first, timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert codes == [2, 2]
    for rank in range(2):
        err = (tmp_path / f"rank{rank}.err").read_text()
        expected = f"is in use by another run: host {socket.gethostname()} pid {first.pid}"
        assert f"error (rank {rank}/2): run_dir {run_dir}" in err and expected in err, err
        assert "Traceback" not in err
    records = _strict_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(steps) + 1))
    assert (run_dir / "checkpoints" / ckpt.checkpoint_name(steps[-1]) / ckpt.MARKER).is_file()
    assert not (run_dir / "LOCK").exists()


def _lock_rank(rank: int, world_size: int, config_file: str, live: dict, stale: dict) -> list:
    lock = Path(config_file).parent / "run" / "LOCK"
    results = []
    for holder in (live, stale):
        if rank == 0:
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(json.dumps(holder))
        torch.distributed.barrier()
        results.append(_main(config_file, []))
        torch.distributed.barrier()  # rank 0 has released the lock, if it held it
        results[-1]["lock_left"] = lock.exists()
    return results


@pytest.mark.distributed
def test_lock_decided_by_rank_0_reaches_every_rank_and_a_stale_lock_is_taken_over(tmp_path, corpus):
    """Inside one process group (rank 0 decides and broadcasts; no rank hangs): a lock held
    by a live process on this host refuses the run on both ranks (exit 2, the lock left
    alone); a lock whose process is gone is taken over with a message, the run trains, and
    the lock is removed at the end."""
    raw = tiny_config(tmp_path / "run", corpus, "train.steps=1", "train.eval_interval=0")
    config_file = _write_config(tmp_path / "config.json", raw)
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid is now free (and not reused within this test, in practice)
    host = socket.gethostname()
    live = {"host": host, "pid": os.getpid(), "slurm_job": None}
    stale = {"host": host, "pid": finished.pid, "slurm_job": None}
    ranks = run_distributed(_lock_rank, 2, tmp_path, str(config_file), live, stale, timeout=300)
    for rank, (refused, taken_over) in enumerate(ranks):
        assert refused["code"] == 2 and refused["lock_left"], refused["stderr"]
        assert f"error (rank {rank}/2): " in refused["stderr"]
        assert f"is in use by another run: host {host} pid {os.getpid()}" in refused["stderr"]
        assert taken_over["code"] == 0, taken_over["stderr"]
        assert not taken_over["lock_left"]
    message = f"pid {finished.pid}: process {finished.pid} on this host is gone"
    assert message in ranks[0][1]["stdout"]


def test_lock_from_another_host_is_refused_and_one_from_before_a_requeue_is_stale(
    tmp_path, monkeypatch
):
    """Before any process group: a lock from another host cannot be checked and refuses the
    run, naming the file to remove — also inside the same SLURM job (two runs in one
    allocation); held by this SLURM job before its requeue, it is stale. No lock passes."""
    run_lock.check_run_lock(tmp_path)
    holder = {"host": "other-node", "pid": 1, "slurm_job": "4242", "slurm_restart": 0}
    (tmp_path / run_lock.LOCK).write_text(json.dumps(holder))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(run_lock.RunLockError) as error:
        run_lock.check_run_lock(tmp_path)
    assert str(error.value) == (
        f"run_dir {tmp_path} is in use by another run: host other-node pid 1 (SLURM job 4242); "
        f"wait for it to finish, use another run_dir, or remove {tmp_path / 'LOCK'} if that "
        f"run is not running"
    )
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_lock.check_run_lock(tmp_path)


def test_guard_verdicts():
    """The policy table of guard.py: ``stop`` ends at the first non-finite step; ``skip`` after
    N in a row (an applied step resets the count); an fp16 skip with a finite loss (the loss
    scaler's search) is tolerated under ``stop`` up to N in a row; a non-finite loss that
    DeepSpeed nevertheless applied always stops."""
    stop = NonFiniteGuard("stop", max_skipped_steps=2, precision="fp32")
    assert stop.after_step(1, loss_finite=True, applied=True) is None
    assert "step 2: non-finite gradient norm" in stop.after_step(2, True, applied=False)
    assert "step 3: non-finite loss" in NonFiniteGuard("stop", 2, "bf16").after_step(
        3, False, False
    )

    skip = NonFiniteGuard("skip", max_skipped_steps=2, precision="fp32")
    verdicts = [
        skip.after_step(step, loss_finite, applied)
        for step, loss_finite, applied in [(1, False, False), (2, True, True), (3, True, False)]
    ]
    assert verdicts == [None, None, None]
    assert "step 4: 2 steps in a row skipped" in skip.after_step(4, False, False)

    fp16 = NonFiniteGuard("stop", max_skipped_steps=2, precision="fp16")
    assert fp16.after_step(1, loss_finite=True, applied=False) is None
    assert "2 steps in a row skipped" in fp16.after_step(2, True, False)
    assert "DeepSpeed applied the update" in fp16.after_step(3, False, True)


# -- disk space before a save ----------------------------------------------------------------------


def _disk_rank(rank: int, world_size: int, config_file: str) -> dict:
    """Rank 0's filesystem reports ``free["bytes"]`` free (``shutil.disk_usage`` replaced in
    this forked rank only): too little for a first save (the estimate), plenty (step 1 saved),
    then one byte less than step 1's checkpoint for the save of step 2."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 10}
    shutil.disk_usage = lambda path: usage(1 << 62, 0, free["bytes"])
    checkpoints = Path(config_file).parent / "run" / "checkpoints"
    results = {"first": _main(config_file, ["train.steps=1"])}
    results["first_left"] = sorted(p.name for p in checkpoints.glob("*"))
    free["bytes"] = 1 << 60
    results["good"] = _main(config_file, ["train.steps=1"])
    torch.distributed.barrier()
    step_1 = checkpoints / "step_0000001"
    results["step_1_bytes"] = ckpt.checkpoint_bytes(step_1)
    results["model_config"] = json.loads((step_1 / ckpt.TRAINER_STATE).read_text())["model_config"]
    free["bytes"] = results["step_1_bytes"] - 1
    before = tree_hashes(checkpoints) if rank == 0 else None
    torch.distributed.barrier()
    results["second"] = _main(config_file, ["train.steps=2"])
    torch.distributed.barrier()
    results["unchanged"] = rank != 0 or tree_hashes(checkpoints) == before
    return results


@pytest.mark.distributed
def test_a_save_without_the_disk_space_is_refused_on_every_rank_before_writing(tmp_path, corpus):
    """Rank 0 compares its filesystem's free bytes with the last checkpoint's size (the first:
    an estimate from the parameter count) and every rank gets the verdict: exit 2, one line
    with both numbers, nothing written, the previous checkpoint intact."""
    from actcomp_dist.models import LlamaConfig, parameter_count

    raw = tiny_config(
        tmp_path / "run",
        corpus,
        "train.eval_interval=0",
        "checkpoint.interval=1",
        "checkpoint.resume=latest",
    )
    config_file = _write_config(tmp_path / "config.json", raw)
    ranks = run_distributed(_disk_rank, 2, tmp_path, str(config_file), timeout=300)
    # fp32 weights and AdamW's two fp32 moments per parameter (all trained, TP=1).
    params = parameter_count(LlamaConfig.from_dict(ranks[0]["model_config"]))
    for rank, results in enumerate(ranks):
        first, second = results["first"], results["second"]
        assert first["code"] == 2, first["stderr"]
        assert (
            f"error (rank {rank}/2): step 1: not enough disk space to save a checkpoint in "
            f"{tmp_path / 'run' / 'checkpoints'}: 10 bytes free, {12 * params:,} needed "
            f"(estimated)" in first["stderr"]
        )
        assert results["first_left"] == []
        assert results["good"]["code"] == 0, results["good"]["stderr"]
        size = results["step_1_bytes"]
        assert second["code"] == 2, second["stderr"]
        assert (
            f"error (rank {rank}/2): step 2: not enough disk space to save a checkpoint in "
            f"{tmp_path / 'run' / 'checkpoints'}: {size - 1:,} bytes free, {size:,} needed "
            f"(the size of step_0000001)" in second["stderr"]
        )
        assert "Traceback" not in first["stderr"] + second["stderr"]
        assert results["unchanged"] is True
