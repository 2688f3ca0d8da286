"""Shared fixtures."""

import json
import os
from pathlib import Path

import pytest

from actcomp_dist.cli.single_process import one_rank_world
from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.training.distributed import CPU_ALLREDUCE_BUFFER_PREFIX
from tests.helpers.runs import VOCAB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """The embedded corpus, small (107 modules, 112 k tokens; a tokenizer of
    :data:`tests.helpers.runs.VOCAB` tokens): ``data.*`` overrides for it, built once per module."""
    built = ensure_embedded_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=VOCAB, max_bytes=200_000
    )
    return [
        f"data.paths={json.dumps([built.data_prefix])}",
        f"data.tokenizer={built.tokenizer_model}",
    ]


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """A one-rank gloo world with megatron-core's parallel state at TP=1 (in this process),
    each unless one exists already; torn down after the module if started here."""
    with one_rank_world(tmp_path_factory.mktemp("dist")):
        yield


def _deepspeed_cpu_buffers() -> set[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return set()
    return set(shm.glob(f"{CPU_ALLREDUCE_BUFFER_PREFIX}_{os.getuid()}_*"))


@pytest.fixture(scope="session")
def _deepspeed_cpu_buffers_before_suite() -> set[Path]:
    return _deepspeed_cpu_buffers()


def _mapped_paths() -> set[str]:
    """Files of /dev/shm some live process maps (another test session's run included)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(
            line.split(None, 5)[-1].removesuffix(" (deleted)")
            for line in text.splitlines()
            if CPU_ALLREDUCE_BUFFER_PREFIX in line
        )
    return mapped


@pytest.fixture(autouse=True)
def _release_deepspeed_cpu_buffers(_deepspeed_cpu_buffers_before_suite):
    """A rank killed before the launcher unlinks DeepSpeed's 69 MB /dev/shm all-reduce buffer
    leaves it behind; after each test remove those the suite created that no live process maps
    (a run still starting, of this session or another, is left alone), so a long suite does not
    fill RAM."""
    yield
    left = _deepspeed_cpu_buffers() - _deepspeed_cpu_buffers_before_suite
    if left:
        in_use = _mapped_paths()
        for path in left:
            if str(path) not in in_use:
                path.unlink(missing_ok=True)
