"""DeepSpeed's global gradient norm of a fine-tuning run with tensor-parallel adapters.

DeepSpeed computes the norm it logs and clips with itself (ZeRO 0: ``clip_grad_norm_`` of
``deepspeed.runtime.utils``; ZeRO 1/2 and 3: their own norm code). Each adds a parameter's
squared norm on every model-parallel rank when ``is_model_parallel_parameter`` says so (the
attribute ``tensor_model_parallel`` or ``model_parallel``) and on model-parallel rank 0 only
otherwise, then sums over the model-parallel group. An adapter's sharded factor (a
column-parallel B, a row-parallel LoRA A) must therefore carry ``tensor_model_parallel``
and a replicated one (a column-parallel A, a row-parallel B: the same gradient on every TP
rank) must not; untagged, the first counted only TP rank 0's rows (the TP = 2 norm of the
LoRI run below was 0.6923 against 0.7198 at TP = 1).

Reference: the same run at TP = 1 on one process (same seeds, same first batch, DP = 1 in
both). Only the first step is compared: both start from the same weights, so the gradients
differ by reduction order alone. LoRA's B is set to a constant before the run (the same
logical B at any TP size, whatever the row order of a shard) so that A has a gradient too and
all four kinds of factor (sharded and replicated A and B) enter the norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.training.config import apply_overrides
from actcomp_dist.training.finetune import FinetuneTrainer
from actcomp_dist.training.finetune_config import finetune_config_from_dict
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import gamma

ROOT = Path(__file__).resolve().parents[2]
SEQ_LENGTH = 32
BATCH = 8
LORA_B = 0.02  # LoRA's B before the first step (|dA| ~ |B| |g| |x|)

# name -> (config, overrides); each runs at TP = 1 on one rank and TP = 2 on two (``_sp``:
# with sequence parallelism at TP = 2).
RUNS = {
    **{
        f"lora_zero{stage}": (
            "lora",
            [
                "finetune.adapter.input_compression=null",
                f"deepspeed.zero_optimization.stage={stage}",
            ],
        )
        for stage in (0, 1, 2, 3)
    },
    **{
        f"lori_zero{stage}": ("lori", [f"deepspeed.zero_optimization.stage={stage}"])
        for stage in (0, 1, 2, 3)
    },
    # Sequence parallelism at TP = 2 (the reference: the same TP = 1 run): the replicated
    # factors' gradients are all-reduced over the TP group, each rank having seen its tokens.
    "lora_zero1_sp": (
        "lora",
        ["finetune.adapter.input_compression=null", "deepspeed.zero_optimization.stage=1"],
    ),
    # Every base weight trains: Megatron's sharded weights, and the replicated norms (the
    # same gradient on both TP ranks without sequence parallelism) counted once.
    "full_zero1": (
        "full_compact",
        ['compression={"method": "none"}', "deepspeed.zero_optimization.stage=1"],
    ),
}


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    built = ensure_embedded_corpus(
        tmp_path_factory.mktemp("corpus"), vocab_size=512, max_bytes=200_000
    )
    return str(built.tokenizer_model)


class _ConstantBTrainer(FinetuneTrainer):
    """Fine-tuning with every adapter's B set to ``LORA_B`` after the adapters are built
    (before DeepSpeed partitions anything)."""

    def build_model(self, model_config):
        from actcomp_dist.adapters import iter_adapters

        model = super().build_model(model_config)
        with torch.no_grad():
            for _, _, adapter in iter_adapters(model):
                adapter.B.fill_(LORA_B)
        return model


def _run_rank(rank: int, world_size: int, raws: dict[str, dict]) -> dict:
    """Per run: the first step's logged norm, and each replicated adapter factor after the step
    (with the factors' tensor-parallel tags) to compare across TP ranks."""
    from actcomp_dist.adapters import iter_adapters

    results = {}
    for name, raw in raws.items():
        trainer_class = _ConstantBTrainer if name.startswith("lora") else FinetuneTrainer
        trainer = trainer_class(finetune_config_from_dict(raw))
        try:
            history = trainer.train().history
            factors = {}
            if "zero3" not in name:  # ZeRO 3 keeps only a partition of each on the module
                for path, _, adapter in iter_adapters(trainer.model):
                    for key, p in adapter.named_parameters(recurse=False):
                        factors[f"{path}.{key}"] = (p.tensor_model_parallel, p.detach().clone())
            results[name] = {
                "grad_norm": history[0]["grad_norm"],
                "loss": history[0]["loss"],
                "factors": factors,
                "model": trainer.model.config,
            }
        finally:
            trainer.close()
    return results


def _norm_rtol(model) -> float:
    """Relative tolerance of two float32 evaluations of the first step's gradient norm.

    Each gradient entry is a chain of products whose reductions add up to ``K`` terms: per
    block, forward and backward, qkv (h), attention scores (head dim), attention-weighted
    values (s), proj (h), fc1 (h), fc2 (f); then the output layer (h), the softmax over the
    vocabulary (V) and the weight gradient's sum over the batch's tokens (b s). Each
    evaluation is within ``gamma_K`` of the exact value relative to the entries' magnitude;
    the norm is a sum of squares (no cancellation) dominated by its largest entries, whose
    magnitude is of the order of their value, so two evaluations differ by at most
    ``2 gamma_K`` relatively. A TP-split factor counted on one rank only, or a replicated
    one counted twice, moves the norm by percents."""
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    head_dim = h // model.num_attention_heads
    per_block = h + head_dim + SEQ_LENGTH + h + h + f
    length = 2 * layers * per_block + h + model.vocab_size + BATCH * SEQ_LENGTH
    return 2 * gamma(length, torch.float32)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_global_norm_with_tp_split_adapters_matches_tp1(tmp_path, tokenizer_model):
    def raws(tp: int) -> dict[str, dict]:
        out = {}
        for name, (config, overrides) in RUNS.items():
            raw = json.loads((ROOT / "configs" / f"finetune_tiny_{config}.json").read_text())
            out[name] = apply_overrides(
                raw,
                [
                    f"run_dir={tmp_path / f'{name}_tp{tp}'}",
                    f"data.tokenizer={tokenizer_model}",
                    "data.synthetic_rows=64",
                    f"data.seq_length={SEQ_LENGTH}",
                    f"train.micro_batch_size={BATCH}",
                    f"train.global_batch_size={BATCH}",  # DP = 1 at TP = 1 and TP = 2
                    "train.steps=1",
                    "train.warmup_steps=1",
                    "train.eval_interval=0",
                    "checkpoint.interval=0",
                    "train.export_hf=false",
                    f"parallel.tensor_parallel={tp}",
                    f"parallel.sequence_parallel={str(name.endswith('_sp') and tp > 1).lower()}",
                    *overrides,
                ],
            )
        return out

    reference = run_distributed(_run_rank, 1, tmp_path, raws(1), timeout=600)[0]
    tp2 = run_distributed(_run_rank, 2, tmp_path, raws(2), timeout=600)
    for name in RUNS:
        expected = reference[name]
        rtol = _norm_rtol(expected["model"])
        for rank, result in enumerate(tp2):
            assert result[name]["loss"] == pytest.approx(expected["loss"], rel=rtol), name
            assert result[name]["grad_norm"] == pytest.approx(
                expected["grad_norm"], rel=rtol, abs=0
            ), (name, rank, result[name]["grad_norm"], expected["grad_norm"])
        # A factor counted once (untagged) must be the same on both TP ranks after the step,
        # i.e. its gradient was; a tagged one is a shard (half the TP = 1 factor's rows or
        # columns).
        ranks = [result[name]["factors"] for result in tp2]
        assert ranks[0].keys() == ranks[1].keys() == expected["factors"].keys(), name
        for key, (sharded, value) in ranks[0].items():
            full = expected["factors"][key][1]
            if sharded:
                assert ranks[1][key][0] and value.numel() * 2 == full.numel(), (name, key)
            else:
                assert not ranks[1][key][0] and value.shape == full.shape, (name, key)
                assert torch.equal(value, ranks[1][key][1]), (name, key)
        if name.startswith("lora") and "zero3" not in name:
            kinds = {(key.rsplit(".", 1)[-1], sharded) for key, (sharded, _) in ranks[0].items()}
            assert kinds == {("A", True), ("A", False), ("B", True), ("B", False)}, kinds
