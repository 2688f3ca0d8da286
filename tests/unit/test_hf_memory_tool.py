"""tools/hf_memory.py: the measured saved bytes of ``lora+exact`` against ``lora`` equal the
closed form of tests/unit/test_hf_peft.py (norms whose input needs a gradient: one hidden-sized
tensor each; per MLP two intermediate-sized tensors), at the tool's own shapes, with
transformers' loss (``--loss-chunk-tokens 0``; the fused loss's bytes are tested in
tests/unit/test_hf_loss.py); runs of single seeds merged give the joint run's summary."""

from __future__ import annotations

import json

from tools.hf_memory import main


def test_tool_measures_the_closed_form_saving(tmp_path):
    layers, hidden, intermediate, rank, batch, words = 2, 32, 80, 4, 2, 7
    main(
        [
            "--steps", "2", "--warmup", "1", "--variants", "lora", "lora+exact",
            "--layers", str(layers), "--hidden", str(hidden), "--intermediate",
            str(intermediate), "--rank", str(rank), "--batch", str(batch), "--words",
            str(words), "--loss-chunk-tokens", "0", "--seeds", "0", "1", "--heldout-rows",
            "3", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert sorted(saved["seeds"]) == ["0", "1"]
    tokens = batch * (2 * words + 2)
    saving = 4 * tokens * ((2 * layers - 1) * hidden + layers * 2 * intermediate)
    assert results["lora"]["saved_bytes"] - results["lora+exact"]["saved_bytes"] == saving
    assert results["lora+exact"]["final_loss"] > 0
    assert "| lora+exact |" in (tmp_path / "results.md").read_text()
    # One process per seed, merged: the same numbers as one run of both seeds (each seed's run
    # is deterministic on one thread), timings aside.
    single = []
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        main(
            [
                "--steps", "2", "--warmup", "1", "--variants", "lora", "lora+exact",
                "--layers", str(layers), "--hidden", str(hidden), "--intermediate",
                str(intermediate), "--rank", str(rank), "--batch", str(batch), "--words",
                str(words), "--loss-chunk-tokens", "0", "--seeds", seed, "--heldout-rows", "3",
                "--out", str(out),
            ]
        )  # fmt: skip
        single.append(str(out / "results.json"))
    main(["--merge", *single, "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())["results"]
    for name, row in results.items():
        for metric in ("saved_bytes", "final_loss", "final_loss_sd", "heldout_loss", "last_loss"):
            assert merged[name][metric] == row[metric], (name, metric)


def test_tool_fine_tunes_a_pretrained_directory(tmp_path):
    """``--base``: a Hugging Face LLaMA directory with its tokenizer (here a random model and a
    SentencePiece model trained on generated text) learns ``reverse_words`` rows: labels only
    on the response; ``"loract"`` keeps less than plain LoRA."""
    import transformers

    from actcomp_dist.data.tokenizer import train_tokenizer
    from tests.helpers.documents import VOCAB_SIZE, generated_documents

    base = tmp_path / "base"
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    train_tokenizer(generated_documents(40, seed=0), base / "tokenizer", VOCAB_SIZE)
    main(
        [
            "--base", str(base), "--steps", "2", "--warmup", "1", "--batch", "2",
            "--words", "15", "--rank", "4", "--pool", "16", "--variants", "lora",
            "lora+loract", "--out", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert results["lora+loract"]["saved_bytes"] < results["lora"]["saved_bytes"]
    assert results["lora+loract"]["step_cpu_ms"] > 0


def test_tool_splits_loract_into_its_norm_and_act_fn_parts(tmp_path):
    """``lora+loract_norm`` / ``lora+loract_swiglu`` factorise one of the preset's two kinds at
    the preset's rank ``R = hidden // 8`` and keep the other as ``"exact"`` does: against
    ``lora+exact`` each saves the closed form of its part (the norms: ``N h`` kept as
    ``(N + h) R``, per layer two; the MLPs: ``2 N I`` as ``2 (N + I) R``), and the two savings
    add up to the preset's."""
    layers, hidden, intermediate, rank, batch, words = 2, 32, 80, 4, 2, 7
    main(
        [
            "--steps", "2", "--warmup", "1", "--variants", "lora", "lora+exact", "lora+loract",
            "lora+loract_norm", "lora+loract_swiglu", "--layers", str(layers), "--hidden",
            str(hidden), "--intermediate", str(intermediate), "--rank", str(rank), "--batch",
            str(batch), "--words", str(words), "--heldout-rows", "3", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    saved = {
        name: row["saved_bytes"]
        for name, row in json.loads((tmp_path / "results.json").read_text())["results"].items()
    }
    tokens, k = batch * (2 * words + 2), hidden // 8
    norms = 4 * layers * 2 * (tokens * hidden - (tokens + hidden) * k)
    mlps = 4 * layers * 2 * (tokens * intermediate - (tokens + intermediate) * k)
    assert saved["lora+exact"] - saved["lora+loract_norm"] == norms
    assert saved["lora+exact"] - saved["lora+loract_swiglu"] == mlps
    assert saved["lora+exact"] - saved["lora+loract"] == norms + mlps


def test_a_variant_draws_from_its_own_rng_stream(tmp_path):
    """LoRAct draws its columns from the global RNG in every call: each variant has its own
    stream, so ``lora+loract`` gives the same numbers whichever variants run beside it."""
    common = [
        "--steps", "3", "--warmup", "1", "--layers", "2", "--hidden", "32", "--intermediate",
        "80", "--rank", "4", "--batch", "2", "--words", "7", "--heldout-rows", "3",
    ]  # fmt: skip
    runs = []
    for variants in (["lora", "lora+loract"], ["lora", "lora+loract_norm", "lora+loract"]):
        out = tmp_path / str(len(runs))
        main([*common, "--variants", *variants, "--out", str(out)])
        runs.append(json.loads((out / "results.json").read_text())["results"]["lora+loract"])
    for metric in ("saved_bytes", "last_loss", "final_loss", "heldout_loss"):
        assert runs[0][metric] == runs[1][metric], metric
