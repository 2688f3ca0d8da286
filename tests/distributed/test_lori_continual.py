"""LoRI as published (issue 13): continual learning through the fine-tuning command, the
paper's mask rule (a calibration adapter trained on the new task), one A seed per task, the
refusals of a task list that does not match the saved adapters, and per-parameter clipping.

The two-task run: task 0 (``reverse_words``) trains a dense LoRI adapter; task 1
(``sort_words``) names it in ``finetune.previous`` and trains LoRI-S with
``finetune.mask.calibration_steps``: a dense calibration adapter on task 1 first (task 0
frozen in the forward), then the masked adapter from B = 0. Checked against references: task 0's
adapter bit for bit, task 1's mask against the global threshold computed in float64 from the
calibration adapter's file, each task's A against the generator at its derived seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from actcomp_dist.adapters import (
    AdapterConfig,
    adapter_seed,
    apply_adapters,
    generate_A,
    save_adapter,
)
from actcomp_dist.adapters.io import unpack_bits
from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.optim.clip import clip_grad_norm_per_parameter_
from actcomp_dist.training.config import ConfigError, apply_overrides, validate_run
from actcomp_dist.training.finetune_config import finetune_config_from_dict, validate_finetune
from tests.helpers.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
LORI = ROOT / "configs" / "finetune_tiny_lori.json"
SITES = ("qkv", "proj", "fc1", "fc2")


def _raw(run_dir: Path, *overrides: str) -> dict:
    return apply_overrides(json.loads(LORI.read_text()), [f"run_dir={run_dir}", *overrides])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['finetune.mask={"sparsity": 0.9}'], "exactly one of calibration_adapter"),
        (
            ['finetune.mask={"calibration_adapter": "x", "calibration_steps": 3}'],
            "exactly one of calibration_adapter",
        ),
        (['finetune.mask={"calibration_steps": 0}'], "finetune.mask.calibration_steps"),
        (['finetune.previous="x"'], "finetune.previous"),
        (["finetune.mode=lora", 'finetune.previous=["x"]'], "finetune.previous"),
        (["train.clip_grad_scope=tensor"], "train.clip_grad_scope"),
    ],
)
def test_bad_continual_config_names_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        finetune_config_from_dict(_raw(tmp_path, *overrides))
    assert message in str(err.value), str(err.value)


def test_per_parameter_clipping_needs_zero0_fp32(tmp_path):
    config = finetune_config_from_dict(_raw(tmp_path, "train.clip_grad_scope=parameter"))
    with pytest.raises(ConfigError) as err:
        validate_run(config, world_size=1)  # the tiny config runs ZeRO 1
    assert "train.clip_grad_scope='parameter' needs deepspeed.zero_optimization.stage=0" in str(
        err.value
    )
    ok = _raw(tmp_path, "train.clip_grad_scope=parameter", "deepspeed.zero_optimization.stage=0")
    validate_run(finetune_config_from_dict(ok), world_size=1)


class _Block(nn.Module):
    """Linears named like the tiny LLaMA's sites (what the saved adapter config records)."""

    def __init__(self) -> None:
        super().__init__()
        for site in SITES:
            setattr(self, site, nn.Linear(8, 8, bias=False))


def _saved(directory: Path, **fields) -> str:
    values = {"method": "lori", "rank": 8, "alpha": 16.0, "targets": SITES, "seed": 1}
    model = _Block()
    apply_adapters(model, AdapterConfig(**{**values, **fields}))
    save_adapter(model, directory)
    return str(directory)


def test_a_task_list_that_does_not_match_the_saved_adapters_is_refused(tmp_path):
    task0 = _saved(tmp_path / "task0")
    task1 = _saved(tmp_path / "task1", task=1)
    cases = [
        ([task1], "is the adapter of task 1, not task 0"),  # count: task 0 left out
        ([task0, task0], "finetune.previous[1]"),  # the same task twice
        ([_saved(tmp_path / "rank4", rank=4)], "rank=4"),
        ([_saved(tmp_path / "fc", targets=("fc1", "fc2"))], "targets="),
        ([_saved(tmp_path / "seed", seed=2)], "seed=2"),
        ([_saved(tmp_path / "lora", method="lora")], "'lora' adapter"),
        ([str(tmp_path / "missing")], "finetune.previous[0]"),
    ]
    for previous, message in cases:
        config = finetune_config_from_dict(
            _raw(tmp_path / "run", f"finetune.previous={json.dumps(previous)}")
        )
        assert config.finetune.adapter_config().task == len(previous)
        with pytest.raises(ConfigError) as err:
            validate_finetune(config, world_size=2)
        assert message in str(err.value), (previous, str(err.value))
        assert "\n" not in str(err.value)
    # A calibration adapter of another task: its A is not this task's.
    mask = json.dumps({"sparsity": 0.9, "calibration_adapter": task0})
    config = finetune_config_from_dict(
        _raw(tmp_path / "run", f"finetune.previous={json.dumps([task0])}", f"finetune.mask={mask}")
    )
    with pytest.raises(ConfigError, match="task=0"):
        validate_finetune(config, world_size=2)
    # The matching list passes.
    config = finetune_config_from_dict(_raw(tmp_path / "run", f'finetune.previous=["{task0}"]'))
    validate_finetune(config, world_size=2)


