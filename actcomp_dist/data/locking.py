"""Building a cached artefact once when many processes ask for it at the same time.

Every rank of a run (and every concurrent run sharing a cache directory) may ask for the same
tokenizer, dataset or index cache. Two mechanisms make that safe, with or without
``torch.distributed``:

- an exclusive ``flock`` on a lock file next to the artefact: the first process builds, the
  others block until it is done and then find the result. The kernel drops the lock when its
  holder dies, so a crashed builder never blocks the next one. ``flock`` excludes other open
  files, so it also serialises threads of one process.
- the artefact is built in a private temporary directory and published with one ``rename``: a
  reader sees either nothing or the complete directory, never a half-written one, even on a
  file system that does not honour the lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_directory_once(target: str | Path, build: Callable[[Path], None]) -> bool:
    """Make sure the directory ``target`` exists, calling ``build(tmp_dir)`` only if it does not.

    ``build`` fills an empty temporary directory beside ``target``, which is then renamed to
    ``target``. Concurrent callers wait on ``target``'s lock file; only the first one builds.

    Returns:
        True if this call built the directory, False if it already existed.
    """
    target = Path(target)
    with file_lock(target.with_name(f".{target.name}.lock")):
        if target.is_dir():
            return False
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            build(staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared
            try:
                os.rename(staging, target)
            except OSError:
                # Only without working locks: another process published first. Its result is
                # identical (builds are deterministic), so keep it.
                if not target.is_dir():
                    raise
                return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True
