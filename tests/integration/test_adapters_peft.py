"""Adapters in PEFT's layout: ``peft.PeftModel.from_pretrained`` loads what ``save_adapter``
writes onto the Hugging Face model of the same base weights.

Reference: our own merge (:func:`export_merged_hf`: ``W + s B A`` per fused linear, split into
Hugging Face modules) against PEFT's ``merge_and_unload()`` of the loaded adapter, weight by
weight, and the logits of the two models. Both merges compute ``W + B' A`` with a reduction of
length r, so they agree within the rounding bound ``2 gamma_{r+2} (|W| + |B'| |A|)``
(tests/helpers/tolerances.py). LoRA (trained A), dense LoRI (A regenerated from its seed, written out
for PEFT) and LoRI-S (the mask folded into B) are covered. (The forward of PEFT's unmerged
model is PEFT's own code; what this project owns is the file layout, checked through PEFT's
merge.)
"""

from __future__ import annotations

import os

import pytest
import torch

from actcomp_dist.adapters import AdapterConfig, apply_adapters, compute_masks, save_adapter
from actcomp_dist.adapters.merge import export_merged_hf
from tests.helpers.adapters import randomize_adapters
from tests.helpers.tolerances import assert_within_rounding

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RANK = 4
CASES = {
    "lora": AdapterConfig(method="lora", rank=RANK, alpha=6.0, seed=3),
    "lori": AdapterConfig(method="lori", rank=RANK, seed=4),
    "lori_s": AdapterConfig(method="lori", rank=RANK, seed=5, sparsity=0.75),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_adapter_and_merges_to_our_weights(case, tmp_path, single_rank):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    from actcomp_dist.models.hf import build_llama_from_hf
    from tests.helpers.hf_models import make_hf_model

    make_hf_model(tmp_path / "base")
    model = build_llama_from_hf(tmp_path / "base").eval()
    apply_adapters(model, CASES[case])
    randomize_adapters(model, seed=11)
    if CASES[case].sparsity:
        compute_masks(model)
    save_adapter(model, tmp_path / "adapter")
    export_merged_hf(model, tmp_path / "ours", base_directory=tmp_path / "base")

    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = peft_model.merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    original = load_file(str(tmp_path / "base" / "model.safetensors"))
    changed = 0
    for name, expected in ours.items():
        module = "base_model.model." + name.removesuffix(".weight")
        a = adapter.get(module + ".lora_A.weight")
        if a is None:  # not adapted: PEFT leaves it as loaded
            assert torch.equal(merged[name], expected), name
            continue
        b = adapter[module + ".lora_B.weight"]
        magnitude = original[name].double().abs() + b.double().abs() @ a.double().abs()
        assert_within_rounding(merged[name], expected, magnitude, RANK + 2, msg=name)
        changed += not torch.equal(expected, original[name])
    assert changed == 7 * 2  # q, k, v, o, gate, up, down in both layers moved


def test_merge_adapters_tool_equals_the_python_merge(tmp_path, single_rank):
    """``tools/merge_adapters.py`` (its own one-rank process group, in a subprocess) writes
    the same merged weights as :func:`export_merged_hf`, bit for bit, for two adapters merged
    with weights; a missing adapter is one clear line and exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from actcomp_dist.adapters import load_adapter
    from actcomp_dist.models.hf import build_llama_from_hf
    from tests.helpers.hf_models import make_hf_model

    root = Path(__file__).resolve().parents[2]
    make_hf_model(tmp_path / "base")
    model = build_llama_from_hf(tmp_path / "base").eval()
    for name, seed in (("a", 1), ("b", 2)):
        apply_adapters(model, CASES["lori"].replace(seed=seed), name)
        randomize_adapters(model, name, seed=seed)
        save_adapter(model, tmp_path / name, name)
    fresh = build_llama_from_hf(tmp_path / "base").eval()
    load_adapter(fresh, tmp_path / "a", "a")
    load_adapter(fresh, tmp_path / "b", "b")
    export_merged_hf(fresh, tmp_path / "python", ["a", "b"], {"a": 0.5, "b": 0.25})
    command = [sys.executable, "tools/merge_adapters.py", "--base", str(tmp_path / "base")]
    command += ["--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")]
    command += ["--weight", "0.5", "--weight", "0.25", "--out", str(tmp_path / "tool")]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = load_file(str(tmp_path / "python" / "model.safetensors"))
    tool = load_file(str(tmp_path / "tool" / "model.safetensors"))
    assert ours.keys() == tool.keys()
    assert all(torch.equal(ours[k], tool[k]) for k in ours)
    command[command.index(str(tmp_path / "b"))] = str(tmp_path / "missing")
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "missing" in result.stderr and "Traceback" not in result.stderr
