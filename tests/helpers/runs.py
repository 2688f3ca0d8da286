"""Short pretraining runs of the tiny LLaMA: their config, the records they log, one rank's runs.

The pretraining, fault and progress tests all train ``configs/tiny_compact.json`` for a few
steps on the small embedded corpus (the ``corpus`` fixture of ``tests/conftest.py``: ``data.*``
overrides for a tokenizer of :data:`VOCAB` tokens). :func:`tiny_config` is that config as a dict
(``run_config_from_dict`` / ``--config`` input), :func:`read_metrics` the ``metrics.jsonl`` a run
writes, :func:`compared_fields` the fields two runs that must agree bit for bit are compared on,
and :func:`train_rank` the rank function for :func:`tests.helpers.distributed.run_distributed`
that trains configs one after the other in forked gloo ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

from actcomp_dist.training.config import apply_overrides

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_compact.json"
VOCAB = 512  # the test corpus's tokenizer; the tiny model pads it to 512 (a multiple of 128)
# What a resumed or preempted run must reproduce of the uninterrupted run, step by step.
COMPARED = ("loss", "lr", "grad_norm", "val_loss", "saved_activation_bytes")


def tiny_config(run_dir: Path, corpus: list[str], *overrides: str) -> dict:
    """tiny_compact.json for a short test run in ``run_dir`` (6 steps, validation every 3, a
    record per step, a new projection every 2 steps) on ``corpus``, plus ``overrides``."""
    raw = json.loads(TINY.read_text())
    base = [
        f"run_dir={run_dir}",
        *corpus,
        "train.steps=6",
        "train.eval_interval=3",
        "logging.interval=1",
        "compression.resample_every=2",
    ]
    return apply_overrides(raw, base + list(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, in the order written."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def compared_fields(records: list[dict]) -> list[dict]:
    """Each record's step and :data:`COMPARED` fields (``None`` where a record has none)."""
    return [{k: r.get(k) for k in ("step", *COMPARED)} for r in records]


def train_rank(rank: int, world_size: int, raws: list[dict]) -> list[list[dict]]:
    """Run ``run_pretraining`` once per config, one after the other; the per-step records."""
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import run_pretraining

    return [run_pretraining(run_config_from_dict(raw)).history for raw in raws]
