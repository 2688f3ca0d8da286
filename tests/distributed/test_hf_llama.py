"""Hugging Face LLaMA checkpoints <-> our model (actcomp_dist.models.hf), each against a reference.

- Parity: with method ``none`` our logits equal ``transformers.LlamaForCausalLM``'s for the same
  weights, at TP = 1 and at TP = 2 (with and without sequence parallelism) on 2 gloo ranks,
  for grouped-query attention and tied embeddings. The reference model is a tiny
  ``LlamaForCausalLM`` built offline from a ``LlamaConfig`` with random weights (nothing is
  downloaded). Tolerance: the two implementations differ only in summation order (attention
  kernel, fused QKV / gate-up GEMMs, TP all-reduce), so both are compared with transformers'
  model run in float64: ours may be no less accurate than transformers' own fp32 logits
  (:func:`tests.helpers.tolerances.assert_as_accurate_as`). The loss is bounded by the logits'
  measured error: per token ``logsumexp(z) - z_y`` moves by at most twice the largest logit
  error, plus the fp32 rounding of the log-sum-exp and of the mean (``gamma_{V + N}`` of
  ``|lse| + |z_y|``).
- Conversion: Hugging Face -> ours -> Hugging Face is bit-exact (every tensor, its dtype; fp32
  and bf16; single-file and sharded input; TP = 1 and 2), and the per-rank slice reader gives
  exactly ``shard_full_state_dict``'s shards.
- ``tools/convert_hf_llama.py`` round-trips through per-TP-rank shards, bit-exact.
- Unsupported checkpoints (scaled RoPE, biases) and mismatched files fail with ValueError.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from actcomp_dist.models import shard_full_state_dict
from actcomp_dist.models.hf import (
    build_llama_from_hf,
    config_from_hf,
    config_to_hf,
    export_hf,
    read_hf_config,
    read_hf_rank_state_dict,
    read_hf_state_dict,
)
from actcomp_dist.parallel import state
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import make_hf_model
from tests.helpers.tolerances import assert_as_accurate_as, gamma

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

SEQ = 16


def _tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_same_tensors(expected_dir, actual_dir):
    expected, actual = read_hf_state_dict(expected_dir), read_hf_state_dict(actual_dir)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_transformers_reads_it(tmp_path):
    make_hf_model(tmp_path / "hf", groups=2)
    ours = read_hf_config(tmp_path / "hf")
    assert (ours.num_attention_heads, ours.query_groups, ours.ffn_hidden_size) == (4, 2, 96)
    assert (ours.rope_theta, ours.rms_norm_eps, ours.seq_length) == (500000.0, 1e-5, 32)
    assert config_from_hf(config_to_hf(ours)) == ours
    written = tmp_path / "written"
    written.mkdir()
    (written / "config.json").write_text(json.dumps(config_to_hf(ours)))
    loaded = transformers.LlamaConfig.from_pretrained(written)
    assert loaded.num_key_value_heads == 2
    assert loaded.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_unsupported_configs_are_refused(change, match):
    base = config_to_hf(
        config_from_hf(
            {
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 256,
            }
        )
    )
    with pytest.raises(ValueError, match=match):
        config_from_hf({**base, **change})


def test_mismatched_checkpoint_is_refused(tmp_path):
    make_hf_model(tmp_path / "hf")
    config = read_hf_config(tmp_path / "hf")
    with pytest.raises(ValueError, match="missing"):
        read_hf_rank_state_dict(tmp_path / "hf", config.replace(num_layers=3), 0, 1)
    with pytest.raises(ValueError, match="shape"):
        read_hf_rank_state_dict(tmp_path / "hf", config.replace(ffn_hidden_size=128), 0, 1)
    with pytest.raises(ValueError, match="divisible"):
        read_hf_rank_state_dict(tmp_path / "hf", config, 0, 3)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("tp", [1, 2])
def test_rank_reader_equals_sharding_the_full_weights(tmp_path, tp):
    """Reading only a rank's slices gives exactly the shards cut from the full weights."""
    make_hf_model(tmp_path / "hf", groups=2, max_shard_size="50KB")
    config = read_hf_config(tmp_path / "hf")
    full = read_hf_state_dict(tmp_path / "hf")
    for rank in range(tp):
        expected = shard_full_state_dict(full, config, rank, tp)
        actual = read_hf_rank_state_dict(tmp_path / "hf", config, rank, tp)
        assert set(actual) == set(expected)
        assert all(torch.equal(actual[n], expected[n]) for n in expected)


# ----------------------------------------------------------------------------- parity, TP = 1


