"""A run directory's files as the fault tests see them: a fingerprint of every file, and damage.

:func:`tree_hashes` maps each file under a directory to its SHA-256, so a test can assert that
a refused or failed run changed nothing (or that a checkpoint survived a crash byte for byte);
:func:`flip_a_byte` and :func:`truncate` damage one file the way a bad disk or an interrupted
copy would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hashes(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path) -> the SHA-256 of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def flip_a_byte(path: Path) -> None:
    """Invert every bit of the byte in the middle of ``path`` (its size unchanged)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Drop the last 100 bytes of ``path``."""
    path.write_bytes(path.read_bytes()[:-100])
