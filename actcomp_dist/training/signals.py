"""Preemption: SIGTERM/SIGUSR1 ask for a checkpoint-and-exit at the next step boundary.

SLURM sends SIGUSR1 (``--signal=USR1@T``) or SIGTERM before it preempts or times out a job,
often to only some ranks. A handler only sets a flag; at each step boundary the ranks
all-reduce the flag (MAX), so they agree on the same step, save one consistent checkpoint and
exit cleanly, and the requeued job resumes from it.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
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

    def should_stop(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