@pytest.mark.parametrize(
    "groups, tie", [(2, False), (4, False), (1, True)], ids=["gqa", "mha", "mqa_tied"]
)
def test_logits_match_transformers(tmp_path, single_rank, groups, tie):
    reference_model = make_hf_model(tmp_path / "hf", groups=groups, tie=tie)
    tokens = _tokens()
    with torch.no_grad():
        reference = reference_model(tokens).logits
        float64 = reference_model.double()(tokens).logits
        model = build_llama_from_hf(tmp_path / "hf").eval()
        logits = model(tokens)
    assert model.config.tie_embeddings == tie
    assert_as_accurate_as(
        {"logits": logits}, {"logits": reference}, {"logits": float64}, torch.float32
    )


def test_loss_matches_transformers(tmp_path, single_rank):
    """The training loss too (our vocab-parallel cross-entropy vs HF's shifted loss)."""
    reference_model = make_hf_model(tmp_path / "hf")
    tokens = _tokens(seq=SEQ + 1)
    with torch.no_grad():
        model = build_llama_from_hf(tmp_path / "hf")
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        logits = model.eval()(tokens[:, :-1])  # [b, s, V]
        reference_model.double()
        float64 = reference_model(tokens[:, :-1]).logits  # [b, s, V]
        exact = reference_model(tokens, labels=tokens).loss
    z = float64.reshape(-1, float64.shape[-1])
    target = tokens[:, 1:].reshape(-1, 1)
    terms = torch.logsumexp(z, dim=1).abs() + z.gather(1, target).squeeze(1).abs()
    bound = 2 * (logits.double() - float64).abs().max().item()
    bound += gamma(z.shape[1] + z.shape[0], torch.float32) * terms.mean().item()
    assert abs(loss.item() - exact.item()) <= bound, (loss.item(), exact.item(), bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_round_trip_is_bit_exact(tmp_path, single_rank, dtype, sharded):
    make_hf_model(tmp_path / "hf", dtype=dtype, max_shard_size="50KB" if sharded else None)
    model = build_llama_from_hf(tmp_path / "hf")
    assert model.config.params_dtype == dtype
    export_hf(model, tmp_path / "out", base_directory=tmp_path / "hf", max_shard_bytes=100_000)
    _assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    assert (tmp_path / "out" / "generation_config.json").is_file()  # carried over
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("num_key_value_heads", "intermediate_size", "rms_norm_eps", "dtype", "vocab_size"):
        assert written[key] == source[key], key


# ----------------------------------------------------------------------------- TP = 2


def _tp2_logits_and_export(rank, world_size, directory, out_dir, tokens, sequence_parallel):
    state.initialize_model_parallel(2)
    model = build_llama_from_hf(directory, sequence_parallel=sequence_parallel).eval()
    with torch.no_grad():
        logits = model(tokens)  # [b, s, V/2]: this rank's vocabulary shard
    export_hf(model, out_dir, base_directory=directory, max_shard_bytes=100_000)
    return logits


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_logits_match_transformers_and_round_trip(tmp_path, sequence_parallel):
    reference_model = make_hf_model(tmp_path / "hf", groups=2, max_shard_size="50KB")
    tokens = _tokens()
    with torch.no_grad():
        reference = reference_model(tokens).logits
        float64 = reference_model.double()(tokens).logits
    shards = run_distributed(
        _tp2_logits_and_export,
        2,
        tmp_path,
        tmp_path / "hf",
        tmp_path / "out",
        tokens,
        sequence_parallel,
    )
    logits = torch.cat(shards, dim=-1)
    assert_as_accurate_as(
        {"logits": logits}, {"logits": reference}, {"logits": float64}, torch.float32
    )
    _assert_same_tensors(tmp_path / "hf", tmp_path / "out")


# ----------------------------------------------------------------------------- the tool


def test_convert_tool_round_trip(tmp_path):
    from tools.convert_hf_llama import main

    make_hf_model(tmp_path / "hf", groups=2, max_shard_size="50KB", dtype=torch.bfloat16)
    main(["to-tp", str(tmp_path / "hf"), str(tmp_path / "tp"), "--tp", "2"])
    assert sorted(p.name for p in (tmp_path / "tp").glob("*.safetensors")) == [
        "model_tp00-of-02.safetensors",
        "model_tp01-of-02.safetensors",
    ]
    main(["to-hf", str(tmp_path / "tp"), str(tmp_path / "out"), "--base", str(tmp_path / "hf")])
    _assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_key_value_heads == 2
    with pytest.raises(SystemExit):
        main(["to-hf", str(tmp_path / "hf"), str(tmp_path / "bad")])  # not a to-tp directory
