"""Resume drift (issue 16, item 3): every setting an exact resume needs is compared with the
checkpoint's, and only ``checkpoint.allow_changes`` lets a deliberate change through.

The checkpoint side is the trainer state the trainer saves (``config``, ``model_config``,
``fingerprint``), built here from a config the same way; the end-to-end refusal (every rank,
exit 2, run dir unchanged) is in ``tests/integration/test_pretrain.py``'s ``BAD_INPUTS``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actcomp_dist.models import get_model_config
from actcomp_dist.training.config import ConfigError, run_config_from_dict, validate_run
from actcomp_dist.training.drift import data_fingerprint, describe, refused, resume_drift
from actcomp_dist.training.finetune_config import finetune_config_from_dict


def _data(tmp_path: Path) -> dict:
    prefix = tmp_path / "corpus"
    (tmp_path / "corpus.bin").write_bytes(bytes(range(200)))
    (tmp_path / "corpus.idx").write_bytes(b"MMIDIDX\x00\x00" + bytes(40))
    (tmp_path / "tok.model").write_bytes(b"not parsed here")
    return {"paths": [str(prefix)], "tokenizer": str(tmp_path / "tok.model"), "seq_length": 32}


def _saved(config) -> dict:
    """What the trainer writes to trainer.json, for ``config`` (vocabulary padded to 512)."""
    model = get_model_config(
        config.model.name,
        **{"seq_length": config.data.seq_length, "vocab_size": 512, **config.model.overrides},
    )
    return {
        "config": config.to_dict(),
        "model_config": model.to_dict(),
        "fingerprint": data_fingerprint(config),
    }


def _pretrain(tmp_path: Path, **sections):
    data = {**_data(tmp_path), **sections.pop("data", {})}
    return run_config_from_dict({"run_dir": str(tmp_path / "run"), "data": data, **sections})


def test_the_same_config_and_harmless_changes_are_no_drift(tmp_path):
    saved = _saved(_pretrain(tmp_path, model={"name": "tiny", "overrides": {"num_layers": 2}}))
    same_shape = get_model_config("tiny").to_dict()  # the named config spelled as overrides
    spelled_out = {
        k: same_shape[k] for k in ("hidden_size", "num_attention_heads", "ffn_hidden_size")
    }
    harmless = _pretrain(
        tmp_path,
        model={"name": "tiny", "overrides": {"num_layers": 2, **spelled_out}},
        logging={"interval": 3},
        checkpoint={"keep": 2, "interval": 5},
    )
    harmless.data.num_workers = 2
    assert resume_drift(saved, harmless) == {}
    # train.lr_scale spelled out at factor 1 is the run without it.
    ones = _pretrain(
        tmp_path,
        model={"name": "tiny", "overrides": {"num_layers": 2}},
        train={"lr_scale": {"default": 1, "qkv": 1.0}},
    )
    assert resume_drift(saved, ones) == {}


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"overrides": {"num_layers": 3}}}, {"model.num_layers": [2, 3]}),
        ({"train": {"precision": "bf16"}}, {"train.precision": ["fp32", "bf16"]}),
        ({"train": {"seed": 7}}, {"train.seed": [1234, 7]}),
        ({"data": {"split": "90,10,0"}}, {"data.split": ["98,2,0", "90,10,0"]}),
        # Per group, on the resolved factor: "default" reaches every group it covers.
        (
            {"train": {"lr_scale": {"qkv": 0.25}}},
            {"train.lr_scale.qkv": [1.0, 0.25]},
        ),
        (
            {"train": {"lr_scale": {"default": 0.5, "qkv": 1}}},
            {
                f"train.lr_scale.{group}": [1.0, 0.5]
                for group in ("proj", "fc1", "fc2", "embedding", "norm", "output")
            },
        ),
    ],
)
def test_each_exactness_setting_is_compared(tmp_path, sections, expected):
    base = {"model": {"overrides": {"num_layers": 2}}, "train": {"seed": 1234}}
    saved = _saved(_pretrain(tmp_path, **base))
    changed = {**base, **sections}
    if "model" in sections:
        changed["model"] = sections["model"]
    if "train" in sections:
        changed["train"] = {**base["train"], **sections["train"]}
    assert resume_drift(saved, _pretrain(tmp_path, **changed)) == expected


def test_changed_data_files_and_tokenizer_are_caught_by_their_fingerprint(tmp_path):
    config = _pretrain(tmp_path)
    saved = _saved(config)
    idx = tmp_path / "corpus.idx"
    idx.write_bytes(idx.read_bytes()[:-1] + b"\x01")  # another corpus at the same path
    (tmp_path / "tok.model").write_bytes(b"another tokenizer")
    drift = resume_drift(saved, config)
    key = f"fingerprint.data.{tmp_path / 'corpus'}"
    assert sorted(drift) == [key, "fingerprint.tokenizer"]
    assert drift[key][0].startswith("200:") and drift[key][1].startswith("200:")
    assert refused(drift, ["data.fingerprint"]) == {}
    assert refused(drift, ["data.tokenizer"]) == {key: drift[key]}
    line = describe(drift)
    assert "\n" not in line and f"{key}: checkpoint '200:" in line


def test_an_older_checkpoint_without_fingerprints_is_not_refused_for_them(tmp_path):
    config = _pretrain(tmp_path)
    saved = _saved(config)
    del saved["fingerprint"]
    assert resume_drift(saved, config) == {}


def _finetune(tmp_path: Path, **finetune):
    return finetune_config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"synthetic_task": "reverse_words"},
            "finetune": {"mode": "lori", **finetune},
        }
    )


@pytest.mark.parametrize(
    ("finetune", "expected"),
    [
        ({"adapter": {"seed": 2}}, {"finetune.adapter.seed": [0, 2]}),  # the probe's case
        ({"adapter": {"rank": 8}}, {"finetune.adapter.rank": [32, 8]}),
        ({"mode": "lora"}, {"finetune.mode": ["lori", "lora"]}),
        ({"adapter": {"targets": ["qkv"]}}, None),
    ],
)
def test_adapter_changes_are_compared_on_the_resolved_adapter(tmp_path, finetune, expected):
    saved = _saved(_finetune(tmp_path))
    # The defaults written out are no change.
    assert resume_drift(saved, _finetune(tmp_path, adapter={"seed": 0, "rank": 32})) == {}
    drift = resume_drift(saved, _finetune(tmp_path, **finetune))
    if expected is None:
        assert list(drift) == ["finetune.adapter.targets"]
    else:
        assert drift == expected


def test_allow_changes_accepts_only_keys_that_keep_the_saved_shapes(tmp_path):
    def _pretrain(tmp_path, **sections):  # the embedded corpus: validate_run opens no files
        return run_config_from_dict({"run_dir": str(tmp_path / "run"), **sections})

    ok = _pretrain(
        tmp_path, checkpoint={"allow_changes": ["train.seed", "data.paths", "train.steps"]}
    )
    validate_run(ok, 1)
    for key in (
        "model.num_layers",
        "compression.rank",
        "train.stepz",
        "data.seq_length",
        "train.lr_scale",  # it decides the optimizer's param groups the checkpoint holds
    ):
        config = _pretrain(tmp_path, checkpoint={"allow_changes": [key]})
        with pytest.raises(ConfigError, match=f"checkpoint.allow_changes: '{key}' cannot be"):
            validate_run(config, 1)
    with pytest.raises(ConfigError, match="must be a list of dotted config keys"):
        _pretrain(tmp_path, checkpoint={"allow_changes": "train.seed"})
    drift = {"train.seed": [1, 2], "model.num_layers": [2, 3]}
    assert refused(drift, ["train.seed"]) == {"model.num_layers": [2, 3]}
