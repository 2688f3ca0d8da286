"""Hung-rank watchdog: a rank that stops progressing ends the job with a report, not a hang.

A rank that is stopped (SIGSTOP, a debugger, a swapped-out node) or stuck outside Python (a
driver call that never returns) leaves its peers blocked in the next collective. Two layers
end that wait (``train.collective_timeout_s``, T):

- **The watchdog** (this module), on every rank: a daemon thread checks every few seconds
  whether this rank's model ran a forward pass in the last T seconds (the trainer registers
  :meth:`Watchdog.watch` on the model, so training and evaluation steps both count). If not,
  it reads every rank's heartbeat, prints one line naming the ranks that stopped responding
  or fell behind, and ends the process with :data:`HUNG_EXIT_CODE`. The thread runs while the
  main thread waits in a collective: torch's collectives, DeepSpeed's CPU shared-memory
  all-reduce included, release the GIL while they wait. The launcher then stops the other
  ranks (the ``deepspeed`` launcher kills its remaining children once one exits non-zero).
- **The process group's own timeout**, ``max(2 T, 600 s)`` (given to
  ``deepspeed.init_distributed``): a backstop where the watchdog does not watch or cannot run.
  It is longer than T so that the watchdog, which can name the ranks, fires first (a gloo or
  NCCL collective that times out raises instead, naming nobody), and never below Megatron-LM's
  default of 10 minutes because it also bounds the start-up collectives, where one rank may
  legitimately work alone for minutes (building a dataset index, JIT-compiling an op) while the
  others wait in a barrier. DeepSpeed's CPU shared-memory all-reduce (all ranks on one host)
  has no timeout at all, which is why a stopped rank used to stall such a job forever.

**Heartbeats** go through a side channel that needs no collective: one small JSON file per rank,
``RUN_DIR/heartbeats/rank_NNNNN.json``, rewritten atomically by the watchdog thread every poll
interval (``clamp(T / 10, 1 s, 30 s)``) with the rank's host, pid, last step, the wall time of
its last progress and the wall time of the write itself (``alive``). A rank whose ``alive`` time
is older than three poll intervals has stopped responding (the step it reports is the one of its
last heartbeat: up to a poll interval old): its process is stopped, dead, or hung
with its interpreter blocked. A live rank at an earlier step than the others fell behind. The
files must be visible to every rank, as checkpoints must: a shared run directory on multi-node
jobs (with a node-local one, a rank sees only the ranks of its own node). Wall clocks of
different hosts are compared, so they must agree to within a poll interval (NTP does).

T must exceed the longest gap between two forward passes of a healthy rank: a training step,
an evaluation, a checkpoint save. The default, 600 s, is Megatron-LM's default distributed
timeout (10 minutes) and leaves room for a save of the shipped 1B config's ~21 GB of weights
and optimizer state at 100 MB/s. Start-up (data index building, engine construction) is not
watched: the watchdog starts with the training loop, and the process group's timeout covers
the collectives before it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

HUNG_EXIT_CODE = 4
HEARTBEATS = "heartbeats"
# A rank whose heartbeat is older than this many poll intervals has stopped responding.
STALE_POLLS = 3


# The process group's timeout is never shorter than this (Megatron-LM's default), for the
# start-up collectives the watchdog does not watch.
MIN_PROCESS_GROUP_TIMEOUT_S = 600.0


def process_group_timeout(collective_timeout_s: float) -> timedelta:
    """The timeout given to the process group: twice the watchdog's, so that the watchdog
    (which names the stopped ranks) fires first, and at least
    :data:`MIN_PROCESS_GROUP_TIMEOUT_S`."""
    return timedelta(seconds=max(2 * collective_timeout_s, MIN_PROCESS_GROUP_TIMEOUT_S))


def poll_interval(timeout_s: float) -> float:
    """Seconds between two heartbeats and checks: a tenth of the timeout, within [1, 30]."""
    return min(max(timeout_s / 10, 1.0), 30.0)


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEATS / f"rank_{rank:05d}.json"


def read_heartbeats(run_dir: Path, world_size: int) -> dict[int, dict | None]:
    """Every rank's last heartbeat (``None``: no readable file)."""
    beats: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads(heartbeat_path(run_dir, rank).read_text())
        except (OSError, json.JSONDecodeError):
            beats[rank] = None
    return beats


