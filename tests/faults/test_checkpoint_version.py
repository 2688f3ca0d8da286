"""Checkpoint format versions (issue 16 item 7): what a reader accepts and what it refuses.

The markers are written here by hand (one file, ``trainer.json``, listed with its size and
SHA-256 as :func:`~actcomp_dist.training.checkpoint.save_checkpoint` lists every file); the
real runs of ``tests/faults/test_kill.py`` check that a save records the version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actcomp_dist.training import checkpoint as ckpt

COMPRESSION = {"method": "compact", "rank": 0.25}


def _checkpoint(directory: Path, **marker_fields) -> Path:
    path = directory / ckpt.checkpoint_name(3)
    path.mkdir(parents=True)
    state = path / ckpt.TRAINER_STATE
    state.write_text(json.dumps({"step": 3}))
    files = {ckpt.TRAINER_STATE: {"bytes": state.stat().st_size, "sha256": ckpt.file_sha256(state)}}
    marker = {"step": 3, "files": files, "compression": COMPRESSION, **marker_fields}
    (path / ckpt.MARKER).write_text(json.dumps(marker))
    return path


def test_current_and_unversioned_checkpoints_are_read(tmp_path):
    """A marker with this code's version, and one from before versions were recorded (read as
    version 1, the same layout), both verify and return the trainer state."""
    assert ckpt.FORMAT_VERSION == 1
    current = _checkpoint(tmp_path / "current", format_version=ckpt.FORMAT_VERSION)
    unversioned = _checkpoint(tmp_path / "unversioned")
    assert ckpt.verify_checkpoint(current, COMPRESSION) == {"step": 3}
    assert ckpt.verify_checkpoint(unversioned, COMPRESSION) == {"step": 3}


@pytest.mark.parametrize(
    "version, advice",
    [
        (2, "it was written by a newer actcomp_dist: resume with that version"),
        (0, "not a version any actcomp_dist writes"),
        ("1", "not a version any actcomp_dist writes"),
        (True, "not a version any actcomp_dist writes"),
    ],
)
def test_other_versions_are_refused_with_what_to_do(tmp_path, version, advice):
    """Newer, older (0: never written), and malformed versions: one message naming the
    checkpoint, its version, the version this code reads, and what to do."""
    path = _checkpoint(tmp_path, format_version=version)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.verify_checkpoint(path, COMPRESSION)
    message = str(error.value)
    assert message.startswith(
        f"checkpoint {path} has format version {version!r}; this actcomp_dist reads version 1 "
        f"only ("
    )
    assert advice in message
