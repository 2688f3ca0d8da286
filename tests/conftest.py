"""Shared fixtures."""

import os
from pathlib import Path

import pytest
import torch.distributed as dist

from actcomp_dist.parallel import state
from actcomp_dist.training.distributed import CPU_ALLREDUCE_BUFFER_PREFIX


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """A one-rank gloo world with megatron-core's parallel state at TP=1 (in this process)."""
    created_world = not dist.is_initialized()
    if created_world:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    created_state = not state.is_initialized()
    if created_state:
        state.initialize_model_parallel(1)
    yield
    if created_state:
        state.destroy()
    if created_world:
        dist.destroy_process_group()


def _deepspeed_cpu_buffers() -> set[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return set()
    return set(shm.glob(f"{CPU_ALLREDUCE_BUFFER_PREFIX}_{os.getuid()}_*"))


@pytest.fixture(scope="session")
def _deepspeed_cpu_buffers_before_suite() -> set[Path]:
    return _deepspeed_cpu_buffers()


@pytest.fixture(autouse=True)
def _release_deepspeed_cpu_buffers(_deepspeed_cpu_buffers_before_suite):
    """A rank killed before the launcher unlinks DeepSpeed's 69 MB /dev/shm all-reduce buffer
    leaves it behind; after each test remove those the suite created (the processes of a test
    and of its module fixtures have ended by then), so a long suite does not fill RAM."""
    yield
    for path in _deepspeed_cpu_buffers() - _deepspeed_cpu_buffers_before_suite:
        path.unlink(missing_ok=True)
