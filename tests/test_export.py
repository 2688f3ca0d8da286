"""From a training run to a Hugging Face directory: ``tools/convert_hf_llama.py to-hf``.

Two short runs of the tiny config on 2 gloo ranks, ZeRO-1 and ZeRO-3, each saving steps 1 and
2. ``to-hf`` is pointed at the run directory, at its ``checkpoints/`` folder and at one step:
it must pick the newest *complete* step (a step whose save was interrupted is skipped), and
every stage's export must equal, bit for bit, the weights the run itself held when it finished
(gathered from the live model; under ZeRO-3 DeepSpeed's consolidation of the partitioned fp32
parameters must reproduce them). The result loads in transformers and generates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.training.config import apply_overrides
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _train_rank(rank: int, world_size: int, raws: list[dict]) -> list[dict]:
    """Train each config; return the final weights (Hugging Face names) as the run held them."""
    import deepspeed

    from actcomp_dist.models import full_state_dict
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import Trainer

    finals = []
    for raw in raws:
        trainer = Trainer(run_config_from_dict(raw))
        try:
            trainer.train()
            # Under ZeRO-3 each rank holds a partition; gather it (a no-op for stages 0-2).
            with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
                finals.append(full_state_dict(trainer.model))
        finally:
            trainer.close()
    return finals


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("export")
    corpus = ensure_embedded_corpus(tmp / "corpus", vocab_size=512, max_bytes=60_000)
    base = json.loads((ROOT / "configs" / "tiny_compact.json").read_text())
    raws, run_dirs = [], {}
    for stage in (1, 3):
        run_dir = tmp / f"zero{stage}"
        run_dirs[f"zero{stage}"] = run_dir
        raws.append(
            apply_overrides(
                base,
                [
                    f"run_dir={run_dir}",
                    f"data.paths={json.dumps([corpus.data_prefix])}",
                    f"data.tokenizer={corpus.tokenizer_model}",
                    "train.steps=2",
                    "train.eval_interval=0",
                    "checkpoint.interval=1",
                    f"deepspeed.zero_optimization.stage={stage}",
                ],
            )
        )
    finals = run_distributed(_train_rank, 2, tmp, raws, timeout=300)[0]
    return {
        name: (run_dir, final)
        for (name, run_dir), final in zip(run_dirs.items(), finals, strict=True)
    }


def _to_hf(source: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tools.convert_hf_llama import main

    main(["to-hf", str(source), str(out)])
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.distributed
def test_to_hf_from_a_run_picks_the_newest_complete_step(runs, tmp_path):
    run_dir, _ = runs["zero1"]
    newest = run_dir / "checkpoints" / "step_0000002"
    from_run = _to_hf(run_dir, tmp_path / "from_run")
    from_folder = _to_hf(run_dir / "checkpoints", tmp_path / "from_folder")
    from_step = _to_hf(newest, tmp_path / "from_step")
    older = _to_hf(run_dir / "checkpoints" / "step_0000001", tmp_path / "older")
    for name, tensor in from_step.items():
        assert torch.equal(from_run[name], tensor) and torch.equal(from_folder[name], tensor)
    assert any(not torch.equal(older[n], t) for n, t in from_step.items())  # it trained
    # A copy of the run whose last save was interrupted (no COMPLETE marker): step 1 is used.
    copy = tmp_path / "interrupted"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step_0000002" / "COMPLETE").unlink()
    from_interrupted = _to_hf(copy, tmp_path / "from_interrupted")
    for name, tensor in older.items():
        assert torch.equal(from_interrupted[name], tensor), name


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_export_equals_the_weights_the_run_finished_with(runs, tmp_path, stage):
    run_dir, final = runs[stage]
    exported = _to_hf(run_dir, tmp_path / stage)
    assert exported.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_run_loads_in_transformers_and_generates(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    _to_hf(runs["zero1"][0], out)
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    prompt = torch.tensor([[1, 17, 42, 99]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)
    assert torch.equal(generated[:, :4], prompt)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_finds_the_newest_step_through_latest(runs):
    """``checkpoints/latest`` names the newest complete step's DeepSpeed tag, so DeepSpeed's
    own zero_to_fp32 reader needs no ``--tag``: pointed at ``checkpoints/`` it returns exactly
    what reading step 2 by its tag returns."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = runs["zero3"][0] / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000002/step_0000002"
    through_latest = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints))
    by_tag = get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoints / "step_0000002"), tag="step_0000002"
    )
    assert through_latest.keys() == by_tag.keys()
    assert all(torch.equal(through_latest[k], by_tag[k]) for k in by_tag)
