"""The embedded default corpus: the docstrings of the installed Python standard library.

A run with no data configured still trains on real English text, with nothing downloaded: the
docstrings of the standard library are on every machine that runs Python.

What is collected. Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except test
suites and installed packages is parsed with ``ast`` (never imported); the docstrings of the
module, its classes and its functions, cleaned of indentation (``ast.get_docstring``), in
source order and joined by blank lines, make one document per module. A docstring already
collected from another place (many methods share "Return self.") is kept once.

Order and size. Modules are taken in the order of the SHA-256 of their relative path, a fixed
pseudo-random order, so megatron-core's contiguous validation split is a random sample of
modules rather than the alphabetical tail (``xml``, ``zipfile``, ...), until ``max_bytes`` of
text is collected (the module that crosses the cap is kept whole). CPython 3.11 holds about
1.8 MB of docstrings, about 0.5 M tokens with a 4096-piece tokenizer: some 4000 sequences of
128 tokens. The default cap only matters for a larger standard library.

Cache. Everything lands in one directory under ``cache_dir`` whose name holds every input
(Python version, vocabulary size, cap), so changing one builds a new directory instead of
reusing a stale one::

    stdlib-docstrings-py3.11-vocab4096-max3000000/
        corpus.jsonl              {"module": ..., "text": ...} per document
        tokenizer.model/.vocab    SentencePiece (see tokenizer.py)
        corpus.bin/.idx           megatron-core indexed dataset, eod after each document
        manifest.json             parameters and counts

It is built once, by whichever process takes the lock first, in a temporary directory renamed
into place (``locking.build_directory_once``): safe for many ranks, with or without
``torch.distributed``. Building takes a few seconds (parsing dominates) and is deterministic:
the same Python installation gives byte-identical files.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from actcomp_dist.data.indexed import write_indexed_dataset
from actcomp_dist.data.locking import build_directory_once
from actcomp_dist.data.tokenizer import SentencePieceTokenizer, train_tokenizer

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_BYTES = 3_000_000
EXCLUDED_DIRECTORIES = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Definitions live only in statements (and the handlers/cases holding statements); skipping
# expressions makes the walk several times faster.
_STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


@dataclass(frozen=True)
class EmbeddedCorpus:
    """A built embedded corpus: where its tokenizer and indexed dataset are, and their size."""

    directory: Path
    tokenizer_model: Path
    data_prefix: str
    num_documents: int
    num_tokens: int


def stdlib_docstring_documents(
    max_bytes: int = DEFAULT_MAX_BYTES, stdlib_dir: str | Path | None = None
) -> list[tuple[str, str]]:
    """``(module name, text)`` per module, in the corpus order, about ``max_bytes`` of text."""
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    documents = []
    total_bytes = 0
    for path in _stdlib_files(root):
        try:
            with _cyclic_gc_paused():
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # e.g. lib2to3 grammar samples, odd encodings
            continue
        docstrings = []
        for docstring in _docstrings(tree):
            if docstring not in seen:
                seen.add(docstring)
                docstrings.append(docstring)
        if not docstrings:
            continue
        text = "\n\n".join(docstrings)
        documents.append((_module_name(path.relative_to(root)), text))
        total_bytes += len(text.encode("utf-8"))
        if total_bytes >= max_bytes:
            break
    if not documents:
        raise ValueError(f"no docstrings found in Python files under {root}")
    return documents


def embedded_corpus_directory(
    cache_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Where :func:`ensure_embedded_corpus` keeps this corpus under ``cache_dir`` (nothing is
    built: export tools find a finished run's tokenizer here)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Path(cache_dir) / f"stdlib-docstrings-py{python}-vocab{vocab_size}-max{max_bytes}"


def ensure_embedded_corpus(
    cache_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> EmbeddedCorpus:
    """Build the embedded corpus under ``cache_dir`` unless it is there; return where it is.

    Call it on every rank: one process builds, the others wait for it and reuse the result.
    """
    directory = embedded_corpus_directory(cache_dir, vocab_size=vocab_size, max_bytes=max_bytes)

    def build(staging: Path) -> None:
        _build_corpus_directory(staging, vocab_size=vocab_size, max_bytes=max_bytes)

    build_directory_once(directory, build)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    return EmbeddedCorpus(
        directory=directory,
        tokenizer_model=directory / "tokenizer.model",
        data_prefix=str(directory / "corpus"),
        num_documents=manifest["num_documents"],
        num_tokens=manifest["num_tokens"],
    )


def _build_corpus_directory(directory: Path, *, vocab_size: int, max_bytes: int) -> None:
    documents = stdlib_docstring_documents(max_bytes)
    with open(directory / "corpus.jsonl", "w", encoding="utf-8", newline="\n") as stream:
        for module, text in documents:
            record = {"module": module, "text": text}
            stream.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    texts = [text for _, text in documents]
    model_path = train_tokenizer(texts, directory / "tokenizer", vocab_size)
    stats = write_indexed_dataset(texts, SentencePieceTokenizer(model_path), directory / "corpus")
    manifest = {
        "source": "docstrings of the Python standard library",
        "python_version": sys.version.split()[0],
        "vocab_size": vocab_size,
        "max_bytes": max_bytes,
        "num_documents": stats.num_documents,
        "num_tokens": stats.num_tokens,
        "text_bytes": sum(len(text.encode("utf-8")) for text in texts),
    }
    (directory / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while parsing.

    ``ast.parse`` allocates millions of nodes, which trigger collections that scan them all
    again; parsing runs about twice as fast without. Syntax trees hold no reference cycles, so
    reference counting alone frees them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Pruned in place so os.walk never descends into (possibly huge) site-packages.
        subdirectories[:] = [name for name in subdirectories if name not in EXCLUDED_DIRECTORIES]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: _path_key(path.relative_to(root)))


def _path_key(relative_path: Path) -> str:
    return hashlib.sha256(relative_path.as_posix().encode("utf-8")).hexdigest()


def _module_name(relative_path: Path) -> str:
    parts = list(relative_path.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module, classes and functions in ``tree``, in source order."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED_NODES):
            docstring = ast.get_docstring(node)
            if docstring and docstring.strip():
                yield docstring
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, _STATEMENT_NODES)]
        stack.extend(reversed(children))
