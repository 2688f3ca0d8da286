"""The step-time cost model and ``tools/memory_plan.py --budget / --json / --calibrate``.

The JSON is compared with the memory-model functions called directly (byte for byte), the
budget choice with the fastest fitting variant of that JSON, the cost model with its closed
form, and calibration with the ratios it was given. No speed is measured here.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from actcomp_dist.ablation import parse_variant
from actcomp_dist.config import CompressionConfig
from actcomp_dist.cost_model import (
    STORAGE_BYTES_PER_ELEMENT,
    Device,
    calibrate,
    measured_ratios,
    predict_step_time,
)
from actcomp_dist.memory_model import (
    largest_micro_batch,
    plan_memory,
    predict_model_states,
)
from actcomp_dist.models import get_model_config
from actcomp_dist.training.config import read_raw_config, run_config_from_dict
from actcomp_dist.training.flops import model_flops_per_token

REPO = Path(__file__).resolve().parents[2]
CONFIG_1B = str(REPO / "configs" / "llama1b_baseline.json")
CONFIG_TINY = str(REPO / "configs" / "tiny_baseline.json")


@pytest.fixture(scope="module")
def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "tools" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(memory_plan, tmp_path, *argv):
    out = tmp_path / "plan.json"
    code = memory_plan.main([*argv, "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def _step(model, variant: str, seq: int = 4096, batch: int = 8, device=None):
    v = parse_variant(variant)
    return predict_step_time(
        model,
        v.compression(CompressionConfig()),
        seq_length=seq,
        micro_batch_size=batch,
        ac_mode=v.ac_mode,
        storage=v.storage,
        block_input=v.block_input,
        device=device or Device(),
    )


def test_json_equals_the_memory_model_called_directly(memory_plan, tmp_path):
    variants, seqs = "none,ac_full,int8,compact:0.25,offload,ac_full_offload", [1024, 4096]
    report = _run(
        memory_plan,
        tmp_path,
        *("--config", CONFIG_1B, "--gpus", "8", "--vocab-size", "32000"),
        *("--variants", variants, "--seq-lengths", "1024,4096"),
    )
    config = run_config_from_dict(read_raw_config(CONFIG_1B, []), source=CONFIG_1B)
    model = get_model_config("1b", vocab_size=32000)
    for name in variants.split(","):
        variant = parse_variant(name)
        compression = variant.compression(config.compression)

        def plan(batch, seq, variant=variant, compression=compression):
            setting = variant.activation_setting(
                config.memory, batch, seq, dtype_bytes=2, device_type="cuda"
            )
            return plan_memory(
                model.replace(seq_length=seq),
                compression,
                setting,
                ac_mode=variant.ac_mode,
                zero_stage=1,
                data_parallel=8,
                host_memory=256 * 10**9,  # --host-memory's default
            )

        states = predict_model_states(model, compression, zero_stage=1, data_parallel=8)
        assert report["model_states"][name]["total"] == states.total
        assert report["model_states"][name]["optimizer_state"] == states.optimizer_state
        for seq in seqs:
            expected = plan(8, seq)
            assert report["saved_activations"][name][str(seq)] == expected.activations.total
            assert report["peak"][name][str(seq)] == expected.total
            assert report["fits"][name][str(seq)] == expected.fits
            if variant.offloads:
                host = report["host_offload"][name][str(seq)]
                assert host == expected.activations.host_total > 0
            else:
                assert name not in report["host_offload"]
            assert report["max_micro_batch"][name][str(seq)] == largest_micro_batch(
                lambda b, seq=seq, plan=plan: plan(b, seq)
            )
            assert report["step_time_ratio"][name][str(seq)] == pytest.approx(
                _step(model, name, seq).ratio(), rel=1e-12
            )
    assert report["budget_choice"] is None
    # The offloaded activations outgrow host memory before the device: the largest
    # micro-batch of ``offload`` is the host's limit.
    host_limited = report["max_micro_batch"]["offload"]["4096"]
    per_sample = report["host_offload"]["offload"]["4096"] / 8
    assert host_limited == int(256 * 10**9 // per_sample)


def test_budget_picks_the_fastest_variant_that_fits(memory_plan, tmp_path):
    # At micro-batch 16 and s=4096 neither compact:0.25 (the fastest by the counted flops) nor
    # none fit in 80 GB (their largest micro-batches are 13 and 14); int8 and ac_full do.
    report = _run(
        memory_plan,
        tmp_path,
        *("--config", CONFIG_1B, "--gpus", "8", "--vocab-size", "32000", "--budget", "80GB"),
        *("--variants", "none,compact:0.25,int8,ac_full", "--seq-lengths", "4096"),
        *("--micro-batch", "16"),
    )
    ratios = {v: r["4096"] for v, r in report["step_time_ratio"].items()}
    fits = {v: f["4096"] for v, f in report["fits"].items()}
    fastest = min(ratios, key=ratios.get)
    assert fastest == "compact:0.25" and not fits[fastest] and not fits["none"]
    choice = report["budget_choice"]["4096"]
    assert choice["variant"] == min((v for v in ratios if fits[v]), key=ratios.get) == "int8"
    assert choice["peak"] == report["peak"]["int8"]["4096"] <= report["gpu_memory"]
    assert "compact:0.25" in choice["reason"]


def test_max_micro_batch_picks_the_largest_within_the_time_limit(memory_plan, tmp_path):
    report = _run(
        memory_plan,
        tmp_path,
        *("--config", CONFIG_1B, "--gpus", "8", "--vocab-size", "32000", "--budget", "80GB"),
        *("--variants", "none,ac_full,int8,compact:0.25+int8", "--seq-lengths", "4096"),
        *("--max-micro-batch", "--max-time-ratio", "1.10"),
    )
    batches = {v: b["4096"] for v, b in report["max_micro_batch"].items()}
    choice = report["budget_choice"]["4096"]
    # ac_full fits the most but recomputes a forward (> 1.10x); int8 alone packs too slowly.
    assert batches["ac_full"] > batches[choice["variant"]]
    assert choice["variant"] == "compact:0.25+int8"
    assert (
        choice["step_time_ratio"] <= 1.10
        and choice["max_micro_batch"] == batches["compact:0.25+int8"] > batches["none"]
    )


def test_cost_model_closed_form_and_ordering():
    model = get_model_config("1b", vocab_size=32000)
    device = Device(peak_flops=1e15, memory_bandwidth=3e12)
    seq = 4096
    none, selective, full, int8 = (
        _step(model, v, seq, device=device) for v in ("none", "ac_selective", "ac_full", "int8")
    )
    base = model_flops_per_token(model, seq) / 1e15
    assert none.base == base and none.ratio() == 1.0
    assert 1.0 < selective.ratio() < full.ratio()
    h, layers = model.hidden_size, model.num_layers
    assert selective.extra == {"recompute": pytest.approx(layers * 4 * h * seq / 1e15, rel=1e-12)}
    stored = 4 * model.num_attention_heads * model.head_dim + 2 * model.ffn_hidden_size
    pack = layers * STORAGE_BYTES_PER_ELEMENT * stored / 3e12
    # The model's float64 closed form in another order: a few roundings apart (rel 1e-12).
    assert int8.ratio() - 1.0 == pytest.approx(
        (pack + selective.extra["recompute"]) / base, rel=1e-12
    )
    assert _step(model, "fp8", seq, device=device).ratio() == int8.ratio()
    assert _step(model, "int8@attention/swiglu", seq, device=device) == int8
    # int8@KINDS: the kinds named; only 8-bit attention runs the SDPA forward again. The norm
    # outputs (2 h per token and block) are dequantised twice (the norm, the next linear).
    norm_swiglu = _step(model, "int8@norm/swiglu", seq, device=device)
    moved = 2 * h * (STORAGE_BYTES_PER_ELEMENT + 3) + STORAGE_BYTES_PER_ELEMENT * 2 * (
        model.ffn_hidden_size
    )
    assert norm_swiglu.extra == {"storage": pytest.approx(layers * moved / 3e12, rel=1e-12)}
    assert 1.0 < norm_swiglu.ratio() < int8.ratio()
    # On CPU the 8-bit attention keeps the log-sum-exp and its packed output: no SDPA forward
    # again, the output (H d per token) dequantised a second time (proj's weight gradient).
    cpu = Device(peak_flops=1e15, memory_bandwidth=3e12, type="cpu")
    extra_unpack = layers * 3 * model.num_attention_heads * model.head_dim / 3e12
    assert _step(model, "int8", seq, device=cpu).extra == {
        "storage": pytest.approx(pack + extra_unpack, rel=1e-12)
    }
    assert _step(model, "int8@norm/swiglu", seq, device=cpu) == norm_swiglu
    # Slower memory makes the 8-bit packing, and only it, dearer.
    slow = Device(peak_flops=1e15, memory_bandwidth=1e12)
    assert _step(model, "int8", seq, device=slow).ratio() > int8.ratio()
    assert _step(model, "ac_full", seq, device=slow).ratio() == full.ratio()
    assert _step(model, "lowrank:0.25", seq) is None


def test_device_type_is_cpu_or_cuda():
    """``Device.type`` picks the 8-bit attention's backward; a name that is neither (``"gpu"``)
    is refused, not counted as the CPU backward (as ``ActivationSetting.device_type``)."""
    with pytest.raises(ValueError, match="Device.type='gpu' must be 'cpu' or 'cuda'"):
        Device(type="gpu")


def test_cost_model_of_lowrank_storage_closed_form():
    """``ac_lowrank:R``: 6 n k flops per token and factorised tensor (two norms of width h,
    ``[gate | up]`` of width 2f), one QR of [n, k] per micro-batch, and the uncompressed qkv /
    fc1 weight gradients from the factors instead of the norm output."""
    model = get_model_config("1b", vocab_size=32000)
    device = Device(peak_flops=1e15, memory_bandwidth=3e12)
    seq, batch = 4096, 2
    tokens = seq * batch
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    qkv_out = (model.num_attention_heads + 2 * model.query_groups) * model.head_dim
    k_h, k_f = math.ceil(h / 8), math.ceil(2 * f / 8)  # ratio 0.125 of each width, rounded up

    def factorise(n, k):
        return 6 * n * k + 4 * n * k * k / tokens

    readers = sum(2 * m * k_h + 2 * m * k_h * h / tokens - 2 * m * h for m in (qkv_out, 2 * f))
    work = layers * (2 * factorise(h, k_h) + factorise(2 * f, k_f) + readers)
    step = _step(model, "ac_lowrank:0.125", seq, batch, device=device)
    assert step.extra == {"factorisation": pytest.approx(work / 1e15, rel=1e-12)}
    # Compressed readers (qkv, fc1 by default) keep their own Z: only the factorisations count.
    assert {"qkv", "fc1"} <= set(CompressionConfig().sites)
    compact = _step(model, "compact:0.25+ac_lowrank:0.125", seq, batch, device=device)
    factorisations = layers * (2 * factorise(h, k_h) + factorise(2 * f, k_f))
    assert compact.extra["factorisation"] == pytest.approx(factorisations / 1e15, rel=1e-12)


def test_cost_model_of_packed_block_input_closed_form():
    """``ac_full_BLOCK``: the recompute of ``ac_full`` plus, per checkpointed block, LoRAct's
    factorisation of the block input (width h: ``Y = A^T A[:, S]``, ``L = A Q``, ``L Q^T``,
    2 h k flops per token each, and the QR of [h, k] with its explicit Q, 4 h k^2 per
    micro-batch), the 8-bit packing's 6 bytes per element, or the host transfer."""
    model = get_model_config("1b", vocab_size=32000)
    device = Device(peak_flops=1e15, memory_bandwidth=3e12, host_bandwidth=25e9)
    seq, batch = 4096, 2
    tokens = seq * batch
    h, layers = model.hidden_size, model.num_layers
    full = _step(model, "ac_full", seq, batch, device=device)
    k = math.ceil(h / 8)
    lowrank = _step(model, "ac_full_lowrank:0.125", seq, batch, device=device)
    factorise = 2 * h * k + 2 * h * k + 2 * h * k + 4 * h * k * k / tokens
    assert lowrank.extra == {
        "recompute": full.extra["recompute"],
        "factorisation": pytest.approx(layers * factorise / 1e15, rel=1e-12),
    }
    absolute = _step(model, "ac_full_lowrank:16", seq, batch, device=device)
    factorise = 6 * h * 16 + 4 * h * 16 * 16 / tokens
    assert absolute.extra["factorisation"] == pytest.approx(layers * factorise / 1e15, rel=1e-12)
    int8 = _step(model, "ac_full_int8", seq, batch, device=device)
    assert int8.extra["storage"] == pytest.approx(
        layers * STORAGE_BYTES_PER_ELEMENT * h / 3e12, rel=1e-12
    )
    # Offloaded block inputs: 2 bytes per element each way; the forward copy counts beyond
    # the forward compute it overlaps (a third of the model flops).
    offload = _step(model, "ac_full_offload", seq, batch, device=device)
    one_way = layers * 2 * h / 25e9
    expected = one_way + max(0.0, one_way - full.base / 3)
    assert offload.extra == {
        "recompute": full.extra["recompute"],
        "transfer": pytest.approx(expected, rel=1e-12),
    }
    assert 1.0 < full.ratio() < lowrank.ratio()


