"""Run a test function on several gloo ranks and bring the results back to pytest.

``run_distributed(fn, world_size, tmp_path, *args)`` starts ``world_size`` processes, each
joins a gloo process group rendezvousing through a fresh file in ``tmp_path`` (no ports, so
parallel test runs cannot collide), limits itself to one intra-op thread, and calls
``fn(rank, world_size, *args)``. It returns the ranks' return values in rank order.

Why it is built this way:

- **Start-up cost.** A rank has to import torch and usually megatron-core (about 5 s on the
  2-core CI machine, most of it megatron-core's package ``__init__``). Processes come from a
  ``forkserver`` that imports those modules once per pytest session; every later rank is a
  fork of that warm interpreter, so a 2-rank call costs a fraction of a second instead of
  an import per rank. The server is a fresh interpreter (fork + exec), so forking it is safe
  even though the pytest process itself may already run OpenMP or gloo threads.
- **Failures carry the rank's traceback.** A rank sends back either its pickled return value
  or its formatted traceback over its own pipe; the first failure is raised in the pytest
  process as :class:`DistributedError` naming the rank. Values travel as plain ``pickle``
  bytes (tensors by value): torch's shared-memory reductions would need the child to stay
  alive until the parent has read them.
- **A hang is a failure.** Past ``timeout`` seconds every remaining rank is killed and
  :class:`DistributedTimeoutError` is raised. After the first failure the other ranks get
  ``_GRACE_S`` seconds to finish or fail (a rank blocked in a collective with a dead peer
  usually errors out by itself) and are then killed, so one broken rank never costs the full
  timeout.

``fn`` and ``args`` must be picklable: ``fn`` a module-level function of an importable module
(a test module is fine; a lambda or a nested function is not).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

# Imported once by the forkserver so that each rank starts warm (see the module docstring).
# A module missing here is imported by the rank itself, which is only slower.
_PRELOAD_MODULES = ["torch", "torch.distributed", "megatron.core"]
# How long the other ranks may still run after one rank failed.
_GRACE_S = 3.0


class DistributedError(RuntimeError):
    """One or more ranks failed; ``failures`` maps rank to its traceback or exit reason."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


class DistributedTimeoutError(DistributedError):
    """The ranks did not all finish within the timeout and were killed."""


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    # Only takes effect when the server starts, i.e. on the first call in this process.
    context.set_forkserver_preload(_PRELOAD_MODULES)
    return context


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    timeout: float,
    args: tuple[Any, ...],
    conn: multiprocessing.connection.Connection,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Code that reads the launcher's environment (DeepSpeed, megatron) sees what torchrun sets.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        payload = pickle.dumps(("ok", fn(rank, world_size, *args)))
    except BaseException:
        payload = pickle.dumps(("error", traceback.format_exc()))
    conn.send_bytes(payload)
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    tmp_path: Path,
    *args: Any,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    Raises :class:`DistributedError` with the failing rank's traceback if any rank raises or
    dies, and :class:`DistributedTimeoutError` if they have not all finished after
    ``timeout`` seconds. No process outlives the call.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    context = _context()
    init_file = str(Path(tmp_path) / f"dist_init_{uuid.uuid4().hex}")
    processes: dict[int, multiprocessing.process.BaseProcess] = {}
    connections: dict[int, multiprocessing.connection.Connection] = {}
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                args=(fn, rank, world_size, init_file, timeout, args, sender),
                name=f"rank{rank}",
                daemon=True,
            )
            process.start()
            sender.close()
            processes[rank], connections[rank] = process, receiver
        results = _collect(processes, connections, timeout)
    finally:
        for process in processes.values():
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
        for conn in connections.values():
            conn.close()
    return [results[rank] for rank in range(world_size)]


def _collect(
    processes: dict[int, multiprocessing.process.BaseProcess],
    connections: dict[int, multiprocessing.connection.Connection],
    timeout: float,
) -> dict[int, Any]:
    """Wait for every rank's message or death; raise on the first failure or the timeout."""
    world_size = len(processes)
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    first_failure: int | None = None
    deadline = time.monotonic() + timeout
    pending = set(processes)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        waitables = [connections[r] for r in pending] + [processes[r].sentinel for r in pending]
        ready = set(multiprocessing.connection.wait(waitables, timeout=remaining))
        for rank in sorted(pending):
            conn, process = connections[rank], processes[rank]
            if conn not in ready and process.sentinel not in ready:
                continue
            # A dead rank may still have its message in the pipe: read before judging.
            if conn.poll():
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    status, value = "error", None
            else:
                status, value = "error", None
            if status == "ok":
                results[rank] = value
            else:
                if value is None:
                    process.join(timeout=1)
                    value = f"process died without reporting (exit code {process.exitcode})"
                failures[rank] = value
                if first_failure is None:
                    first_failure = rank
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
            pending.discard(rank)

    if first_failure is not None:
        for rank in sorted(pending):
            failures[rank] = f"killed {_GRACE_S:.0f} s after rank {first_failure} failed"
        raise DistributedError(
            _describe(f"rank {first_failure} of {world_size} failed", failures, first_failure),
            failures,
        )
    if pending:
        for rank in sorted(pending):
            failures[rank] = f"still running after {timeout:g} s; killed"
        raise DistributedTimeoutError(
            _describe(
                f"ranks {sorted(pending)} of {world_size} timed out after {timeout:g} s",
                failures,
                min(pending),
            ),
            failures,
        )
    return results


def _describe(headline: str, failures: dict[int, str], first: int) -> str:
    order = [first] + sorted(rank for rank in failures if rank != first)
    sections = [f"--- rank {rank} ---\n{failures[rank].rstrip()}" for rank in order]
    return "\n".join([headline, *sections])
