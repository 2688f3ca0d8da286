"""Start-up of the process group under every launcher we support.

- ``deepspeed`` and ``torchrun`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``.
- ``srun`` sets ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the sbatch script exports
  ``MASTER_ADDR``/``MASTER_PORT``; we translate.
- A plain ``python launch/pretrain.py`` is a world of one on 127.0.0.1.

The backend is NCCL when CUDA is available and gloo otherwise, so the same command runs on a
GPU node and on a laptop. On the CPU each rank uses one intra-op thread unless
``OMP_NUM_THREADS`` says otherwise (two threads per rank on two cores were 2.4x slower).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from actcomp_dist.training.watchdog import process_group_timeout


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int


def launch_info() -> LaunchInfo:
    """Rank, world size and local rank from the launcher's environment (no collective)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return LaunchInfo(0, 1, 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(info: LaunchInfo, collective_timeout_s: float | None = None) -> torch.device:
    """Initialise ``torch.distributed`` (through DeepSpeed) and return this rank's device.

    ``collective_timeout_s`` (``train.collective_timeout_s``) sets the process group's timeout
    to :func:`~actcomp_dist.training.watchdog.process_group_timeout` of it (``None``:
    DeepSpeed's default). A process group that already exists (a notebook, a test harness) is
    used as it is.
    """
    env = os.environ
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    if info.world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in env and not dist.is_initialized():
        raise RuntimeError(
            "MASTER_ADDR is not set: launch with deepspeed, torchrun, or the sbatch script in "
            "launch/slurm/ (which exports MASTER_ADDR/MASTER_PORT for srun)"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
        backend = "nccl"
    else:
        if "OMP_NUM_THREADS" not in env:
            torch.set_num_threads(1)
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        import deepspeed

        options = {}
        if collective_timeout_s is not None:
            options["timeout"] = process_group_timeout(collective_timeout_s)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **options)
        if backend == "gloo":
            _unlink_cpu_allreduce_buffer(info.rank)
    return device


CPU_ALLREDUCE_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def cpu_allreduce_buffer_path(rank: int) -> str:
    """The shared-memory file DeepSpeed's CPU backend creates for ``rank`` of this job.

    Its name is fixed by DeepSpeed's shm all-reduce op: prefix, uid, ``MASTER_ADDR``,
    ``MASTER_PORT``, rank, in ``/dev/shm``.
    """
    env = os.environ
    name = (
        f"{CPU_ALLREDUCE_BUFFER_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
        f"{env.get('MASTER_PORT', '')}_{rank}"
    )
    return os.path.join("/dev/shm", name)


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer once every rank mapped it.

    When all ranks of a job share one host (the ``deepspeed`` launcher sets ``LOCAL_SIZE``),
    DeepSpeed's CPU backend creates a 69 MB ``/dev/shm`` file per rank and never removes it:
    each run would leave that much RAM behind for good (a test suite of a hundred runs filled a
    24 GB machine). The peers open the file while the backend starts; after a barrier every
    rank has mapped every buffer, so the names can go. The memory stays valid for the
    processes that map it and returns to the system when the last of them exits, even if it is
    killed.
    """
    from deepspeed import comm as ds_comm

    backend = getattr(ds_comm.comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None:
        return
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return  # DeepSpeed maps no buffer unless every rank is on this host
    dist.barrier()
    try:
        os.unlink(cpu_allreduce_buffer_path(rank))
    except FileNotFoundError:
        pass
