"""Shared fixtures."""

import pytest
import torch.distributed as dist

from actcomp_dist.parallel import state


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
