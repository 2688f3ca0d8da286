"""Reading training text: how input files become documents.

A *document* is the unit the indexed dataset stores (one end-of-document token after each) and
the unit megatron-core splits into train/validation (contiguous document ranges), so the choice
matters for both.

- JSONL (``.jsonl`` or ``.json``, Megatron's "loose JSON"): one document per line, the string
  under ``json_key`` (default ``text``). Blank lines are skipped; a line that is not a JSON object
  with a string under that key raises ``ValueError`` naming the file and line.
- Any other file is UTF-8 text whose documents are blocks separated by one or more blank lines
  (lines holding only whitespace). Paragraph-sized documents keep even a single large text file
  splittable into train and validation, which a whole-file document would not be. Lines inside
  a block keep their indentation; line endings are read as ``\n`` (``\r\n`` files included).

Documents that are empty or only whitespace are skipped in both formats: they would add an
end-of-document token and nothing else. Files are read as streams, never whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json")


def _check_input_files(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """Return ``paths`` as ``Path`` objects; raise if there are none or one is not a file."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("no input files given")
    files = [Path(path) for path in paths]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    return files


def iter_documents(
    paths: Sequence[str | Path] | str | Path, json_key: str = "text"
) -> Iterator[str]:
    """The documents of every file in ``paths``, in order (format by file suffix).

    The files are checked now, so a missing one raises before any is read.
    """
    return _generate_documents(_check_input_files(paths), json_key)


def _generate_documents(files: list[Path], json_key: str) -> Iterator[str]:
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl_documents(path, json_key)
        else:
            yield from _iter_text_documents(path)


def _iter_jsonl_documents(path: Path, json_key: str) -> Iterator[str]:
    for line_number, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number}: not a JSON object ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            raise ValueError(
                f"{path}:{line_number}: expected a JSON object with a string field "
                f"{json_key!r}, got {line.strip()[:80]!r}"
            )
        if record[json_key].strip():
            yield record[json_key]


def _iter_text_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    for _, line in _numbered_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield _join_block(block)
            block = []
    if block:
        yield _join_block(block)


def _join_block(lines: Iterable[str]) -> str:
    return "".join(lines).rstrip("\n")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines of a UTF-8 file, numbered from 1; a decoding error names the file and line."""
    with open(path, encoding="utf-8") as stream:
        line_number = 0
        try:
            for line_number, line in enumerate(stream, start=1):
                yield line_number, line
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}: not UTF-8 text after line {line_number} ({error.reason})"
            ) from None
