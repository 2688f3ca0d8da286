"""From a training run to a Hugging Face directory: ``actcomp-convert-hf to-hf`` and
``train.export_hf``.

Two short runs of the tiny config on 2 gloo ranks, ZeRO-1 and ZeRO-3, each saving steps 1 and
2 and exporting at the end (``train.export_hf``). ``to-hf`` is pointed at the run directory, at
its ``checkpoints/`` folder and at one step: it must pick the newest *complete* step (a step
whose save was interrupted is skipped), and every stage's export, ``to-hf``'s and the one the
run wrote itself, must equal, bit for bit, the weights the run held when it finished (gathered
from the live model; under ZeRO-3 DeepSpeed's consolidation of the partitioned fp32 parameters
must reproduce them).

The export must work in ``transformers`` as it is: ``AutoTokenizer`` gives our tokenizer's ids
for the corpus text and decodes them back, ``config.json`` / ``generation_config.json`` carry
the run's bos / eos / pad ids, and ``generate`` (greedy) continues prompts with the same tokens,
one by one, as our own model did at the end of training
(:func:`actcomp_dist.models.generate.greedy_generate`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.training.config import apply_overrides
from tests.helpers.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Return the", "The default value of", "If the file"]
NEW_TOKENS = 8


def _train_rank(rank: int, world_size: int, raws: list[dict], prompts: list[list[int]]):
    """Train each config; return the final weights (Hugging Face names) as the run held them
    and our model's greedy continuation of each prompt (ZeRO-1 run only)."""
    import deepspeed

    from actcomp_dist.models import full_state_dict
    from actcomp_dist.models.generate import greedy_generate
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import Trainer

    finals, continuations = [], []
    for index, raw in enumerate(raws):
        trainer = Trainer(run_config_from_dict(raw))
        try:
            trainer.train()
            # Under ZeRO-3 each rank holds a partition; gather it (a no-op for stages 0-2).
            with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
                finals.append(full_state_dict(trainer.model))
            if index == 0:
                eod = trainer.tokenizer.eod
                continuations = [
                    greedy_generate(trainer.model, p, NEW_TOKENS, eos_id=eod) for p in prompts
                ]
        finally:
            trainer.close()
    return finals, continuations


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return ensure_embedded_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=512, max_bytes=60_000
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict:
    from actcomp_dist.data.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("export")
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
                    # ZeRO-1 into RUN_DIR/hf, ZeRO-3 into a path of its own.
                    "train.export_hf=true" if stage == 1 else f"train.export_hf={tmp / 'z3_hf'}",
                ],
            )
        )
    tokenizer = load_tokenizer(corpus.tokenizer_model)
    prompts = [[tokenizer.bos, *tokenizer.encode(text)] for text in PROMPTS]
    finals, continuations = run_distributed(_train_rank, 2, tmp, raws, prompts, timeout=300)[0]
    out = {
        name: (run_dir, final)
        for (name, run_dir), final in zip(run_dirs.items(), finals, strict=True)
    }
    out["exports"] = {"zero1": run_dirs["zero1"] / "hf", "zero3": tmp / "z3_hf"}
    out["generated"] = list(zip(prompts, continuations, strict=True))
    return out


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
    from safetensors.torch import load_file

    run_dir, final = runs[stage]
    exported = _to_hf(run_dir, tmp_path / stage)
    at_end = load_file(str(runs["exports"][stage] / "model.safetensors"))
    assert exported.keys() == final.keys() == at_end.keys()
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
        assert torch.equal(at_end[name], tensor), name
    # Both carry the same tokenizer and ids as files, byte for byte.
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ):
        written = (runs["exports"][stage] / name).read_bytes()
        assert (tmp_path / stage / name).read_bytes() == written, name


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_run_loads_in_transformers_and_generates(runs, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers converts tokenizer.model with it
    from actcomp_dist.data.tokenizer import load_tokenizer

    ours = load_tokenizer(corpus.tokenizer_model)
    out = runs["exports"]["zero1"]
    ids = {"bos_token_id": ours.bos, "eos_token_id": ours.eod, "pad_token_id": ours.eod}
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((out / name).read_text())
        assert {key: saved.get(key) for key in ids} == ids, name

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        ours.bos,
        ours.eod,
        ours.eod,
    )
    # The same ids as ours on every paragraph of the corpus the tokenizer was trained on, plus
    # text it never saw (byte fallback, indentation, a leading newline); and back to the text.
    paragraphs = [
        json.loads(line)["text"]
        for line in (corpus.directory / "corpus.jsonl").read_text().splitlines()
    ]
    texts = [*paragraphs, "  indented\n\tcode = {'a': 1}  # ünïcödé € 漢字", "\nleading newline"]
    for text in texts:
        encoded = tokenizer(text).input_ids
        assert encoded == ours.encode(text), text[:60]
        assert tokenizer.decode(encoded) == text

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == ours.eod
    for prompt, expected in runs["generated"]:
        generated = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # Greedy, token for token as our model continued it (both stop after EOS). The two
        # implementations' fp32 logits differ by rounding (~1e-6 here: 2 layers of width 128,
        # |logits| < 1), so the argmax is decided only where the top two logits are further apart
        # than that; measured, the smallest gap over these prompts is 7e-3. A near-tie would make
        # a mismatch meaningless, so it is checked rather than assumed.
        assert generated.sequences[0, len(prompt) :].tolist() == expected, (prompt, expected)
        gaps = [float(score[0].topk(2).values.diff().abs()) for score in generated.scores]
        assert min(gaps) > 1e-4, gaps


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