def _main_rank(rank: int, world_size: int, argv: list[str]) -> int:
    from actcomp_dist.cli.finetune import main

    return main(argv)


def test_the_command_refuses_a_mismatched_task_list_on_every_rank(tmp_path):
    task1 = _saved(tmp_path / "task1", task=1)
    run_dir = tmp_path / "run"
    argv = ["--config", str(LORI), "--set", f"run_dir={run_dir}"]
    argv += ["--set", f'finetune.previous=["{task1}"]']
    argv += ["--set", 'finetune.mask={"sparsity": 0.9, "calibration_steps": 2}']
    codes = run_distributed(_main_rank, 2, tmp_path, argv, timeout=120)
    assert codes == [2, 2]
    assert not run_dir.exists()  # neither the run nor its calibration wrote anything


def test_sort_words_rows_answer_their_prompt_sorted():
    from actcomp_dist.data.jsonl import synthetic_rows

    rows = synthetic_rows("sort_words", 50, seed=3)
    assert rows == synthetic_rows("sort_words", 50, seed=3)  # deterministic in the seed
    for row in rows:
        words = row["prompt"].removeprefix("sort: ").split()
        assert row["prompt"] == "sort: " + " ".join(words) + "\n"
        assert row["response"] == " ".join(sorted(words))
    assert any(r["response"] != r["prompt"][6:-1] for r in rows)  # not a copy task


# ----------------------------------------------------------------------------- clipping


