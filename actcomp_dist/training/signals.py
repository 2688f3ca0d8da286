"""Preemption: SIGTERM/SIGUSR1 or a stop file ask for a checkpoint-and-exit at the next step.

SLURM sends SIGUSR1 (``--signal=USR1@T``) or SIGTERM before it preempts or times out a job,
often to only some ranks. A handler only sets a flag; at each step boundary the ranks
all-reduce the flag (MAX), so they agree on the same step, save one consistent checkpoint and
exit cleanly, and the requeued job resumes from it.

The stop file (``RUN_DIR/STOP``) is the same request for ranks that never see the signal:
``launch/slurm/pretrain.sbatch`` traps the signal in the batch script (which the ranks, behind
``srun`` and the ``deepspeed`` launcher, do not receive) and creates the file. One rank
watching it is enough (the trainer gives it to rank 0 only); that rank removes it once the
checkpoint is saved, so a later run does not stop at its first step.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_file: str | Path | None = None) -> None:
        self.received: int | None = None
        self.stop_file = None if stop_file is None else Path(stop_file)
        self._previous = {}

    def install(self) -> PreemptionHandler:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def _requested(self) -> bool:
        return self.received is not None or (self.stop_file is not None and self.stop_file.exists())

    def should_stop(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a signal or sees the stop
        file."""
        flag = torch.tensor([1.0 if self._requested() else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def consume_stop_file(self) -> None:
        """Remove the stop file, if this rank watches one (after the checkpoint is saved)."""
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