def test_lowrank_factorisation_flops_match_flop_counter():
    """The GEMM part of the factorisation counted by the model (6 N n k per tensor) is what
    PyTorch's FlopCounterMode counts for pack + unpack of LoRAct's storage; the QR is not a
    GEMM (FlopCounterMode has no formula for it) and is the rest, 4 n k^2."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from actcomp_dist.cost_model import _lowrank_factorisation
    from actcomp_dist.storage import LowRankStorage

    tokens, n, k = 96, 40, 8
    packer = LowRankStorage(k)
    a = torch.randn(tokens, n)
    with FlopCounterMode(display=False) as counter:
        packer.unpack(packer.pack(a), a)
    assert counter.get_total_flops() == 6 * tokens * n * k
    per_call = _lowrank_factorisation(n, k, tokens) * tokens
    assert per_call == counter.get_total_flops() + 4 * n * k * k


def test_cost_model_of_offload_closed_form():
    """``offload``: the block norms' outputs, q, k, v, o and ``[gate | up]`` (16-bit) cross the
    host link twice; the backward copies count in full (not overlapped), the forward ones only
    beyond the forward compute; the SDPA forward re-run in backward counts too."""
    model = get_model_config("1b", vocab_size=32000)
    seq, batch = 4096, 2
    h, f, d, layers = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.num_layers
    heads, groups = model.num_attention_heads, model.query_groups
    offloaded = layers * 2 * (2 * h + (2 * heads + 2 * groups) * d + 2 * f)  # bytes per token
    rerun = layers * 4 * h * seq / 1e15
    for bandwidth in (25e9, 1e12):
        device = Device(peak_flops=1e15, memory_bandwidth=3e12, host_bandwidth=bandwidth)
        step = _step(model, "offload", seq, batch, device=device)
        one_way = offloaded / bandwidth
        expected = rerun + one_way + max(0.0, one_way - step.base / 3)
        assert step.extra == {"transfer": pytest.approx(expected, rel=1e-12)}
    # At 25 GB/s the forward copies outlast the forward compute; at 1 TB/s they hide behind it.
    assert offloaded / 25e9 > step.base / 3 > offloaded / 1e12
    slow = _step(model, "offload", seq, batch, device=Device(host_bandwidth=25e9))
    fast = _step(model, "offload", seq, batch, device=Device(host_bandwidth=50e9))
    assert slow.ratio() > fast.ratio() > 1.0


def test_calibration_reproduces_the_given_ratios():
    model = get_model_config("tiny")
    measured = {"none": 1.0, "ac_selective": 1.21, "int8": 1.37, "compact:0.25": 1.08}
    predicted = {name: _step(model, name, 128, 4) for name in measured}
    factors = calibrate(measured, predicted)
    for name, ratio in measured.items():
        assert predicted[name].ratio(factors) == pytest.approx(ratio, rel=1e-12)
    # A kind that only appears combined with another is not fitted.
    assert calibrate(
        {"none": 1.0, "int8+ac_selective": 1.5},
        {"int8+ac_selective": _step(model, "int8+ac_selective", 128, 4)},
    ) == {
        "recompute": 1.0,
        "storage": 1.0,
        "projection": 1.0,
        "factorisation": 1.0,
        "transfer": 1.0,
    }


def test_cli_calibration_from_records(memory_plan, tmp_path):
    # records.json as tools/ablate.py writes it (the fields the planner reads), two repeats of
    # none: the ratio is over their median.
    times = {"none": [0.10, 0.12], "ac_selective": [0.143], "int8": [0.165]}
    records = [
        {"variant": v, "step_time_s": t, "repeat": i}
        for v, ts in times.items()
        for i, t in enumerate(ts)
    ]
    assert measured_ratios(records)["int8"] == pytest.approx(1.5, rel=1e-12)  # 0.165 / 0.11
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    report = _run(
        memory_plan,
        tmp_path,
        *("--config", CONFIG_TINY, "--variants", "none,ac_selective,int8,int8+ac_selective"),
        *("--seq-lengths", "128", "--calibrate", str(path)),
    )
    ratios = {v: r["128"] for v, r in report["step_time_ratio"].items()}
    assert ratios["ac_selective"] == pytest.approx(1.3, rel=1e-12)
    assert ratios["int8"] == pytest.approx(1.5, rel=1e-12)
    assert ratios["ac_selective+int8"] > ratios["int8"]
    assert set(report["cost_model"]["factors"]) == {
        "recompute",
        "storage",
        "projection",
        "factorisation",
        "transfer",
    }


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--variants", "none,bogus:1"], "bogus"),
        (["--budget", "lots"], "--budget"),
        (["--budget", "1GB"], "--budget"),  # below the 1B model states on one GPU
        (["--calibrate", "/nonexistent/records.json"], "--calibrate"),
        (["--max-time-ratio", "0.5", "--budget", "80GB"], "--max-time-ratio"),
        (["--max-micro-batch"], "--budget"),
        (["--peak-tflops", "fast"], "--peak-tflops"),
        (["--max-time-ratio", "nan", "--budget", "80GB"], "--max-time-ratio"),
        (["--mem-bw", "quick"], "--mem-bw"),
    ],
)
def test_bad_inputs_one_line_exit_2(memory_plan, capsys, argv, names):
    code = memory_plan.main(["--config", CONFIG_1B, "--vocab-size", "32000", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and names in err