def _clip_rank(rank: int, world_size: int, full: torch.Tensor, other: torch.Tensor):
    import torch.distributed as dist

    sharded = nn.Parameter(torch.zeros(full.shape[0] // world_size, full.shape[1]))
    sharded.tensor_model_parallel = True
    replicated = nn.Parameter(torch.zeros_like(other))
    sharded.grad = full.chunk(world_size)[rank].clone()
    replicated.grad = other.clone()
    norms = clip_grad_norm_per_parameter_([sharded, replicated], 1.0, dist.group.WORLD)
    return sharded.grad, replicated.grad, norms


def test_per_parameter_clipping_clips_each_logical_tensor_to_its_own_norm(tmp_path):
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(16, 8, generator=generator)  # norm ~11: clipped
    small = torch.randn(4, 4, generator=generator) * 0.01  # norm ~0.04: left alone
    results = run_distributed(_clip_rank, 2, tmp_path, full, small, timeout=120)
    gathered = torch.cat([r[0] for r in results])
    # float64 reference of torch's rule: g * min(1, 1 / (||g|| + 1e-6)) per tensor.
    f64 = full.double()
    reference = f64 * min(1.0, 1.0 / (float(f64.norm()) + 1e-6))
    # fp32 rounding: the norm is a sum of n = 128 squares (relative error <= n eps), then one
    # sqrt, one division and one product per entry.
    tolerance = (128 + 4) * torch.finfo(torch.float32).eps
    assert torch.allclose(gathered.double(), reference, rtol=tolerance, atol=0)
    assert abs(float(gathered.double().norm()) - 1.0) < tolerance
    for _, replicated, norms in results:
        assert torch.equal(replicated, small)  # under the limit: untouched
        assert abs(float(norms[0]) / float(f64.norm()) - 1) < tolerance


# ----------------------------------------------------------------------------- two tasks


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    built = ensure_embedded_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=512, max_bytes=200_000
    )
    return str(built.tokenizer_model)


def _two_task_rank(rank: int, world_size: int, raws: list[dict]) -> dict:
    from actcomp_dist.adapters import iter_adapters
    from actcomp_dist.training.finetune import FinetuneTrainer, calibrate, run_finetuning

    run_finetuning(finetune_config_from_dict(raws[0]))
    config = finetune_config_from_dict(raws[1])
    calibrate(config)
    trainer = FinetuneTrainer(config)
    try:
        trainer.train()
        out = {"task0_B": {}, "task0_trainable": [], "A": {}, "outside": 0.0}
        for path, name, adapter in iter_adapters(trainer.model):
            out["A"][(path, name)] = adapter.A.detach().clone()
            if name == "task0":
                out["task0_B"][path] = adapter.effective_B().detach().clone()
                out["task0_trainable"] += [p.requires_grad for p in adapter.parameters()]
            else:
                out["outside"] += float(adapter.B.detach()[~adapter.mask].abs().sum())
        return out
    finally:
        trainer.close()


def test_two_tasks_through_the_fine_tuning_command(tmp_path, tokenizer_model):
    common = [
        f"data.tokenizer={tokenizer_model}",
        "data.synthetic_rows=64",
        "data.seq_length=32",
        "train.steps=3",
        "train.warmup_steps=1",
        "train.eval_interval=0",
        "logging.interval=1",
    ]
    task0, task1 = tmp_path / "task0", tmp_path / "task1"
    raws = [
        _raw(task0, *common, "data.synthetic_task=reverse_words"),
        _raw(
            task1,
            *common,
            "data.synthetic_task=sort_words",
            f'finetune.previous=["{task0 / "adapter"}"]',
            'finetune.mask={"sparsity": 0.9, "calibration_steps": 2}',
            # LoRI's clipping: each adapter matrix on its own (ZeRO 0, fp32).
            "train.clip_grad_scope=parameter",
            "deepspeed.zero_optimization.stage=0",
        ),
    ]
    results = run_distributed(_two_task_rank, 2, tmp_path, raws, timeout=400)
    saved0 = load_file(str(task0 / "adapter" / "actcomp_adapter.safetensors"))
    for result in results:
        # Task 0's adapter: bit for bit what task 0 saved, frozen all through task 1.
        assert result["task0_B"].keys() == {k.removesuffix(".B") for k in saved0}
        for path, b in result["task0_B"].items():
            assert torch.equal(b, saved0[f"{path}.B"]), path
        assert result["task0_trainable"] and not any(result["task0_trainable"])
        assert result["outside"] == 0.0  # task 1 trains only inside its mask

    # Task 1's mask: the global magnitude threshold of the calibration adapter, in float64.
    calibration = task1 / "calibration" / "adapter"
    assert json.loads((calibration / "actcomp_adapter.json").read_text())["config"]["task"] == 1
    dense = load_file(str(calibration / "actcomp_adapter.safetensors"))
    magnitudes = {k.removesuffix(".B"): v.double().abs() for k, v in dense.items()}
    values = np.sort(np.concatenate([m.reshape(-1).numpy() for m in magnitudes.values()]))[::-1]
    keep = round(0.1 * values.size)
    threshold = values[keep - 1]
    meta = json.loads((task1 / "adapter" / "actcomp_adapter.json").read_text())
    masked = load_file(str(task1 / "adapter" / "actcomp_adapter.safetensors"))
    kept = 0
    for path, magnitude in magnitudes.items():
        mask = unpack_bits(masked[f"{path}.mask_bits"], tuple(magnitude.shape))
        assert torch.equal(mask, magnitude >= threshold), path
        kept += int(mask.sum())
    assert kept >= keep  # ties at the threshold are kept

    # One A seed per task, derived from the base seed and the task index; recorded and
    # reproduced.
    meta0 = json.loads((task0 / "adapter" / "actcomp_adapter.json").read_text())
    assert (meta0["config"]["task"], meta["config"]["task"]) == (0, 1)
    for path, entry in meta["linears"].items():
        seeds = [adapter_seed(1, entry["layer_id"], entry["site"], task) for task in (0, 1)]
        assert meta0["linears"][path]["a_seed"] == seeds[0]
        assert entry["a_seed"] == seeds[1] != seeds[0]
        for result in results:
            for task, name in ((0, "task0"), (1, "default")):
                expected = generate_A(seeds[task], 8, entry["in_features"])
                assert torch.equal(result["A"][(path, name)], expected), (path, name)
        assert not torch.equal(results[0]["A"][(path, "task0")], results[0]["A"][(path, "default")])
