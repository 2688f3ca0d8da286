"""What the one-process measurement tools share (``tools/storage_cost.py``,
``tools/projection_cache_cost.py``): the model-shape arguments, the model config they name, and
a gloo world of one rank with tensor-parallel state at TP 1.

The package imports that pull in megatron-core happen when a config is built or the world is
started, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


def add_model_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model NAME`` (a named config), ``--layers N``, ``--micro-batch B``, ``--seq-length S``."""
    parser.add_argument("--model", default="tiny", help="a named model config (e.g. tiny, 60m)")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)


def model_config_from_args(args: argparse.Namespace):
    """The :class:`~actcomp_dist.models.LlamaConfig` named by ``--model``, with the sequence
    length of ``--seq-length`` and, when given, ``--layers`` blocks."""
    from actcomp_dist.models import get_model_config

    overrides = {"seq_length": args.seq_length}
    if args.layers:
        overrides["num_layers"] = args.layers
    return get_model_config(args.model, **overrides)


@contextlib.contextmanager
def one_rank_world(store_dir: str | Path | None = None) -> Iterator[None]:
    """``torch.distributed`` (gloo, a file store in ``store_dir``, default a new temporary
    directory, removed on exit: no port to collide with) and model-parallel state at TP 1,
    each only if this process has none yet (a test may call a tool's ``main`` inside its own
    world); what is started here is torn down on exit. The tests' ``single_rank`` fixture is
    this."""
    import torch.distributed as dist

    from actcomp_dist.parallel import state

    with contextlib.ExitStack() as cleanup:
        if not dist.is_initialized():
            if store_dir is None:
                store_dir = cleanup.enter_context(tempfile.TemporaryDirectory())
            store = Path(store_dir) / "store"
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
            cleanup.callback(dist.destroy_process_group)  # before the directory goes
        if not state.is_initialized():
            state.initialize_model_parallel(1)
            cleanup.callback(state.destroy)
        yield
