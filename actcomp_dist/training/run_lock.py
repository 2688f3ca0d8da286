"""One run per run directory: ``RUN_DIR/LOCK``, held by rank 0 while a run trains.

Two runs in one ``run_dir`` would resume from each other's checkpoints mid-save, write the
same checkpoint directories and interleave ``metrics.jsonl``. The lock file holds the holder's
host, pid and SLURM job id (JSON). It is taken in two stages so that every rank of a refused
run exits with the same one-line error (exit code 2) and none waits in a collective:

1. :func:`check_run_lock`, every rank, before the process group exists (read-only): a lock
   whose holder is alive refuses the run. This is the common case, a run already training.
   (Skipped when the caller made the process group: then stage 2 reaches every rank.)
2. :func:`acquire_run_lock`, collective, right after the process group exists and before
   anything is written: rank 0 creates the file atomically (``O_CREAT | O_EXCL``) and
   broadcasts the outcome, so every rank raises the same error if it lost. Every rank of this
   run has done stage 1 by then (creating the process group waits for all of them), so no rank
   mistakes its own run's fresh lock for another run's.

The race accepted: two runs started within the moment between stage 1 and 2 both pass stage 1;
one wins stage 2 and the other is refused there — unless both also use the same
``MASTER_ADDR:MASTER_PORT``, where the loser already fails to create its process group (a
crash with the port in use, not exit code 2).

A lock is *stale*, and is taken over with a message, when its holder ran on this host and
that pid is gone, or when an earlier incarnation of this SLURM job held it (same
``SLURM_JOB_ID``, smaller ``SLURM_RESTART_COUNT``: a requeued job resumes the run it held
before; two runs inside one allocation still exclude each other). A lock from another host cannot be checked: the error says to
remove the file if that run is not running. Rank 0 removes the lock when the run ends, also
on an exception or a preemption (:meth:`RunLock.release` from the trainer's ``close``).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from actcomp_dist.training.config import ConfigError

LOCK = "LOCK"


class RunLockError(ConfigError):
    """``run_dir`` is in use by another run (a user error: exit code 2)."""


def _holder_identity() -> dict:
    job, restart = _slurm_job()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": job,
        "slurm_restart": restart,
    }


def _slurm_job() -> tuple[str | None, int]:
    """This SLURM job's id and incarnation (``SLURM_RESTART_COUNT`` grows with each
    requeue); ``(None, 0)`` outside SLURM."""
    env = os.environ
    return env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable (being written, or damaged): treated as held by someone unknown
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _stale(holder: dict) -> str | None:
    """Why the lock ``holder`` is stale, or ``None`` if it may still be running."""
    job, restart = _slurm_job()
    held_restart = holder.get("slurm_restart", 0)
    if (
        job is not None
        and holder.get("slurm_job") == job
        and isinstance(held_restart, int)
        and held_restart < restart
    ):
        return f"it was held by this SLURM job {job} before its requeue {restart}"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return f"process {pid} on this host is gone"
    return None


def _describe(holder: dict, run_dir: Path) -> str:
    who = f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"
    if holder.get("slurm_job"):
        who += f" (SLURM job {holder['slurm_job']})"
    return (
        f"run_dir {run_dir} is in use by another run: {who}; wait for it to finish, use "
        f"another run_dir, or remove {run_dir / LOCK} if that run is not running"
    )


def check_run_lock(run_dir: str | Path) -> None:
    """Every rank, before any collective: raise :class:`RunLockError` if a live run holds
    ``run_dir`` (read-only)."""
    if dist.is_initialized():
        # A process group made by the caller (a notebook, a test harness running several runs
        # in one group): every rank reaches stage 2's broadcast, which decides for all. Here
        # a fast rank could otherwise see the lock its rank 0 has not yet released.
        return
    run_dir = Path(run_dir)
    holder = _read(run_dir / LOCK)
    if holder is not None and _stale(holder) is None:
        raise RunLockError(_describe(holder, run_dir))


@dataclass
class RunLock:
    path: Path
    created_dir: bool

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent), and the run
        directory if the lock was all that was ever written there."""
        holder = _read(self.path)
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.path.parent.rmdir()  # only if empty
            except OSError:
                pass
        self.created_dir = False


def _create(run_dir: Path) -> tuple[RunLock | None, str]:
    """Rank 0: take the lock; ``(lock, message to print)`` or ``(None, error)``."""
    path = run_dir / LOCK
    created_dir = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    message = ""
    holder = _read(path)
    if holder is not None:
        reason = _stale(holder)
        if reason is None:
            return None, _describe(holder, run_dir)
        message = (
            f"taking over the stale lock {path} of host {holder.get('host', '?')} pid "
            f"{holder.get('pid', '?')}: {reason}"
        )
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another run took it since the read above
        return None, _describe(_read(path) or {}, run_dir)
    with os.fdopen(fd, "w") as stream:
        json.dump(_holder_identity(), stream)
    return RunLock(path, created_dir), message


def acquire_run_lock(run_dir: str | Path) -> RunLock | None:
    """Collective: rank 0 takes the lock of ``run_dir``; every rank raises
    :class:`RunLockError` if it could not. Returns the lock on rank 0, ``None`` elsewhere."""
    run_dir = Path(run_dir)
    lock, text = _create(run_dir) if dist.get_rank() == 0 else (None, "")
    outcome = [lock is not None, text]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    acquired, text = outcome
    if not acquired:
        raise RunLockError(text)
    if text and dist.get_rank() == 0:
        print(text, flush=True)
    return lock
