"""Checkpoints that resume exactly, and that are never half-written when used.

Layout of ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step_0000003/                 one checkpoint
        step_0000003/...          DeepSpeed's files (model, ZeRO optimizer, LR schedule)
        rank_00000.pt ...         per rank: RNG states, subspace fp32 masters
        trainer.json              step, data position, compression schedule, config
        COMPLETE                  written last, after every rank has finished writing
    latest                        DeepSpeed's pointer to the newest complete step's tag
                                  (``step_0000003/step_0000003``), rewritten after each marker

A checkpoint counts only with its ``COMPLETE`` marker, which rank 0 writes after a barrier
and which lists every file's size and SHA-256: a crash mid-save leaves the previous complete
checkpoint as ``latest``, and a damaged file is detected before any rank starts loading (so
no rank waits in a collective for a peer that failed). The marker also holds the compression
config: resuming with a different one is refused with both values listed, because the saved
optimizer moments and sub-token vectors only mean something for the config that made them.

**A failed write** (a full disk mid-save, a quota, an I/O error) is recorded on the rank that
hit it, which still goes through the save's collectives (DeepSpeed's writes included), so no
rank waits for another; the ranks exchange their outcomes before the marker, and every rank
raises :class:`CheckpointError` naming the failing ranks, the error and the free bytes, after
rank 0 removed the incomplete directory (the space check before a save,
:func:`check_disk_space`, catches most full disks before anything is written).

**Format version.** The marker records :data:`FORMAT_VERSION`, the version of this layout (the
files above, the marker's and ``trainer.json``'s keys). A reader that finds another version
refuses the checkpoint before anything is loaded, saying which version it holds and what to do
(a newer one: resume with the actcomp_dist that wrote it); there is no migration, since version
1 is the only one so far. Checkpoints written before the marker carried a version have exactly
the version-1 layout and are read as version 1.

**Rotation** (``checkpoint.keep = N``) runs only once the new checkpoint's marker exists, and
deletes complete checkpoints beyond the newest N except the newest *healthy* one: the marker
records whether the trainer verified the state it saved (every parameter finite on every
rank, the last step's loss and gradient norm finite or the step skipped). The trainer never
writes an unhealthy checkpoint; checkpoints without the record (older versions, other tools)
count as unverified, so a run of them never pushes out the last verified one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"
TRAINER_STATE = "trainer.json"
# The checkpoint layout this code writes and reads; markers without one are version 1.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, damaged, or from another config)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(directory: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``None``, ``latest`` (``None`` if there is none yet) or a
    path, which must be a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint (no {MARKER} marker: "
            f"the save was interrupted or this is not a checkpoint directory)"
        )
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_bytes(path: Path) -> int | None:
    """The bytes of complete checkpoint ``path`` (its marker's file list), ``None`` if
    unreadable."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        return sum(int(f["bytes"]) for f in files.values())
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def free_bytes(directory: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem ``directory`` is (or will be)
    on: its nearest existing ancestor's."""
    directory = Path(directory).absolute()
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def check_disk_space(directory: Path, step: int, first_estimate: int) -> None:
    """Rank 0's verdict, broadcast (collective, call on every rank, before any rank writes):
    raises :class:`CheckpointError` on every rank with the free and needed bytes when the
    filesystem of ``directory`` cannot hold the next checkpoint. The need is the newest complete
    checkpoint's size (the previous save of this run, or the one resumed from), else
    ``first_estimate``."""
    verdict = [None]
    if dist.get_rank() == 0:
        found = complete_checkpoints(directory)
        needed = checkpoint_bytes(found[-1]) if found else None
        source = f"the size of {found[-1].name}" if needed is not None else "estimated"
        needed = needed if needed is not None else first_estimate
        free = free_bytes(directory)
        if free < needed:
            verdict = [
                f"step {step}: not enough disk space to save a checkpoint in {directory}: "
                f"{free:,} bytes free, {needed:,} needed ({source}); nothing written (the last "
                f"checkpoint is intact); free space or set checkpoint.dir elsewhere, then resume "
                f"with checkpoint.resume=latest"
            ]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def save_checkpoint(
    directory: Path,
    step: int,
    engine,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Collective: every rank writes its part; rank 0 writes the marker last. The caller checks
    the disk space first (:func:`check_disk_space`)."""
    path = directory / checkpoint_name(step)
    rank = dist.get_rank()
    if rank == 0:
        if path.exists():  # an interrupted earlier save of the same step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    errors: list[str] = []
    with _write_errors_recorded(engine, errors):
        engine.save_checkpoint(str(path), tag=checkpoint_name(step), save_latest=False)
    _recorded(errors, torch.save, rank_state, path / f"rank_{rank:05d}.pt")
    if rank == 0:
        state_text = json.dumps(trainer_state, indent=2, sort_keys=True)
        _recorded(errors, (path / TRAINER_STATE).write_text, state_text)
    # Every rank's outcome, and the barrier before the marker.
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, errors[0] if errors else None)
    if any(failures):
        failed = [r for r, f in enumerate(failures) if f]
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # frees what the failed save took
        raise CheckpointError(
            f"step {step}: writing checkpoint {path} failed on rank "
            f"{', '.join(map(str, failed))}: {failures[failed[0]]} ({free_bytes(directory):,} "
            f"bytes free on the file system of {directory} now); the incomplete checkpoint was "
            f"removed and the last complete one is intact; free space or set checkpoint.dir "
            f"elsewhere, then resume with checkpoint.resume=latest"
        )
    if rank == 0:
        marker = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": _file_manifest(path),
            **_marker_summary(trainer_state),
        }
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2, sort_keys=True))
        tmp.rename(path / MARKER)
        if keep > 0:
            rotate_checkpoints(directory, keep)
        write_latest(directory, path)
    dist.barrier()
    return path


def _recorded(errors: list[str], write, *args, **kwargs) -> None:
    """``write(*args, **kwargs)``; a failure (a full disk: ``OSError``, or torch's
    ``RuntimeError`` from its stream writer, e.g. "basic_ios::clear: iostream error") is
    appended to ``errors`` instead of raised, so that this rank still reaches the save's
    collectives and every rank learns of it there."""
    try:
        write(*args, **kwargs)
    except (OSError, RuntimeError) as err:
        errors.append(f"{type(err).__name__}: {err}".strip())


@contextlib.contextmanager
def _write_errors_recorded(engine, errors: list[str]):
    """DeepSpeed's file writes (its checkpoint engine's ``save``) with failures recorded in
    ``errors``: ``engine.save_checkpoint`` then runs to its end on every rank, so its own
    barriers line up whatever rank failed to write."""
    checkpoint_engine = engine.checkpoint_engine
    save = checkpoint_engine.save
    checkpoint_engine.save = lambda *args, **kwargs: _recorded(errors, save, *args, **kwargs)
    try:
        yield
    finally:
        checkpoint_engine.save = save


LATEST = "latest"


def write_latest(directory: Path, path: Path) -> None:
    """DeepSpeed's ``latest`` file in ``directory``, naming checkpoint ``path``'s DeepSpeed tag
    as a path relative to ``directory`` (``step_N/step_N``), so DeepSpeed's own tools
    (``zero_to_fp32.py``, ``engine.load_checkpoint``) pointed at the checkpoint directory find
    the newest complete step without ``--tag``. Written after the marker (and after rotation,
    which never deletes the newest checkpoint), atomically."""
    tmp = directory / (LATEST + ".tmp")
    tmp.write_text(f"{path.name}/{path.name}")
    tmp.rename(directory / LATEST)


def is_healthy(path: Path) -> bool:
    """Whether the marker of checkpoint ``path`` records a verified (finite) state."""
    try:
        return json.loads((path / MARKER).read_text()).get("healthy") is True
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def rotate_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep``, never the newest healthy
    one; returns the deleted paths. Incomplete directories are left alone (a save of another
    step may be under way)."""
    found = complete_checkpoints(directory)
    healthy = [p for p in found if is_healthy(p)]
    protected = set(found[-keep:]) | set(healthy[-1:])
    deleted = [p for p in found if p not in protected]
    for old in deleted:
        shutil.rmtree(old, ignore_errors=True)
    return deleted


def _marker_summary(trainer_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "healthy": trainer_state.get("healthy") is True,
        "compression": trainer_state["config"]["compression"],
        "world_size": trainer_state["world_size"],
        "tensor_parallel": trainer_state["config"]["parallel"]["tensor_parallel"],
    }


def verify_checkpoint(path: Path, compression: dict[str, Any]) -> dict[str, Any]:
    """Check the marker's file list and the compression config; returns the trainer state.

    Raises :class:`CheckpointError` naming what is wrong.
    """
    try:
        marker = json.loads((path / MARKER).read_text())
        files, saved_compression = marker["files"], marker["compression"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {path}: unreadable {MARKER} marker ({type(err).__name__}: {err})"
        ) from None
    check_format_version(path, marker)
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if file.stat().st_size != expected["bytes"] or file_sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name} differs from what was saved "
                f"(size or SHA-256 mismatch)"
            )
    if saved_compression != compression:
        changed = {
            key: (saved_compression.get(key), compression.get(key))
            for key in sorted(set(saved_compression) | set(compression))
            if saved_compression.get(key) != compression.get(key)
        }
        lines = "; ".join(
            f"{k}: checkpoint {old!r} -> config {new!r}" for k, (old, new) in changed.items()
        )
        raise CheckpointError(
            f"checkpoint {path} was written with a different compression config ({lines}); "
            f"resume with the original compression settings or start a new run_dir"
        )
    return json.loads((path / TRAINER_STATE).read_text())


def check_format_version(path: Path, marker: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless ``marker`` (of checkpoint ``path``) has this code's
    :data:`FORMAT_VERSION` (no ``format_version``: version 1, the layout before it was
    recorded)."""
    version = marker.get("format_version", 1)
    if version == FORMAT_VERSION and not isinstance(version, bool):
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        advice = (
            "it was written by a newer actcomp_dist: resume with that version, or start a new "
            "run_dir"
        )
    else:
        advice = (
            "not a version any actcomp_dist writes: the marker is damaged or from another tool; "
            "resume from another checkpoint (checkpoint.resume=PATH) or start a new run_dir"
        )
    raise CheckpointError(
        f"checkpoint {path} has format version {version!r}; this actcomp_dist reads version "
        f"{FORMAT_VERSION} only ({advice})"
    )


def load_checkpoint(path: Path, engine) -> dict[str, Any]:
    """Collective: load DeepSpeed's state; returns this rank's own saved state."""
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=path.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {path}")
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no state for rank {dist.get_rank()}: it was written by "
            f"a run with a different world size"
        )
    return torch.load(rank_file, weights_only=False)