def describe_hang(
    beats: dict[int, dict | None], rank: int, timeout_s: float, stale_s: float, now: float
) -> str:
    """The report of rank ``rank``, which made no progress for ``timeout_s`` seconds: which
    ranks stopped responding (no heartbeat, or one older than ``stale_s`` at wall time
    ``now``), which fell behind, and what to do."""
    own = beats.get(rank) or {}
    stopped, behind, waiting = [], [], []
    live_steps = [b["step"] for b in beats.values() if b and now - b["alive"] <= stale_s]
    front = max(live_steps, default=own.get("step", 0))
    for other, beat in sorted(beats.items()):
        if beat is None:
            stopped.append(f"rank {other} (no heartbeat)")
        elif now - beat["alive"] > stale_s:
            stopped.append(
                f"rank {other} (host {beat['host']} pid {beat['pid']}, last heartbeat "
                f"{now - beat['alive']:.0f} s ago, at step {beat['step']})"
            )
        elif beat["step"] < front:
            behind.append(f"rank {other} (at step {beat['step']})")
        else:
            waiting.append(other)
    parts = []
    if stopped:
        parts.append("stopped responding: " + ", ".join(stopped))
    if behind:
        parts.append(f"behind step {front}: " + ", ".join(behind))
    if not parts:
        parts.append(
            f"every rank is alive at step {front}: a collective is stuck (ranks {waiting})"
        )
    return (
        f"no progress for {timeout_s:g} s (train.collective_timeout_s) at step "
        f"{own.get('step', '?')}; " + "; ".join(parts) + "; exiting (the last complete "
        "checkpoint is intact: resume with checkpoint.resume=latest once the stopped ranks are "
        "gone)"
    )


class Watchdog:
    """Heartbeat writer and progress check of one rank (see the module docstring).

    ``before_exit``: called (best effort) just before the process ends on a timeout, e.g. to
    release the run-directory lock. :meth:`stop` ends the thread and removes the heartbeat.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        timeout_s: float,
        before_exit: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.poll_s = poll_interval(timeout_s)
        self.before_exit = before_exit
        self.path = heartbeat_path(self.run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self._progress_wall = time.time()
        self._progress = time.monotonic()
        self._stopped = threading.Event()
        self._hooks: list = []
        self._write()
        self._thread = threading.Thread(target=self._run, name="actcomp-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """This rank made progress at ``step`` (no I/O: the thread writes the heartbeat)."""
        self.step = step
        self._progress_wall = time.time()
        self._progress = time.monotonic()

    def watch(self, model: torch.nn.Module, step: Callable[[], int]) -> None:
        """Count every forward pass of ``model`` as progress at ``step()``."""
        self._hooks.append(model.register_forward_pre_hook(lambda *_: self.beat(step())))

    def stop(self) -> None:
        """End the thread and remove the hooks and this rank's heartbeat file. Idempotent."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        beat = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step,
            "progress": self._progress_wall,
            "alive": time.time(),
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(beat))
            tmp.replace(self.path)
        except OSError:
            pass  # a full or vanished file system must not kill a healthy rank; the run reports it

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            self._write()
            if time.monotonic() - self._progress > self.timeout_s:
                self._expire()

    def _expire(self) -> None:
        self._write()  # this rank's own step, current
        beats = read_heartbeats(self.run_dir, self.world_size)
        message = describe_hang(
            beats, self.rank, self.timeout_s, STALE_POLLS * self.poll_s, time.time()
        )
        print(f"hung (rank {self.rank}/{self.world_size}): {message}", file=sys.stderr, flush=True)
        if self.before_exit is not None:
            try:
                self.before_exit()
            except Exception:  # noqa: BLE001 - the exit below must happen whatever fails here
                pass
        sys.stdout.flush()
        # The main thread is blocked in a collective that will not return: end the process
        # from here (an exception in this thread would not reach it).
        os._exit(HUNG_EXIT_CODE)


def start_watchdog(config, model: torch.nn.Module, step: Callable[[], int], run_lock=None):
    """The watchdog of this rank for a run of ``config``: watching ``model``'s forward passes
    as progress at ``step()``; on a timeout it releases ``run_lock`` (rank 0's, or ``None``)."""
    import torch.distributed as dist

    watchdog = Watchdog(
        config.run_dir,
        dist.get_rank(),
        dist.get_world_size(),
        config.train.collective_timeout_s,
        before_exit=run_lock.release if run_lock is not None else None,
    )
    watchdog.watch(model, step)
    return watchdog
