"""Seed agreement (issue 16 item 7): ranks that compute different projection seeds stop.

Real 2-rank runs (gloo ranks forked by :func:`tests.helpers.distributed.run_distributed`, the launcher's
own ``main``, the ``compact`` model of ``tests/helpers/runs.py``, ``resample_every=2``) with
one rank's seed inputs changed: a wrong ``compression.seed`` in one layer from the start, and a
compression schedule that misses the optimizer step which resamples. References: the seeds
computed in the test with :func:`~actcomp_dist.seeds.projection_seed` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json

import pytest
import torch

from actcomp_dist.adapters import AdapterConfig, apply_adapters
from actcomp_dist.adapters.base import adapter_seed
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.seeds import (
    _digest,
    describe_seed_mismatch,
    projection_seed,
    projection_seed_table,
)
from actcomp_dist.training.cli import SEED_MISMATCH_EXIT_CODE
from tests.helpers.distributed import run_distributed
from tests.helpers.runs import tiny_config

WRONG_SEED = 99


def _wrong_base_seed(trainer, rank: int) -> None:
    """Rank 1's last compressed layer uses compression.seed 99 from the first step on."""
    if rank == 1:
        module = [m for _, m in trainer.model.named_modules() if hasattr(m, "layer_id")][-1]
        module.config = dataclasses.replace(module.config, seed=WRONG_SEED)


def _missed_resample(trainer, rank: int) -> None:
    """Rank 1's compression schedule does not advance in step 2 (the one that resamples)."""
    if rank == 1:
        schedule, advance = trainer.schedule, trainer.schedule.advance
        calls = {"n": 0}

        def skip_second(steps: int = 1) -> None:
            calls["n"] += 1
            if calls["n"] != 2:
                advance(steps)

        schedule.advance = skip_second


FAULTS = {"wrong_base_seed": _wrong_base_seed, "missed_resample": _missed_resample}


def _run_with_fault(config, fault: str, tables: list):
    from actcomp_dist.training.trainer import Trainer

    trainer = Trainer(config)
    try:
        rank = torch.distributed.get_rank()
        FAULTS[fault](trainer, rank)
        tables.append(projection_seed_table(trainer.model))
        return trainer.train()
    finally:
        trainer.close()


def _seed_rank(rank: int, world_size: int, config_files: dict[str, str]) -> dict:
    from actcomp_dist.training.cli import main

    results = {}
    for fault, config_file in config_files.items():
        tables: list = []
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            code = main(
                ["--config", config_file],
                run=functools.partial(_run_with_fault, fault=fault, tables=tables),
            )
        results[fault] = {"code": code, "stderr": stderr.getvalue(), "table": tables[0]}
    return results


