"""A stopped rank ends the job with a report instead of a hang (issue 16 item 5).

Two gloo ranks through the ``deepspeed`` launcher (so DeepSpeed's CPU shared-memory all-reduce,
which has no timeout of its own, is in the path); rank 1 gets SIGSTOP mid-run. The reference:
the checkpoints complete before the stop, verified against their markers afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training.config import load_run_config
from actcomp_dist.training.watchdog import (
    HUNG_EXIT_CODE,
    STALE_POLLS,
    describe_hang,
    poll_interval,
    process_group_timeout,
)
from tests.helpers.launcher import launch_deepspeed, rank_pid, wait_for_step, wait_or_kill
from tests.helpers.runs import ROOT, tiny_config

TIMEOUT_S = 10  # train.collective_timeout_s of the test run; a tiny step takes ~0.1 s


@pytest.mark.slow
@pytest.mark.distributed
def test_sigstop_of_one_rank_stops_the_job_naming_it(tmp_path, corpus):
    """SIGSTOP to rank 1 after step 4: rank 0 reports, within the timeout plus a poll interval
    (and slack), that rank 1 (its pid) stopped responding and exits with code 4; the launcher
    then ends the job with that code. Every checkpoint that was complete stays complete and verifies."""
    run_dir = tmp_path / "run"
    raw = tiny_config(
        run_dir,
        corpus,
        "train.steps=100000",
        "train.eval_interval=0",
        "checkpoint.interval=2",
        f"train.collective_timeout_s={TIMEOUT_S}",
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(raw))
    log = tmp_path / "launcher.log"
    launcher = launch_deepspeed(config_file, [], log)
    try:
        rank0, rank1 = psutil.Process(rank_pid(launcher, 0)), rank_pid(launcher, 1)
        wait_for_step(run_dir, 4, launcher)
        os.kill(rank1, signal.SIGSTOP)
        stopped_at = time.monotonic()
        rank0.wait(timeout=TIMEOUT_S + 60)
        rank0_exited_after = time.monotonic() - stopped_at
        # The launcher waits up to 30 s for the stopped rank to take its SIGTERM, then kills it.
        returncode = wait_or_kill(launcher, timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log.read_text()
    assert returncode == HUNG_EXIT_CODE, output[-3000:]
    match = re.search(r"hung \(rank 0/2\): no progress for 10 s .*", output)
    assert match, output[-3000:]
    assert f"stopped responding: rank 1 (host {os.uname().nodename} pid {rank1}" in match[0]
    assert "resume with checkpoint.resume=latest" in match[0]
    # The watchdog fires T after rank 0's last forward pass (just before the SIGSTOP) plus at
    # most one poll interval (1 s at T = 10 s); the rest is slack for a loaded CI machine.
    assert rank0_exited_after < TIMEOUT_S + poll_interval(TIMEOUT_S) + 15, rank0_exited_after
    compression = load_run_config(config_file).compression.to_dict()
    complete = ckpt.complete_checkpoints(run_dir / "checkpoints")
    assert complete, "no checkpoint was complete before the stop"
    for path in complete:
        ckpt.verify_checkpoint(path, compression)
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == f"{complete[-1].name}/{complete[-1].name}"


def _beat(step: int, alive: float, pid: int = 1) -> dict:
    return {"host": "node", "pid": pid, "step": step, "progress": alive, "alive": alive}


def test_the_report_names_stopped_and_behind_ranks():
    """Rank 0 timed out at wall time 100 (stale after 9 s): rank 1's last heartbeat is 40 s
    old, rank 2 wrote none, rank 3 is alive one step behind; with every rank alive and at one
    step, the report says a collective is stuck."""
    stale = STALE_POLLS * poll_interval(30)
    assert stale == 9.0
    beats = {0: _beat(7, 99), 1: _beat(7, 60, pid=42), 2: None, 3: _beat(6, 98)}
    message = describe_hang(beats, 0, 30, stale, now=100)
    assert message.startswith("no progress for 30 s (train.collective_timeout_s) at step 7; ")
    assert (
        "stopped responding: rank 1 (host node pid 42, last heartbeat 40 s ago, at step 7), "
        "rank 2 (no heartbeat); behind step 7: rank 3 (at step 6); exiting" in message
    )
    alive = {0: _beat(7, 99), 1: _beat(7, 98)}
    assert "every rank is alive at step 7: a collective is stuck (ranks [0, 1])" in describe_hang(
        alive, 0, 30, stale, now=100
    )


def test_the_process_group_timeout_is_the_backstop():
    """Twice the watchdog's (it must fire first), never below Megatron's 10 minutes (the
    start-up collectives, which the watchdog does not watch)."""
    assert process_group_timeout(10).total_seconds() == 600
    assert process_group_timeout(600).total_seconds() == 1200


WATCHED_PROCESS = """
import sys, time
from pathlib import Path
from actcomp_dist.training.watchdog import Watchdog
run_dir = Path(sys.argv[1])
released = run_dir / "released"
watchdog = Watchdog(run_dir, 0, 2, 1.0, before_exit=released.touch)
watchdog.beat(5)
time.sleep(60)  # a main thread that makes no progress, as one blocked in a collective
"""


def test_a_rank_without_progress_exits_4_after_releasing(tmp_path):
    """A process whose watchdog (T = 1 s) sees no progress after step 5, and no heartbeat of
    rank 1: it prints the report, calls ``before_exit`` (the trainer's lock release) and exits
    with code 4 while its main thread still sleeps."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", WATCHED_PROCESS, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == HUNG_EXIT_CODE, stderr
    assert time.monotonic() - started < 30  # not the 60 s sleep
    assert stderr.startswith(
        "hung (rank 0/2): no progress for 1 s (train.collective_timeout_s) at step 5; "
        "stopped responding: rank 1 (no heartbeat); exiting"
    ), stderr
    assert (tmp_path / "released").exists()
    # The heartbeat a peer would read: this rank, alive, at step 5.
    heartbeat = json.loads((tmp_path / "heartbeats" / "rank_00000.json").read_text())
    assert (heartbeat["rank"], heartbeat["pid"], heartbeat["step"]) == (0, process.pid, 5)
