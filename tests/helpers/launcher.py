"""Start real training processes as a user would, and watch them from the test.

Two ways to start the 2-rank CPU run of ``launch/pretrain.py``: :func:`launch_deepspeed`
through the ``deepspeed`` launcher (which kills the other ranks as soon as one fails), and
:func:`srun_ranks`, two processes started as ``srun`` starts them (``SLURM_PROCID``...), so
every rank's message and exit status are seen on their own. Every process gets its own process
group (``start_new_session``) so that :func:`wait_or_kill` can kill a hung one whole;
:func:`rank_pid` and :func:`wait_for_step` find a rank and a logged step to signal a run at.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.helpers.runs import ROOT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous port of a launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_deepspeed(
    config_file: Path, overrides: list[str], log: Path, port: int | None = None
) -> subprocess.Popen:
    """``deepspeed --num_gpus 2 launch/pretrain.py --config FILE --set ...`` (in its own
    process group, so a hang can be killed whole), stdout and stderr to ``log``."""
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--master_port",
        str(port or free_port()),
        "--num_gpus",
        "2",
        "launch/pretrain.py",
        "--config",
        str(config_file),
    ]
    for override in overrides:
        command += ["--set", override]
    with open(log, "w") as stream:
        return subprocess.Popen(
            command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_or_kill(process: subprocess.Popen, timeout: float = 300) -> int:
    """The exit status of ``process``; past ``timeout`` seconds its whole process group is
    killed and :class:`subprocess.TimeoutExpired` raised, so a hang fails the test."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def srun_ranks(config_file: Path, overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two ranks started the way ``srun`` starts them: each with its SLURM_PROCID, its output
    in ``log_dir/rank{r}.out`` and ``.err``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    command = [sys.executable, "launch/pretrain.py", "--config", str(config_file)]
    for override in overrides:
        command += ["--set", override]
    processes = []
    for rank in range(2):
        env_rank = dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        with (
            open(log_dir / f"rank{rank}.out", "w") as out,
            open(log_dir / f"rank{rank}.err", "w") as err,
        ):
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env_rank, stdout=out, stderr=err, start_new_session=True
                )
            )
    return processes


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of the launcher's child process with ``RANK=rank``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                command = " ".join(child.cmdline())
                if child.environ().get("RANK") == str(rank) and "pretrain.py" in command:
                    return child.pid
            except psutil.Error:
                continue
        assert launcher.poll() is None, "the launcher exited before its ranks were found"
        time.sleep(0.05)
    raise TimeoutError(f"no rank {rank} process under the launcher after {timeout} s")


def wait_for_step(run_dir: Path, step: int, launcher: subprocess.Popen, timeout: float = 120):
    """Return once ``run_dir/metrics.jsonl`` records ``step`` (or a later one); fail if the run
    ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        assert launcher.poll() is None, "the run ended before the signal could be sent"
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not logged after {timeout} s")


def startup_saved_bytes(output: str) -> tuple[str, str, str]:
    """The start-up report's saved bytes per micro-batch: measured, predicted, uncompressed."""
    match = re.search(
        r"saved activations per micro-batch \(per rank\): measured (.+?), predicted (.+?); "
        r"uncompressed (.+?) -> compression (saves|adds)",
        output,
    )
    assert match, output[-3000:]
    return match.group(1), match.group(2), match.group(3)