@pytest.mark.distributed
def test_ranks_with_different_projection_seeds_stop_naming_layer_and_ranks(tmp_path, corpus):
    """Both faults stop both ranks with exit code 5 and one line naming the layer(s), the
    ranks and each side's seed, base seed and epoch: the wrong base seed before step 1 (the
    check at start-up), the missed advance before step 3 (the check after the resample); no
    checkpoint is written after the fault."""
    files = {}
    for fault in FAULTS:
        raw = tiny_config(
            tmp_path / fault, corpus, "train.eval_interval=0", "checkpoint.interval=1"
        )
        files[fault] = str(tmp_path / f"{fault}.json")
        (tmp_path / f"{fault}.json").write_text(json.dumps(raw))
    ranks = run_distributed(_seed_rank, 2, tmp_path, files, timeout=300)

    # The wrong base seed: rank 1's last compressed layer, at step 0 (epoch 0).
    name, layer_id, site, base, epoch, seed = ranks[0]["wrong_base_seed"]["table"][-1]
    assert ranks[1]["wrong_base_seed"]["table"][-1] == (
        name,
        layer_id,
        site,
        WRONG_SEED,
        0,
        projection_seed(WRONG_SEED, layer_id, site, 0, 0),
    )
    assert seed == projection_seed(base, layer_id, site, 0, 0) and epoch == 0
    expected = (
        f"step 0: ranks disagree on projection seeds they must share: {name} (layer "
        f"{layer_id}, site {site}): rank 0: seed {seed} (compression.seed {base}, epoch 0) vs "
        f"rank 1: seed {projection_seed(WRONG_SEED, layer_id, site, 0, 0)} (compression.seed "
        f"{WRONG_SEED}, epoch 0); every rank must run the same config and code"
    )
    layers = len(ranks[0]["missed_resample"]["table"])
    for rank in range(2):
        wrong = ranks[rank]["wrong_base_seed"]
        assert wrong["code"] == SEED_MISMATCH_EXIT_CODE, wrong["stderr"]
        assert f"stopped (rank {rank}/2): {expected}" in wrong["stderr"]
        missed = ranks[rank]["missed_resample"]
        assert missed["code"] == SEED_MISMATCH_EXIT_CODE, missed["stderr"]
        assert "step 2: ranks disagree on projection seeds" in missed["stderr"]
        assert f"and {layers - 3} more layers" in missed["stderr"]
        assert "Traceback" not in wrong["stderr"] + missed["stderr"]
    assert not (tmp_path / "wrong_base_seed" / "checkpoints").exists()
    saved = sorted(p.name for p in (tmp_path / "missed_resample" / "checkpoints").glob("step_*"))
    assert saved == ["step_0000001", "step_0000002"]


def test_describe_seed_mismatch_groups_ranks_and_names_missing_layers():
    """Four ranks: rank 2 has another epoch on layer 0; rank 3 lacks layer 1 entirely."""
    layer0 = [("l0", 0, "qkv", 5, 1, 11)]
    layer1 = [("l1", 1, "fc1", 5, 1, 22)]
    tables = [layer0 + layer1, layer0 + layer1, [("l0", 0, "qkv", 5, 0, 10)] + layer1, layer0]
    assert describe_seed_mismatch(tables, step=4) == (
        "step 4: ranks disagree on projection seeds they must share: l0 (layer 0, site qkv): "
        "ranks 0, 1, 3: seed 11 (compression.seed 5, epoch 1) vs rank 2: seed 10 "
        "(compression.seed 5, epoch 0); l1 (layer 1, site fc1): ranks 0, 1, 2: seed 22 "
        "(compression.seed 5, epoch 1) vs rank 3: no such layer; every rank must run the same "
        "config and code and resume from the same checkpoint"
    )


def test_adapter_seeds_are_in_the_agreement_table(single_rank):
    """Every LoRA/LoRI adapter's A seed (regenerated on each rank, never stored) is a row of
    the table the ranks compare, so a rank with another ``finetune.adapter.seed`` changes the
    digest and is named with that key; the reference is :func:`adapter_seed` itself."""
    config = get_model_config("tiny", seq_length=32, num_layers=2)
    tables = {}
    for seed in (1, 2):
        model = build_llama(config)
        apply_adapters(model, AdapterConfig(method="lori", rank=4, seed=seed, targets=("qkv",)))
        tables[seed] = projection_seed_table(model)
    rows = [row for row in tables[1] if row[2].startswith("adapter/")]
    assert rows == [
        (
            f"layers.{i}.attention.qkv.adapters.default",
            i,
            "adapter/qkv",
            1,
            0,
            adapter_seed(1, i, "qkv"),
        )
        for i in range(2)
    ]
    assert _digest(tables[1]) != _digest(tables[2])
    message = describe_seed_mismatch([tables[1], tables[2]], step=0)
    name = rows[0][0]
    assert (
        f"{name} (layer 0, site adapter/qkv): rank 0: seed {adapter_seed(1, 0, 'qkv')} "
        f"(finetune.adapter.seed 1, epoch 0) vs rank 1: seed {adapter_seed(2, 0, 'qkv')} "
        f"(finetune.adapter.seed 2, epoch 0)" in message
    )
