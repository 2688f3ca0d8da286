"""``actcomp_dist.cli.single_process.one_rank_world``: the one-rank world of the measurement
tools, torn down with everything it made."""

from __future__ import annotations

import tempfile

import torch.distributed as dist

from actcomp_dist.cli.single_process import one_rank_world
from actcomp_dist.parallel import state


def test_one_rank_world_tears_down_what_it_started(tmp_path, monkeypatch):
    """Without ``store_dir`` the file store lives in a new temporary directory, removed on exit
    with the process group and the parallel state (each tool run used to leave one behind)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert not dist.is_initialized() and not state.is_initialized()
    with one_rank_world():
        assert dist.get_world_size() == 1 and state.is_initialized()
        assert len(list(tmp_path.iterdir())) == 1  # the store's directory
    assert not dist.is_initialized() and not state.is_initialized()
    assert list(tmp_path.iterdir()) == []
