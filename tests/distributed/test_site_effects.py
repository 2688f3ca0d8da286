"""What compressing each site removes (:mod:`actcomp_dist.site_effects`) against measurement.

References: the saved-activation bytes :class:`~actcomp_dist.memory.SavedTensorCounter`
counts in the real model's forward with the run's compression and with the same compression
minus one site (exact bytes, TP = 1 in fp32 and bf16, TP = 2 and TP = 2 + SP); the bytes the
layers' own :class:`~actcomp_dist.parallel.collectives.CommCounter` records for their backward
all-gathers (TP = 2 + SP); and the matmul flops PyTorch's ``FlopCounterMode`` counts in a
forward + backward (TP = 1). All comparisons are exact: they are counts, not timings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from actcomp_dist import CompressionConfig
from actcomp_dist.ablation.measure import masked_mean_loss, measure_model_forward
from actcomp_dist.memory_model import ActivationSetting
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.parallel import state
from actcomp_dist.site_effects import site_effects
from actcomp_dist.storage import StoragePolicy
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing
from actcomp_dist.training.config import read_raw_config, run_config_from_dict
from actcomp_dist.training.metrics import format_bytes
from tests.helpers.distributed import run_distributed

REPO = Path(__file__).resolve().parents[2]
CONFIG = get_model_config("tiny", seq_length=32)
B, S = 2, 32
ALL_SITES = ("qkv", "proj", "fc1", "fc2")
COMPRESSION = CompressionConfig(method="compact", rank=0.25, sites=ALL_SITES, seed=3)
POLICIES = {
    "keep": {},
    "int8": {"attention": "int8", "swiglu": "int8"},
    "norm_int8": {"norm": "int8"},
    "norm_lowrank": {"norm": "lowrank:0.25"},
}


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CONFIG.vocab_size, (B, S), generator=generator)
    labels = torch.randint(0, CONFIG.vocab_size, (B, S), generator=generator)
    return tokens, labels, torch.ones(B, S)


def _model(compression, policy, dtype, mode="none", sequence_parallel=False):
    model = build_llama(
        CONFIG,
        compression,
        init_seed=0,
        sequence_parallel=sequence_parallel,
        storage_policy=StoragePolicy.from_mapping(POLICIES[policy]),
    )
    for param in model.parameters():  # what DeepSpeed's bf16 engine does: parameters only
        param.data = param.data.to(dtype)
    apply_activation_checkpointing(model, mode, None)
    return model


def _without(site):
    rest = tuple(s for s in ALL_SITES if s != site)
    return COMPRESSION.replace(sites=rest)


def _setting(dtype, policy, tensor_parallel=1, sequence_parallel=False, tp_rank=0):
    return ActivationSetting(
        B,
        S,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        tensor_parallel=tensor_parallel,
        sequence_parallel=sequence_parallel,
        tp_rank=tp_rank,
        storage=StoragePolicy.from_mapping(POLICIES[policy]),
    )


def _measured_totals(dtype, policy, mode, sequence_parallel=False):
    """Saved bytes with every site compressed, and with each site left out."""
    batch = _batch()
    totals = {
        "all": measure_model_forward(
            _model(COMPRESSION, policy, dtype, mode, sequence_parallel), *batch
        ).total
    }
    for site in ALL_SITES:
        model = _model(_without(site), policy, dtype, mode, sequence_parallel)
        totals[site] = measure_model_forward(model, *batch).total
    return totals


@pytest.mark.parametrize("mode", ["none", "selective"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_bytes_with_and_without_each_site_equal_measured(single_rank, dtype, policy, mode):
    measured = _measured_totals(dtype, policy, mode)
    effects = site_effects(CONFIG, COMPRESSION, _setting(dtype, policy), mode)
    assert [e.site for e in effects] == list(ALL_SITES)
    for effect in effects:
        assert effect.saved_with == measured["all"]
        assert effect.saved_without == measured[effect.site]


def test_plain_words_where_compression_removes_nothing(single_rank):
    # The memory-efficient block keeps qkv's and fc1's input (the norm output), proj's (the
    # attention output) and fc2's ([gate | up]) anyway: every compressed copy is extra.
    setting = _setting(torch.float32, "keep")
    for effect in site_effects(CONFIG, COMPRESSION, setting):
        assert effect.removed < 0
        line = effect.warning(format_bytes)
        assert line.startswith(f"warning: compressing {effect.site} adds ")
        assert format_bytes(-effect.removed) in line
    # Under 8-bit attention on CUDA proj keeps the packed attention output of its own (the
    # attention keeps q, k, v only and runs SDPA again): compressing proj replaces it by Z and
    # removes bytes. On CPU the attention keeps the packed output itself (its backward starts
    # from it), so there every site adds. The other sites add on both.
    for device_type in ("cuda", "cpu"):
        setting = dataclasses.replace(_setting(torch.float32, "int8"), device_type=device_type)
        by_site = {e.site: e for e in site_effects(CONFIG, COMPRESSION, setting)}
        if device_type == "cuda":
            assert by_site["proj"].removed > 0 and by_site["proj"].warning(format_bytes) is None
        else:
            assert by_site["proj"].removed < 0
        assert all(by_site[s].removed < 0 for s in ("qkv", "fc1", "fc2"))
    assert site_effects(CONFIG, CompressionConfig(), setting) == []


def _matmul_flops(model) -> int:
    tokens, labels, mask = _batch()
    with FlopCounterMode(display=False) as counter:
        masked_mean_loss(model(tokens, labels, mask), mask).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("grad_mode", ["lift", "subspace"])
def test_weight_gradient_flops_equal_counted(single_rank, grad_mode):
    # Leaving one site out changes only that site's weight-gradient work (projection,
    # g^T Z, lift vs g^T X); the rest of the forward + backward is the same matmuls.
    compression = COMPRESSION.replace(grad_mode=grad_mode)
    setting = _setting(torch.float32, "keep")
    full = _matmul_flops(_model(compression, "keep", torch.float32))
    for effect in site_effects(CONFIG, compression, setting):
        rest = tuple(s for s in ALL_SITES if s != effect.site)
        without = _matmul_flops(_model(compression.replace(sites=rest), "keep", torch.float32))
        predicted = effect.weight_gradient_flops_with - effect.weight_gradient_flops_without
        assert full - without == predicted, effect.site


def _tp_measure(rank, world_size, sequence_parallel):
    state.initialize_model_parallel(world_size)
    out = {}
    for policy in ("keep", "int8", "norm_lowrank"):
        batch = _batch()
        for name, compression in [("all", COMPRESSION)] + [(s, _without(s)) for s in ALL_SITES]:
            model = _model(compression, policy, torch.float32, sequence_parallel=sequence_parallel)
            saved = measure_model_forward(model, *batch).total
            loss = masked_mean_loss(model(*batch), batch[2])
            for module in model.modules():
                if hasattr(module, "reset_comm"):
                    module.reset_comm()
            loss.backward()
            gathered = {
                site: sum(
                    module.comm["backward"].nbytes["all_gather"]
                    for path, module in model.named_modules()
                    if path.endswith("." + site)
                )
                for site in ALL_SITES
            }
            out[policy, name] = saved, gathered
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_saved_bytes_and_backward_all_gather_equal_measured(tmp_path, sequence_parallel):
    results = run_distributed(_tp_measure, 2, tmp_path, sequence_parallel)
    for tp_rank, measured in enumerate(results):
        for policy in ("keep", "int8", "norm_lowrank"):
            setting = _setting(torch.float32, policy, 2, sequence_parallel, tp_rank)
            for effect in site_effects(CONFIG, COMPRESSION, setting):
                site = effect.site
                assert effect.saved_with == measured[policy, "all"][0]
                assert effect.saved_without == measured[policy, site][0]
                if not sequence_parallel:
                    assert effect.all_gather_with is None and effect.all_gather_without is None
                    continue
                assert effect.all_gather_with == measured[policy, "all"][1][site], site
                assert effect.all_gather_without == measured[policy, site][1][site], site


def test_memory_plan_json_and_warnings_equal_site_effects(tmp_path, capsys):
    # tools/memory_plan.py's per-site section against site_effects called directly (which the
    # tests above hold to the measurement), at TP 2 + SP so that the all-gather column is set.
    from actcomp_dist.ablation import parse_variant
    from actcomp_dist.cli import memory_plan

    config_path = str(REPO / "configs" / "llama350m_compact.json")
    # Everything kept exactly unless the variant says int8 (the config ships 8-bit storage).
    overrides = [
        "parallel.tensor_parallel=2",
        "parallel.sequence_parallel=true",
        "memory.policy={}",
    ]
    out = tmp_path / "plan.json"
    argv = [
        *("--config", config_path, "--gpus", "8", "--vocab-size", "32000"),
        *("--variants", "none,compact:0.25,compact:0.125+int8", "--seq-lengths", "256,4096"),
        *(arg for override in overrides for arg in ("--set", override)),
        *("--json", str(out)),
    ]
    assert memory_plan.main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    config = run_config_from_dict(read_raw_config(config_path, overrides), source=config_path)
    model = get_model_config("350m", vocab_size=32000)
    assert "none" not in report["site_effects"]  # nothing compressed, no rows
    for name in ("compact:0.25", "compact:0.125+int8"):
        variant = parse_variant(name)
        for seq in (256, 4096):
            setting = variant.activation_setting(
                config.memory,
                config.train.micro_batch_size,
                seq,
                dtype_bytes=2,
                tensor_parallel=2,
                sequence_parallel=True,
                device_type="cuda",  # the planner sizes GPUs
            )
            expected = site_effects(
                model.replace(seq_length=seq), variant.compression(config.compression), setting
            )
            got = report["site_effects"][name][str(seq)]
            assert list(got) == [e.site for e in expected]
            for effect in expected:
                row = got[effect.site]
                assert row["saved_with"] == effect.saved_with
                assert row["saved_without"] == effect.saved_without
                assert row["removed"] == effect.removed
                assert effect.all_gather_with is not None
                assert row["all_gather_with"] == effect.all_gather_with
                assert row["all_gather_without"] == effect.all_gather_without
                assert row["weight_gradient_flops_with"] == effect.weight_gradient_flops_with
    # The efficient block keeps every site's input anyway; under 8-bit attention proj keeps
    # its own packed copy, which a compressed proj replaces: proj pays, the others do not.
    for site in ("qkv", "proj", "fc1", "fc2"):
        assert f"in compact:0.25, compressing {site} removes no saved activations" in text
    assert "in compact:0.125+int8, compressing proj" not in text
    assert "in compact:0.125+int8, compressing fc2 removes no saved activations" in text
