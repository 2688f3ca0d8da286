"""Fine-tuning launcher (issue 6): config parsing, prompt/response masking, and a tiny
fine-tune per mode (full + CompAct, LoRA, LoRI) on 2 CPU ranks (forked gloo ranks, as in
``test_pretrain.py``) that lowers the response loss of a synthetic task written by the test.

The task: the prompt lists 3-5 words from a 6-word set, the response is the same words in
reverse order. A randomly initialised tiny LLaMA starts at about ln(V) per response token;
learning only which 6 words (and EOS) responses are made of already takes it far below that,
so the test asks for a large, unambiguous drop (see ``MARGIN``) of the mean response loss of
the last steps below the first step's.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.data.jsonl import JsonlError, encode_row, read_jsonl
from actcomp_dist.data.tokenizer import SentencePieceTokenizer
from actcomp_dist.models.hf import read_hf_config, read_hf_state_dict
from actcomp_dist.training.config import ConfigError, apply_overrides
from actcomp_dist.training.finetune_config import (
    finetune_config_from_dict,
    load_finetune_config,
    validate_finetune,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_weights import randomize_weights
from tests.helpers.llama_reference import reference_logits
from tests.helpers.tolerances import assert_as_accurate_as

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    mode: ROOT / "configs" / f"finetune_tiny_{mode}.json"
    for mode in ("full_compact", "lora", "lori")
}
VOCAB = 512
WORDS = ["apple", "river", "stone", "cloud", "green", "table"]
STEPS = 24
# Required drop (nats) of the response loss, mean of the last 4 steps (and the validation loss
# at the end) vs step 1 (ln 512 = 6.24). Observed on CPU: full + CompAct 6.2 -> 1.4, LoRA and
# LoRI (tiny base at random init, only the adapters train) 6.2 -> 4.5; LoRI-S (10% of B, masks
# from the LoRI run, 3x its learning rate) 6.2 -> 4.9.
MARGIN = {"full_compact": 3.0, "lora": 1.0, "lori": 1.0, "lori_s": 1.0}


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    built = ensure_embedded_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=VOCAB, max_bytes=200_000
    )
    return str(built.tokenizer_model)


def _write_task(directory: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    path = directory / f"reverse_{seed}.jsonl"
    with open(path, "w") as handle:
        for _ in range(rows):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
            row = {
                "prompt": "reverse: " + " ".join(words) + "\n",
                "response": " ".join(words[::-1]),
            }
            handle.write(json.dumps(row) + "\n")
    return path


def _raw(name: str, run_dir: Path, *overrides: str) -> dict:
    raw = json.loads(CONFIGS[name].read_text())
    return apply_overrides(raw, [f"run_dir={run_dir}", *overrides])


# ----------------------------------------------------------------------------- config


def test_the_finetune_configs_parse():
    for path in [*CONFIGS.values(), ROOT / "configs" / "finetune_llama7b_lori.json"]:
        config = load_finetune_config(path)
        assert config.finetune.mode in ("full", "lora", "lori")
        if config.finetune.mode != "full":
            assert config.finetune.adapter_config().method == config.finetune.mode
    lori = load_finetune_config(CONFIGS["lori"], ["finetune.adapter.rank=4"])
    assert lori.finetune.adapter_config().rank == 4
    assert lori.to_dict()["finetune"]["mode"] == "lori"


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("lori", ["finetune.bogus=1"], "finetune.bogus"),
        ("lori", ["finetune.mode=qlora"], "finetune.mode='qlora'"),
        ("lori", ["finetune.adapter.sparsity=0.9"], "finetune.adapter.sparsity"),
        ("lori", ["finetune.adapter.method=lora"], "finetune.adapter.method"),
        ("lori", ["finetune.adapter.rank=0"], "rank=0"),
        (
            "lori",
            ['finetune.adapter.input_compression={"method": "compact", "rank": 0.25}'],
            "input_compression",
        ),
        ("full_compact", ["finetune.adapter={}"], "finetune.adapter"),
        ("lori", ["data.bogus=1"], "data.bogus"),
        ("lori", ["data.loss_on=prompt"], "data.loss_on"),
        ("lori", ["data.prompt_template=no placeholder"], "data.prompt_template"),
        ("lori", ["data.synthetic_task=null"], "data.train"),
        ("lori", ['data.paths=["x"]', "data.tokenizer=t.model"], "data.paths"),
        ("lori", ["data.synthetic_task=sorting"], "data.synthetic_task"),
        ("lora", ['finetune.mask={"calibration_adapter": "x"}'], "finetune.mask"),
        ("lori", ['finetune.mask={"calibration_adapter": "x", "steps": 3}'], "finetune.mask.steps"),
        ("lori", ['finetune.mask={"sparsity": 0.9}'], "calibration_adapter"),
        ("lori", ['finetune.mask={"sparsity": 1.5, "calibration_adapter": "x"}'], "sparsity"),
    ],
)
def test_bad_finetune_config_names_the_key(tmp_path, name, overrides, message):
    with pytest.raises(ConfigError) as err:
        finetune_config_from_dict(_raw(name, tmp_path, *overrides))
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("lora", ["compression.method=compact"], "compression.method='compact'"),
        ("lora", ["compression.resample_every=7"], "resample_every"),
        ("lori", ["data.synthetic_task=null", 'data.train=["/nonexistent.jsonl"]'], "not found"),
        ("lori", ["model.init_from=/nonexistent"], "model.init_from"),
        ("lori", ['finetune.mask={"calibration_adapter": "/nonexistent"}'], "calibration_adapter"),
    ],
)
def test_cross_section_rules(tmp_path, name, overrides, message):
    config = finetune_config_from_dict(_raw(name, tmp_path, *overrides))
    with pytest.raises(ConfigError) as err:
        validate_finetune(config, world_size=2)
    assert message in str(err.value), str(err.value)


def test_bad_jsonl_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"question": "a"}\n')
    with pytest.raises(JsonlError, match=r"bad.jsonl:2"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(JsonlError, match=r"bad.jsonl:1.*'response'"):
        read_jsonl(path)


# ----------------------------------------------------------------------------- data


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer_model):
    tok = SentencePieceTokenizer(tokenizer_model)
    row = {"prompt": "reverse: apple river stone\n", "response": "stone river apple"}
    sample = encode_row(row, tok, 64, prompt_template="Q: {prompt}A:")
    prompt_ids = tok.encode("Q: reverse: apple river stone\nA:")
    response_ids = tok.encode("stone river apple")
    full = [tok.bos, *prompt_ids, *response_ids, tok.eod]
    n = len(full)
    assert sample["tokens"].dtype == np.int64 and sample["loss_mask"].dtype == np.float32
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (64,)
    assert sample["tokens"][: n - 1].tolist() == full[:-1]
    assert sample["labels"][: n - 1].tolist() == full[1:]
    trained = sample["labels"][sample["loss_mask"] == 1].tolist()
    assert trained == [*response_ids, tok.eod]
    assert sample["loss_mask"][n - 1 :].sum() == 0  # padding is never trained

    # loss_on=all: every real label; a text row: every real label.
    everything = encode_row(row, tok, 64, loss_on="all")
    assert everything["loss_mask"].sum() == len(tok.encode(row["prompt"])) + len(response_ids) + 1
    text = encode_row({"text": "apple river"}, tok, 64)
    assert text["loss_mask"].sum() == len(tok.encode("apple river")) + 1

    # Too long: the prompt loses tokens from the left (BOS kept), the response stays whole.
    short = encode_row(row, tok, len(response_ids) + 3)
    assert short["tokens"][0] == tok.bos
    assert short["labels"][short["loss_mask"] == 1].tolist() == [*response_ids, tok.eod]
    assert short["labels"][-1] == tok.eod
    # No room for any response token after BOS: the row is dropped.
    assert encode_row(row, tok, 1, append_eos=False) is not None  # BOS -> first response token
    assert encode_row({"prompt": "a", "response": ""}, tok, 8, append_eos=False) is None


# ----------------------------------------------------------------------------- end to end


def _finetune_rank(rank: int, world_size: int, raws: list[dict]) -> list[dict]:
    """Fine-tune each config; per run: the losses, and for adapter runs what trained."""
    from actcomp_dist.adapters import iter_adapters
    from actcomp_dist.training.finetune import FinetuneTrainer

    results = []
    for raw in raws:
        trainer = FinetuneTrainer(finetune_config_from_dict(raw))
        try:
            model = trainer.model
            adapter_ids = {id(p) for _, _, a in iter_adapters(model) for p in a.parameters()}
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            history = trainer.train().history
            after = dict(model.named_parameters())
            changed = sorted(n for n, p in after.items() if not torch.equal(p.detach(), before[n]))
            trainable = sorted(n for n, p in after.items() if p.requires_grad)
            results.append(
                {
                    "losses": [r["loss"] for r in history],
                    "val": [r["val_loss"] for r in history if "val_loss" in r],
                    "changed": changed,
                    "trainable": trainable,
                    "adapter_params": [n for n, p in after.items() if id(p) in adapter_ids],
                    "state_keys": list(model.state_dict()),
                    "a_buffers": [n for n, _, a in iter_adapters(model) if a.A is not None],
                    "masked": [
                        (
                            int(a.mask.sum()),
                            a.mask.numel(),
                            float(a.B.detach()[~a.mask].abs().sum()),
                        )
                        for _, _, a in iter_adapters(model)
                        if a.mask is not None
                    ],
                }
            )
        finally:
            trainer.close()
    return results


def test_tiny_finetune_lowers_the_response_loss_in_every_mode(tmp_path, tokenizer_model):
    train = _write_task(tmp_path, 256, seed=1)
    valid = _write_task(tmp_path, 32, seed=2)
    common = [
        "data.synthetic_task=null",
        f"data.train={json.dumps([str(train)])}",
        f"data.valid={json.dumps([str(valid)])}",
        f"data.tokenizer={tokenizer_model}",
        "data.seq_length=32",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        f"train.eval_interval={STEPS}",
        "logging.interval=4",
    ]
    raws = {
        "full_compact": _raw("full_compact", tmp_path / "full", *common),
        "lora": _raw("lora", tmp_path / "lora", *common),
        "lori": _raw("lori", tmp_path / "lori", *common),
        # LoRI-S: masks from the dense LoRI run just before (same ranks, run in order).
        "lori_s": _raw(
            "lori",
            tmp_path / "lori_s",
            *common,
            "train.lr=0.03",  # a tenth of the entries train: a higher rate, as in LoRI-S
            "train.min_lr=0.003",
            f'finetune.mask={{"sparsity": 0.9, "calibration_adapter": "{tmp_path / "lori" / "adapter"}"}}',
        ),
    }
    results = run_distributed(_finetune_rank, 2, tmp_path, list(raws.values()), timeout=400)
    ranks = [dict(zip(raws, per_rank, strict=True)) for per_rank in results]
    for name in raws:
        losses = ranks[0][name]["losses"]
        assert ranks[1][name]["losses"] == losses  # the logged loss is the DP mean
        assert len(losses) == STEPS
        assert abs(losses[0] - math.log(VOCAB)) < 0.3, (name, losses)
        assert sum(losses[-4:]) / 4 < losses[0] - MARGIN[name], (name, losses)
        val = ranks[0][name]["val"]
        assert len(val) == 1 and val[0] < losses[0] - MARGIN[name], (name, val, losses)

    full = ranks[0]["full_compact"]
    assert not full["adapter_params"]
    # Every weight trains (the subspace proxies are reset to zero after each step's merge).
    weights = [n for n in full["trainable"] if not n.endswith("subspace_proxy")]
    assert full["changed"] == weights

    for name in ("lora", "lori", "lori_s"):
        for rank in ranks:
            run = rank[name]
            # Only adapter parameters train, and all of them move.
            assert run["trainable"] == sorted(run["adapter_params"]), name
            assert run["changed"] == run["trainable"], name
        saved = load_file(str(tmp_path / name / "adapter" / "actcomp_adapter.safetensors"))
        suffixes = {key.rsplit(".", 1)[-1] for key in saved}
        expected = {"lora": {"A", "B"}, "lori": {"B"}, "lori_s": {"B_values", "mask_bits"}}
        assert suffixes == expected[name], (name, sorted(saved))
        assert all(t.abs().sum() > 0 for k, t in saved.items() if k.endswith(".B")), name

    # LoRI-S: 10% of the B entries (one global threshold, ties kept), B exactly 0 outside.
    for rank in ranks:
        masked = rank["lori_s"]["masked"]
        assert len(masked) == len(rank["lori_s"]["trainable"]) and not rank["lori"]["masked"]
        kept, total = sum(m[0] for m in masked), sum(m[1] for m in masked)
        assert 0.1 <= kept / total < 0.11, (kept, total)
        assert all(outside == 0.0 for _, _, outside in masked)

    lori = ranks[0]["lori"]
    assert all(n.endswith(".B") for n in lori["trainable"]), lori["trainable"]
    assert len(lori["a_buffers"]) == len(lori["trainable"])  # A cached on the module...
    assert not [k for k in lori["state_keys"] if k.endswith(".A")]  # ...never in a state dict
    lora = ranks[0]["lora"]
    assert {n.rsplit(".", 1)[-1] for n in lora["trainable"]} == {"A", "B"}


# ----------------------------------------------------------------------------- launcher


def _launch(tmp_path: Path, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "launch" / "finetune.py"), "--config", str(config)]
    for override in overrides:
        command += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_launcher_runs_the_tiny_lori_config_on_its_synthetic_task(tmp_path, tokenizer_model):
    run_dir = tmp_path / "run"
    done = _launch(
        tmp_path,
        CONFIGS["lori"],
        f"run_dir={run_dir}",
        f"data.tokenizer={tokenizer_model}",
        "data.synthetic_rows=64",
        "train.steps=3",
        "train.eval_interval=3",
        "logging.interval=1",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "val_loss" in records[-1]
    assert (run_dir / "adapter" / "actcomp_adapter.json").is_file()
    assert (run_dir / "checkpoints").is_dir()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["finetune"]["mode"] == "lori"

    bad = _launch(tmp_path, CONFIGS["lori"], f"run_dir={run_dir}", "finetune.adapter.rnak=4")
    assert bad.returncode == 2
    assert "finetune.adapter.rnak" in bad.stderr


# ----------------------------------------------------------------------------- resume


def _history_rank(rank: int, world_size: int, raws: list[dict]) -> list[list[dict]]:
    from actcomp_dist.training.finetune import run_finetuning

    return [run_finetuning(finetune_config_from_dict(raw)).history for raw in raws]


def test_resumed_lori_and_lori_s_runs_repeat_the_uninterrupted_ones_exactly(
    tmp_path, tokenizer_model
):
    train = _write_task(tmp_path, 64, seed=1)
    common = [
        "data.synthetic_task=null",
        f"data.train={json.dumps([str(train)])}",
        f"data.tokenizer={tokenizer_model}",
        "data.seq_length=32",
        "train.steps=6",
        "train.eval_interval=0",
        "checkpoint.interval=3",
    ]
    calibration = tmp_path / "lori" / "adapter"
    masked = f'finetune.mask={{"sparsity": 0.9, "calibration_adapter": "{calibration}"}}'
    step3 = "checkpoints/step_0000003"
    raws = [
        _raw("lori", tmp_path / "lori", *common),
        _raw(
            "lori", tmp_path / "lori_resumed", *common, f"checkpoint.resume={tmp_path}/lori/{step3}"
        ),
        _raw("lori", tmp_path / "lori_s", *common, masked),
        _raw(
            "lori",
            tmp_path / "lori_s_resumed",
            *common,
            masked,
            f"checkpoint.resume={tmp_path}/lori_s/{step3}",
        ),
    ]
    histories = run_distributed(_history_rank, 2, tmp_path, raws, timeout=300)[0]
    keys = ("step", "loss", "lr", "grad_norm")
    for uninterrupted, again, name in (
        (histories[0], histories[1], "lori"),
        (histories[2], histories[3], "lori_s"),
    ):
        assert [{k: r[k] for k in keys} for r in again] == [
            {k: r[k] for k in keys} for r in uninterrupted[3:]
        ], name
        a = load_file(str(tmp_path / name / "adapter" / "actcomp_adapter.safetensors"))
        b = load_file(str(tmp_path / f"{name}_resumed" / "adapter" / "actcomp_adapter.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ----------------------------------------------------------------------------- HF init


def _hf_rank(rank: int, world_size: int, raw: dict, tokens: torch.Tensor):
    from actcomp_dist.training.finetune import FinetuneTrainer

    trainer = FinetuneTrainer(finetune_config_from_dict(raw))
    try:
        model = trainer.model
        model.eval()
        with torch.no_grad():
            logits = model(tokens)  # B = 0: the adapted model is the base model
        model.train()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        history = trainer.train().history
        unchanged = all(
            torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen
        )
        return logits, [r["loss"] for r in history], unchanged, len(frozen)
    finally:
        trainer.close()


def test_lori_from_a_hugging_face_checkpoint(tmp_path, tokenizer_model):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    # Weights at std 1/sqrt(fan-in) and norms away from 1 (tests/helpers/hf_weights.py), so the logits
    # are far from uniform and a wrongly loaded weight cannot go unnoticed.
    randomize_weights(hf_model, 0)
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(tokens).logits

    train = _write_task(tmp_path, 128, seed=1)
    raw = _raw(
        "lori",
        tmp_path / "run",
        "model.name=tiny",
        f"model.init_from={hf_dir}",
        "data.synthetic_task=null",
        f"data.train={json.dumps([str(train)])}",
        f"data.tokenizer={tokenizer_model}",
        "data.seq_length=32",
        "train.steps=20",
        "train.eval_interval=0",
    )
    results = run_distributed(_hf_rank, 2, tmp_path, raw, tokens, timeout=300)
    # Two fp32 evaluations of one model: ours as accurate as transformers' against the float64
    # forward of the checkpoint's weights (tests/helpers/tolerances.py).
    exact = reference_logits(
        {name: w.double() for name, w in read_hf_state_dict(hf_dir).items()},
        read_hf_config(hf_dir),
        tokens,
    )
    for logits, losses, unchanged, frozen in results:
        assert_as_accurate_as(
            {"logits": logits}, {"logits": expected}, {"logits": exact}, torch.float32
        )
        assert unchanged and frozen > 0
        assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
