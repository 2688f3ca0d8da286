"""tools/ablate.py: the variant grammar, and the ablation end to end on the tiny config.

References: the variant grammar's documented spellings; for the end-to-end run, the numbers
in its table against direct measurement — ``saved_activation_bytes`` of the same model (tiny,
the run's resolved config) built here, the analytic model, and the run's own metrics.jsonl.
Everything runs through ``python tools/ablate.py`` in a subprocess, as users run it (the
ablation initialises torch.distributed and sets RANK/WORLD_SIZE in its process).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actcomp_dist import CompressionConfig
from actcomp_dist.ablation import Variant, VariantError, parse_variant, parse_variants
from actcomp_dist.ablation.measure import masked_mean_loss
from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.memory import saved_activation_bytes
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_compact.json"
ISSUE_VARIANTS = (
    "none,ac_selective,ac_full,compact:0.5,compact:0.25,compact:0.125,compact:0.25+ac_full,"
    "lowrank:0.125,subtoken:32"
)


# -- the grammar -------------------------------------------------------------------------------


def test_issue_variants_parse_to_their_settings():
    variants = parse_variants(ISSUE_VARIANTS)
    assert [v.name for v in variants] == ISSUE_VARIANTS.split(",")
    assert variants[0] == Variant("none", None, "none")
    assert variants[1] == Variant("none", None, "selective")
    assert variants[2] == Variant("none", None, "full")
    assert variants[4] == Variant("compact", 0.25, "none")
    assert variants[6] == Variant("compact", 0.25, "full")
    assert variants[7] == Variant("lowrank", 0.125, "none")
    assert variants[8] == Variant("subtoken", 32, "none")


def test_variant_spellings():
    assert parse_variant(" compact:64 ").argument == 64  # an int: absolute rank
    assert isinstance(parse_variant("compact:1.0").argument, float)  # a ratio
    assert parse_variant("lowrank:0.25+ac_selective") == Variant("lowrank", 0.25, "selective")
    assert parse_variant("none+ac_full") == parse_variant("ac_full")
    assert parse_variant("compact:0.25+ac_full").slug == "compact-0.25+ac_full"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("compact", "compact:ARG"),
        ("compact:abc", "not a number"),
        ("compact:1.5", "(0, 1]"),
        ("compact:0", ">= 1"),
        ("quantize:0.5", "unknown compression method 'quantize'"),
        ("subtoken:0.5", "sub-token groups"),
        ("none+ac_fast", "'ac_fast' is not a checkpointing mode"),
        ("ac_full+ac_selective", "two checkpointing modes"),
        ("compact:0.25+ac_full+ac_full", "at most one"),
        ("", "empty variant"),
    ],
)
def test_bad_variant_strings_say_what_is_wrong(text, expected):
    with pytest.raises(VariantError) as info:
        parse_variant(text)
    assert expected in str(info.value)
    if text:
        assert repr(text) in str(info.value)  # the message quotes the variant


def test_duplicate_variants_are_refused():
    with pytest.raises(VariantError, match="more than once"):
        parse_variants("none,compact:0.25,compact:.25")


def test_variant_changes_only_method_rank_and_checkpointing():
    raw = json.loads(TINY.read_text())
    raw["compression"]["grad_mode"] = "subspace"
    out = parse_variant("lowrank:0.125+ac_selective").apply(raw)
    assert out["compression"]["method"] == "lowrank"
    assert out["compression"]["rank"] == 0.125
    assert out["compression"]["grad_mode"] == "lift"  # subspace exists for compact only
    assert out["activation_checkpointing"]["mode"] == "selective"
    assert out["compression"]["seed"] == raw["compression"]["seed"]
    assert out["train"] == raw["train"] and out["model"] == raw["model"]
    kept = parse_variant("compact:0.5").apply(raw)["compression"]
    assert kept["grad_mode"] == "subspace" and kept["rank"] == 0.5
    assert raw["compression"]["method"] == "compact" and raw["compression"]["rank"] == 0.25


# -- the command line --------------------------------------------------------------------------


def _ablate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "ablate.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**_clean_env(), "OMP_NUM_THREADS": "1"},
    )


def _clean_env() -> dict[str, str]:
    import os

    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in launcher}


def test_bad_variant_fails_before_training(tmp_path):
    out = tmp_path / "out"
    result = _ablate(
        "--config", str(TINY), "--variants", "none,compact:2x", "--steps", "2", "--out", str(out)
    )
    assert result.returncode == 2
    assert "compact:2x" in result.stderr and "rank" in result.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_offload_variant_is_refused_without_cuda_before_training(tmp_path):
    out = tmp_path / "out"
    result = _ablate(
        "--config", str(TINY), "--variants", "none,offload", "--steps", "2", "--out", str(out)
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: variant(s) ['offload'] keep activations in pinned host memory (memory.policy "
        "'offload'): they need a CUDA device; tools/memory_plan.py predicts them anywhere"
    )
    assert not out.exists()


def test_subtoken_groups_must_divide_the_widths(tmp_path, corpus):
    result = _ablate(
        "--config", str(TINY), "--variants", "subtoken:7", "--steps", "2",
        "--out", str(tmp_path / "out"), *corpus,
    )  # fmt: skip
    assert result.returncode == 2
    assert "CompressionConfig.groups=7 must divide the input width" in result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """A small embedded corpus (vocabulary 512): ``--set`` overrides pointing at it."""
    built = ensure_embedded_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=512, max_bytes=200_000
    )
    return [
        "--set",
        f"data.paths={json.dumps([built.data_prefix])}",
        "--set",
        f"data.tokenizer={built.tokenizer_model}",
    ]


E2E_VARIANTS = ["none", "compact:0.25", "compact:0.25+ac_full"]
E2E_STEPS = 4


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ablation")
    result = _ablate(
        "--config", str(TINY), "--variants", ",".join(E2E_VARIANTS),
        "--steps", str(E2E_STEPS), "--repeats", "2", "--out", str(out),
        "--set", "data.seq_length=32", *corpus,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv") as handle:
        return {row["variant"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_ablation_writes_every_output(ablation):
    out, stdout = ablation
    for name in ("results.csv", "results.md", "records.json"):
        assert (out / name).stat().st_size > 0
    for name in ("memory_vs_step_time.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert list(rows) == E2E_VARIANTS
    required = ("saved_activation_bytes", "peak_bytes", "step_time_s", "step_cpu_s", "tokens_per_s")
    for row in rows.values():
        for column in (*required, "final_loss", "val_loss"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, column
        assert row["repeats"] == "2"
        assert float(row["step_time_ratio_min"]) <= float(row["step_time_ratio"])
        assert float(row["step_time_ratio"]) <= float(row["step_time_ratio_max"])
        assert float(row["step_cpu_ratio_min"]) <= float(row["step_cpu_ratio"])
        assert float(row["step_cpu_ratio"]) <= float(row["step_cpu_ratio_max"])
        assert float(row["loss_spread"]) == 0.0  # CPU training is deterministic
    assert float(rows["none"]["saved_ratio"]) == 1.0
    markdown = (out / "results.md").read_text()
    assert "x none" in markdown and "Repeats: 2" in markdown
    assert "memory_vs_step_time.png" in markdown and "python tools/ablate.py" in markdown
    assert "[1/6] repeat 1/2: none" in stdout  # progress output
    records = json.loads((out / "records.json").read_text())
    assert [r["variant"] for r in records] == E2E_VARIANTS + E2E_VARIANTS[::-1]
    for record in records:
        assert len(record["step_times"]) == E2E_STEPS and record["step_cpu_s"] > 0
        assert len(record["load_average"]) == 2 and min(record["load_average"]) >= 0
    assert "1-minute load average" in markdown


@pytest.mark.slow
def test_ablation_bytes_equal_direct_measurement(single_rank, ablation):
    """The compact run's saved bytes are those of the same model measured here, directly."""
    out, _ = ablation
    rows = _rows(out)
    for variant in E2E_VARIANTS:
        slug = parse_variant(variant).slug
        resolved = json.loads((out / "runs" / slug / "repeat0" / "config.json").read_text())
        train, data = resolved["train"], resolved["data"]
        b, s = train["micro_batch_size"], data["seq_length"]
        config = get_model_config(resolved["model"]["name"], seq_length=s, vocab_size=512)
        compression = CompressionConfig.from_dict(resolved["compression"])
        model = build_llama(
            config,
            compression,
            init_seed=train["seed"],
            efficient_ops=resolved["memory"]["efficient_ops"],
            loss_chunk_tokens=(
                resolved["memory"]["loss_chunk_tokens"]
                if resolved["memory"]["efficient_ops"]
                else None
            ),
        )
        apply_activation_checkpointing(model, resolved["activation_checkpointing"]["mode"], None)
        tokens = torch.randint(0, config.vocab_size, (b, s))
        mask = torch.ones(b, s)
        direct = saved_activation_bytes(
            lambda m=model, t=tokens, k=mask: masked_mean_loss(m(t, t, k), k)
        )
        row = rows[variant]
        assert int(row["saved_activation_bytes"]) == direct, variant
        assert int(row["predicted_saved_activation_bytes"]) == direct, variant
        metrics = [
            json.loads(line)
            for line in (out / "runs" / slug / "repeat0" / "metrics.jsonl").read_text().splitlines()
        ]
        assert {m["saved_activation_bytes"] for m in metrics} == {direct}
        # results.csv writes 6 significant digits ("%.6g"): off by at most half a unit of
        # the 6th, 5e-6 of the value (whose leading digit is >= 1).
        assert float(row["final_loss"]) == pytest.approx(metrics[-1]["loss"], rel=5e-6, abs=0)
        assert float(row["val_loss"]) == pytest.approx(metrics[-1]["val_loss"], rel=5e-6, abs=0)
    # The memory-efficient block's uncompressed sites keep tensors that other ops keep anyway
    # (the norm outputs, [gate | up]), so compression adds exactly its Z per site: qkv and fc1
    # (h -> h/4), fc2 (f -> f/4), 4-byte floats (tests/distributed/test_efficient_ops.py has the details).
    resolved = json.loads((out / "runs" / "none" / "repeat0" / "config.json").read_text())
    b, s = resolved["train"]["micro_batch_size"], resolved["data"]["seq_length"]
    config = get_model_config(resolved["model"]["name"])
    z_bytes = b * s * (2 * (config.hidden_size // 4) + config.ffn_hidden_size // 4) * 4
    assert (
        int(rows["compact:0.25"]["saved_activation_bytes"])
        - int(rows["none"]["saved_activation_bytes"])
        == config.num_layers * z_bytes
    )
    # Full checkpointing keeps only block inputs: compression inside it changes no saved bytes.
    assert int(rows["compact:0.25+ac_full"]["saved_activation_bytes"]) < int(
        rows["compact:0.25"]["saved_activation_bytes"]
    )


@pytest.mark.slow
def test_ablation_on_two_ranks_with_tensor_parallelism(tmp_path, corpus):
    """--nproc 2 through the deepspeed launcher, TP = 2: the per-rank bytes are measured on
    each rank's shard and equal the analytic model's prediction for that layout."""
    out = tmp_path / "out"
    result = _ablate(
        "--config", str(TINY), "--variants", "compact:0.25", "--steps", "2", "--nproc", "2",
        "--out", str(out), "--set", "data.seq_length=32", "--set", "parallel.tensor_parallel=2",
        *corpus,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = _rows(out)["compact:0.25"]
    assert int(row["saved_activation_bytes"]) == int(row["predicted_saved_activation_bytes"])
    record = json.loads((out / "records.json").read_text())[0]
    assert record["world_size"] == 2 and record["nproc"] == 2


def test_naive_variant_combines_with_the_others():
    assert parse_variant("naive") == Variant("none", None, "none", False)
    assert parse_variant("naive").name == "naive"
    assert parse_variant("none+naive") == parse_variant("naive")
    assert parse_variant("naive+ac_full") == Variant("none", None, "full", False)
    assert parse_variant("naive+ac_full").name == "ac_full+naive"
    compact = parse_variant("compact:0.25+ac_selective+naive")
    assert compact == Variant("compact", 0.25, "selective", False)
    assert parse_variant(compact.name) == compact
    assert compact.apply({})["memory"] == {"efficient_ops": False}
    assert parse_variant("compact:0.25").apply({"memory": {"efficient_ops": False}})["memory"] == {
        "efficient_ops": True
    }
    assert parse_variants("none,naive")[1].slug == "naive"
    with pytest.raises(VariantError, match="twice"):
        parse_variant("naive+naive")