@pytest.mark.slow
@pytest.mark.distributed
def test_to_hf_refuses_a_missing_or_changed_tokenizer(runs, corpus, tmp_path, capsys):
    """A moved tokenizer, or one whose SHA-256 is not the one the checkpoint recorded: one
    line naming the checkpoint and ``--tokenizer``, exit 2; ``--tokenizer`` then works."""
    from tools.convert_hf_llama import main

    for case, edit in (
        ("missing", lambda s: s["config"]["data"].update(tokenizer=str(tmp_path / "gone.model"))),
        ("changed", lambda s: s["fingerprint"].update({"fingerprint.tokenizer": "0" * 64})),
    ):
        copy = tmp_path / case
        shutil.copytree(runs["zero1"][0], copy)
        trainer_json = copy / "checkpoints" / "step_0000002" / "trainer.json"
        state = json.loads(trainer_json.read_text())
        edit(state)
        trainer_json.write_text(json.dumps(state))
        with pytest.raises(SystemExit) as exit_info:
            main(["to-hf", str(copy), str(tmp_path / f"{case}_hf")])
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert "--tokenizer" in message and "step_0000002" in message, message
        assert (
            main(
                [
                    "to-hf",
                    str(copy),
                    str(tmp_path / f"{case}_ok"),
                    "--tokenizer",
                    str(corpus.tokenizer_model),
                ]
            )
            == 0
        )
        assert (tmp_path / f"{case}_ok" / "tokenizer.model").read_bytes() == (
            corpus.tokenizer_model.read_bytes()
        )


@pytest.mark.parametrize("with_config", [False, True])
def test_a_tokenizer_json_export_loads_in_transformers(tmp_path, with_config):
    """A Hugging Face ``tokenizer.json`` (byte-level BPE, Llama-3 names, trained here): the
    export copies it (and a ``tokenizer_config.json`` beside it, which then decides the special
    tokens) and ``AutoTokenizer`` gives our ids and text back."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from actcomp_dist.data.corpus import stdlib_docstring_documents
    from actcomp_dist.data.tokenizer import load_tokenizer
    from actcomp_dist.models.hf_tokenizer import write_tokenizer_files

    documents = [text for _, text in stdlib_docstring_documents(max_bytes=40_000)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer)
    source = tmp_path / "source"
    source.mkdir()
    tokenizer.save(str(source / "tokenizer.json"))
    if with_config:  # an instruction model's: its turns end with <|eot_id|>
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "x"}
        (source / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(source)
    out = tmp_path / "hf"
    out.mkdir()
    ids = write_tokenizer_files(out, source, model_max_length=256)
    assert ids == {
        "bos_token_id": 0,
        "eos_token_id": 2 if with_config else 1,
        "pad_token_id": ids["eos_token_id"],
    }
    assert (ours.bos, ours.eod) == (ids["bos_token_id"], ids["eos_token_id"])
    assert json.loads((out / "generation_config.json").read_text()) == ids
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        ours.bos,
        ours.eod,
        ours.eod,
    )
    if with_config:
        assert loaded.chat_template == "x"  # the original's settings are kept
    for text in [*documents[:20], "  indented\n\tcode = {'a': 1}  # ünïcödé € 漢字"]:
        encoded = loaded(text, add_special_tokens=False).input_ids
        assert encoded == ours.encode(text)
        assert loaded.decode(encoded) == text
