"""The run config and the other pure parts of the pretraining system (no process group).

References: closed forms (the LR schedule), the values written in the test, and the messages a
user must see (each names the offending key and what would be valid).
"""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch

from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training.config import (
    ConfigError,
    RunConfig,
    TrainSection,
    apply_overrides,
    gradient_accumulation_steps,
    load_run_config,
    parse_override,
    run_config_from_dict,
    validate_model,
    validate_run,
)
from actcomp_dist.training.engine import deepspeed_config
from actcomp_dist.training.schedule import learning_rate
from actcomp_dist.training.signals import PreemptionHandler

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_compact.json"


def _tiny(*overrides: str) -> RunConfig:
    return load_run_config(TINY, list(overrides))


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("train.lr=3e-4", ["train", "lr"], 3e-4),
        ("train.steps=20", ["train", "steps"], 20),
        ("parallel.sequence_parallel=true", ["parallel", "sequence_parallel"], True),
        ("checkpoint.resume=latest", ["checkpoint", "resume"], "latest"),  # not JSON: a string
        ("checkpoint.resume=null", ["checkpoint", "resume"], None),
        ('data.paths=["a", "b"]', ["data", "paths"], ["a", "b"]),
        ("run_dir=runs/x=1", ["run_dir"], "runs/x=1"),  # only the first '=' splits
    ],
)
def test_override_values_are_json_when_they_parse_else_strings(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize(
    "text, message",
    [("train.lr", "expected key.path=value"), ("train..lr=1", "empty key component")],
)
def test_malformed_override_is_refused(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_override(text)


def test_overrides_nest_and_do_not_touch_the_input():
    raw = {"train": {"lr": 1.0}}
    out = apply_overrides(raw, ["train.steps=3", "deepspeed.zero_optimization.stage=2"])
    assert out == {
        "train": {"lr": 1.0, "steps": 3},
        "deepspeed": {"zero_optimization": {"stage": 2}},
    }
    assert raw == {"train": {"lr": 1.0}}
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        apply_overrides(raw, ["train.lr.x=1"])


def test_tiny_configs_load_and_set_overrides_win():
    config = _tiny("train.steps=7", "compression.rank=0.5", "model.num_layers=1")
    assert config.train.steps == 7 and config.compression.rank == 0.5
    assert config.model.overrides == {"num_layers": 1}
    assert config.compression.method == "compact"
    assert load_run_config(ROOT / "configs" / "tiny_baseline.json").compression.method == "none"


def test_resolved_config_round_trips_through_json():
    config = _tiny("train.steps=7", "checkpoint.interval=3")
    again = run_config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trian.steps=3"], "unknown key(s) ['trian']; valid keys: ['activation_checkpointing'"),
        (["train.stepz=3"], "unknown key(s) ['train.stepz']; valid keys in 'train': ["),
        (["parallel.tp=2"], "unknown key(s) ['parallel.tp']; valid keys in 'parallel'"),
        (["compression.rnak=0.5"], "compression: unknown compression field(s) ['rnak']"),
        (["compression.method=zip"], "CompressionConfig.method='zip' is not a registered"),
        (
            ['compression.sites=["v_proj","fc2"]'],
            "compression.sites has unknown site(s) ['v_proj']; the model's sites are ['qkv',",
        ),
        (["compression.oversampling=-1"], "CompressionConfig.oversampling=-1 must be an int >= 0"),
        (["compression.velora_scale=0"], "CompressionConfig.velora_scale=0 must be a finite"),
        (["train.steps=0"], "train.steps=0 must be an int >= 1"),
        (["train.steps=2.5"], "train.steps=2.5 must be an int >= 1"),
        (["train.lr=-1"], "train.lr=-1 must be a number >= 0"),
        (["train.min_lr=1.0"], "train.min_lr=1.0 exceeds train.lr=0.003"),
        (["train.lr=Infinity"], "train.lr=inf must be finite"),
        (["train.lr=NaN"], "train.lr=nan must be a number >= 0"),
        (["train.lr=1e6"], "train.lr=1000000.0 is above 1.0"),
        (["train.min_lr=-Infinity"], "train.min_lr=-inf must be a number >= 0"),
        (["train.clip_grad=Infinity"], "train.clip_grad=inf must be finite"),
        (["train.weight_decay=1000"], "train.lr * train.weight_decay = 0.003 * 1000 must be < 1"),
        (
            ["train.on_nonfinite=ignore"],
            "train.on_nonfinite='ignore' is not one of ['stop', 'skip']",
        ),
        (["train.max_skipped_steps=0"], "train.max_skipped_steps=0 must be an int >= 1"),
        (["train.collective_timeout_s=0.5"], "train.collective_timeout_s=0.5 must be >= 1"),
        (["train.collective_timeout_s=Infinity"], "train.collective_timeout_s=inf must be finite"),
        (["train.precision=fp8"], "train.precision='fp8' is not one of ['fp32', 'bf16', 'fp16']"),
        (["train.lr_decay=step"], "train.lr_decay='step' is not one of"),
        (["train.betas=[0.9]"], "train.betas=[0.9] must be two numbers in [0, 1)"),
        (
            ["train.lr_scale.qkvv=0.5"],
            "unknown key(s) ['train.lr_scale.qkvv']; valid keys in 'train.lr_scale': "
            "['default', 'qkv', 'proj', 'fc1', 'fc2', 'embedding', 'norm', 'output']",
        ),
        (["train.lr_scale.norm=0"], "train.lr_scale.norm=0 must be a finite number > 0"),
        (["train.lr_scale.fc1=true"], "train.lr_scale.fc1=True must be a finite number > 0"),
        (["train.lr_scale=0.5"], "train.lr_scale=0.5 must be a map {group: factor}"),
        (
            ["train.lr_scale.output=1000"],
            "train.lr * train.lr_scale.output = 0.003 * 1000 is above 1.0",
        ),
        (
            ["compression.grad_mode=subspace", "train.lr_scale.fc1=0.25"],
            "['train.lr_scale.fc1'] name(s) compressed site(s) of compression.grad_mode="
            "'subspace', whose weights are stepped at train.lr x train.subspace_scale",
        ),
        (["activation_checkpointing.mode=some"], "activation_checkpointing.mode='some'"),
        (["activation_checkpointing.num_layers=-1"], "num_layers=-1 must be an int >= 0"),
        (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor"),
        (["parallel.sequence_parallel=1"], "parallel.sequence_parallel=1 must be true or false"),
        (["data.split=90,10"], "data.split='90,10' must be three non-negative weights"),
        (['data.paths=["x"]'], "data.paths is set but data.tokenizer"),
        (["logging.interval=0"], "logging.interval=0 must be an int >= 1"),
        (["memory.policy.swiglu=int4"], "memory.policy.swiglu='int4' is not a policy"),
        (["memory.policy.qkv=fp8"], "memory.policy.qkv='fp8' is not implemented yet"),
        (
            ["memory.policy.block_input=fp8"],
            "memory.policy.block_input='fp8' packs the block input that full checkpointing "
            "keeps; it needs activation_checkpointing.mode='full' (got 'none')",
        ),
        (["run_dir="], "run_dir must be a non-empty path string"),
        (["train=3"], "section 'train' must be an object"),
        (["checkpoint.resume=5"], "checkpoint.resume=5 must be null, 'latest' or the path"),
        (
            ['checkpoint.allow_changes="train.seed"'],
            "checkpoint.allow_changes='train.seed' must be a list of dotted config keys",
        ),
    ],
)
def test_bad_config_names_the_key_the_value_and_the_file(overrides, message):
    with pytest.raises(ConfigError) as error:
        _tiny(*overrides)
    text = str(error.value)
    assert message in text
    assert text.startswith(str(TINY))  # the file the value came from


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_run_config(tmp_path / "bad.json")


# -- rules that need the world size ------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (
            ["parallel.tensor_parallel=3"],
            2,
            "parallel.tensor_parallel=3 does not divide the world size 2",
        ),
        (["train.global_batch_size=6"], 2, "train.global_batch_size=6 must be a multiple of"),
        (
            ["compression.grad_mode=subspace", "deepspeed.zero_optimization.stage=3"],
            2,
            "compression.grad_mode='subspace' is not supported with ZeRO stage 3",
        ),
        (
            [
                "parallel.tensor_parallel=2",
                "parallel.sequence_parallel=true",
                "data.seq_length=127",
            ],
            2,
            "data.seq_length=127 must be divisible by parallel.tensor_parallel=2",
        ),
        (
            [
                "compression.grad_mode=subspace",
                "train.precision=bf16",
                "deepspeed.zero_optimization.stage=0",
            ],
            2,
            "compression.grad_mode='subspace' with train.precision='bf16' needs ZeRO stage 1 or 2",
        ),
        (
            [
                "compression.method=compact",
                "parallel.tensor_parallel=2",
                "compression.row_parallel_projection=block",
                "compression.row_parallel_blocks=3",
            ],
            2,
            "parallel.tensor_parallel=2: compression.row_parallel_projection='block' needs the "
            "tensor-parallel size 2 to divide compression.row_parallel_blocks=3",
        ),
        (["checkpoint.resume=/no/such/ckpt"], 1, "checkpoint.resume='/no/such/ckpt': no such"),
        pytest.param(
            ["train.precision=fp16"],
            1,
            "train.precision='fp16' needs a CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU"),
        ),
        (
            ['data.paths=["/no/such/data"]', "data.tokenizer=x.model"],
            1,
            "/no/such/data.bin not found",
        ),
    ],
)
def test_world_size_rules_fail_before_any_collective(overrides, world_size, message):
    with pytest.raises(ConfigError) as error:
        validate_run(_tiny(*overrides), world_size)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.nmae=tiny"], "unknown key(s) ['model.nmae']; valid keys in 'model'"),
        (["model.name=huge"], "model: unknown model config 'huge'; available:"),
        (["model.num_attention_heads=3"], "model: LlamaConfig.hidden_size=128 must be"),
        (
            ["parallel.tensor_parallel=2", "model.num_query_groups=1"],
            "LlamaConfig.num_query_groups=1 is not divisible by the tensor-parallel size 2",
        ),
        # Compression that the layer builders would reject (tiny: hidden 128, ffn 352).
        (
            ["compression.rank=200"],
            "compression does not fit site 'qkv' (input width 128): CompressionConfig.rank=200 "
            "exceeds the layer input width 128",
        ),
        (
            ["compression.method=subtoken", "compression.groups=3"],
            "compression does not fit site 'qkv' (input width 128): CompressionConfig.groups=3 "
            "must divide the input width 128",
        ),
        (
            [
                "compression.method=compact",
                'compression.sites=["fc2"]',
                "compression.rank=2",
                "parallel.tensor_parallel=2",
                "compression.row_parallel_projection=block",
                "compression.row_parallel_blocks=4",
            ],
            "compression does not fit site 'fc2' (input width 352, TP rank 0/2): compact rank 2",
        ),
    ],
)
def test_bad_model_config_fails_before_any_collective(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate_model(_tiny(*overrides))
    assert message in str(error.value)
    validate_model(_tiny("model.num_layers=1", "parallel.tensor_parallel=2"))


def test_valid_layouts_pass_and_give_the_accumulation_steps():
    for overrides, world_size, accumulation in [
        ([], 1, 2),  # global 8 = micro 4 x dp 1 x 2
        ([], 2, 1),
        (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], 2, 2),
        (["train.global_batch_size=32"], 4, 2),
        # The dense row-parallel projection serves any TP size; K=3 blocks are then unused.
        (["parallel.tensor_parallel=2", "compression.row_parallel_blocks=3"], 2, 2),
    ]:
        config = _tiny(*overrides)
        validate_run(config, world_size)
        assert gradient_accumulation_steps(config, world_size) == accumulation


# -- DeepSpeed config derived from train.* ------------------------------------------------------


def test_deepspeed_section_is_completed_from_train():
    config = _tiny("train.precision=bf16", "deepspeed.zero_optimization.stage=2")
    ds = deepspeed_config(config, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"] == {"stage": 2}  # passed through untouched
    assert config.deepspeed == {"zero_optimization": {"stage": 2}}  # not modified in place


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["deepspeed.train_batch_size=16"],
            "deepspeed.train_batch_size=16 contradicts the value 8",
        ),
        (["deepspeed.gradient_clipping=0.5"], "deepspeed.gradient_clipping=0.5 contradicts"),
        (['deepspeed.optimizer={"type": "Adam"}'], "deepspeed.optimizer is not used"),
        (['deepspeed.scheduler={"type": "WarmupLR"}'], "deepspeed.scheduler is not used"),
        (['deepspeed.fp16={"enabled": true}'], "deepspeed.fp16.enabled=True contradicts"),
        # The non-finite guard needs DeepSpeed's skip of steps with a non-finite norm.
        (
            ["deepspeed.bf16.check_grad_overflow=false"],
            "deepspeed.bf16.check_grad_overflow=False would let DeepSpeed apply",
        ),
        (
            ["deepspeed.zero_optimization.compute_grad_norm=false"],
            "deepspeed.zero_optimization.compute_grad_norm=False would let",
        ),
    ],
)
def test_deepspeed_section_contradicting_train_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        deepspeed_config(_tiny(*overrides), world_size=2)


def test_auto_takes_the_value_derived_from_train():
    """DeepSpeed config files shared with Hugging Face's trainer say "auto" for the keys the
    trainer derives: the same section as leaving them out."""
    auto = _tiny(
        "train.precision=bf16",
        'deepspeed={"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", '
        '"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", '
        '"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, '
        '"zero_optimization": {"stage": 2}}',
    )
    plain = _tiny("train.precision=bf16", "deepspeed.zero_optimization.stage=2")
    assert deepspeed_config(auto, world_size=2) == deepspeed_config(plain, world_size=2)
    with pytest.raises(
        ConfigError,
        match=re.escape("deepspeed.zero_optimization.reduce_bucket_size='auto' cannot be derived"),
    ):
        deepspeed_config(_tiny("deepspeed.zero_optimization.reduce_bucket_size=auto"), 2)


def test_deepspeed_config_file_is_the_deepspeed_section(tmp_path):
    """``--deepspeed_config FILE``: the file's keys join the run config's deepspeed section;
    a key both set differently is refused naming both; ``--set`` wins over either."""
    # tiny_compact.json's own deepspeed section: {"zero_optimization": {"stage": 1}}.
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 1, "overlap_comm": False}, "train_batch_size": "auto"}
        )
    )
    config = load_run_config(TINY, [], deepspeed_file=ds_file)
    assert config.deepspeed["zero_optimization"] == {"stage": 1, "overlap_comm": False}
    assert deepspeed_config(config, world_size=2)["train_batch_size"] == 8
    config = load_run_config(TINY, ["deepspeed.zero_optimization.stage=3"], deepspeed_file=ds_file)
    assert config.deepspeed["zero_optimization"]["stage"] == 3
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(
        ConfigError, match=re.escape(f"deepspeed.zero_optimization.stage is 2 in {ds_file} but 1")
    ):
        load_run_config(TINY, [], deepspeed_file=ds_file)
    # The command line as DeepSpeed's own flags write it.
    from actcomp_dist.training.cli import parse_args

    args = parse_args(["--config", str(TINY), "--deepspeed", "--deepspeed_config", str(ds_file)])
    assert args.deepspeed_config == str(ds_file)
    with pytest.raises(ConfigError, match="--deepspeed_config .*missing.json: file not found"):
        load_run_config(TINY, [], deepspeed_file=tmp_path / "missing.json")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["deepspeed.zero_optimization.stagee=1"],
            "deepspeed: 1 validation error for DeepSpeedZeroConfig stagee Extra inputs are not "
            "permitted",
        ),
        (["deepspeed.bf16=true"], "deepspeed.bf16=True must be an object"),
    ],
)
def test_a_bad_deepspeed_section_fails_with_the_config(overrides, message):
    """DeepSpeed's own parser reads the completed section in validate_run (before any file is
    written), one line naming the section."""
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        validate_run(_tiny(*overrides), world_size=2)
    assert "\n" not in str(raised.value) and "errors.pydantic.dev" not in str(raised.value)


# -- data.paths: one path, blends -----------------------------------------------------------------


@pytest.mark.parametrize(
    "paths, prefixes, weights",
    [
        ("corpus/a", ["corpus/a"], None),
        (["corpus/a", "corpus/b"], ["corpus/a", "corpus/b"], None),
        (["0.3", "corpus/a", "0.7", "corpus/b"], ["corpus/a", "corpus/b"], [0.3, 0.7]),
        ([0.3, "corpus/a", 0.7, "corpus/b"], ["corpus/a", "corpus/b"], [0.3, 0.7]),
        ([[0.3, "corpus/a"], ["0.7", "corpus/b"]], ["corpus/a", "corpus/b"], [0.3, 0.7]),
    ],
)
def test_data_paths_forms(paths, prefixes, weights):
    config = _tiny(f"data.paths={json.dumps(paths)}", "data.tokenizer=tok.model")
    assert (config.data.prefixes, config.data.weights) == (prefixes, weights)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.tokenizer=tok.model"],
            "data.tokenizer='tok.model' is set but data.paths is not",
        ),
        (
            ['data.paths=["0", "corpus/a", "1", "corpus/b"]', "data.tokenizer=tok.model"],
            "blending weights must be finite numbers > 0, got [0.0, 1.0]",
        ),
        (
            ['data.paths=[[0.5, "corpus/a", "x"]]', "data.tokenizer=tok.model"],
            "each pair must be [weight, prefix]",
        ),
        (['data.paths=["corpus/a", 3]', "data.tokenizer=tok.model"], "data.paths=['corpus/a', 3]"),
    ],
)
def test_bad_data_paths_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _tiny(*overrides)


# -- logging extras -----------------------------------------------------------------------------


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['logging.wandb={"mode": "sometimes"}'], "logging.wandb.mode='sometimes' is not one of"),
        (['logging.wandb={"projekt": "x"}'], "unknown key(s) ['logging.wandb.projekt']"),
        (["logging.wandb=true"], "logging.wandb=True must be null or an object"),
    ],
)
def test_bad_wandb_section_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _tiny(*overrides)


@pytest.mark.parametrize(
    "override, module",
    [('logging.wandb={"mode": "offline"}', "wandb"), ("logging.tensorboard=true", "tensorboard")],
)
def test_a_logger_that_is_not_installed_names_its_extra(override, module):
    if not _missing(module):
        pytest.skip(f"{module} is installed here")
    config = _tiny(override)  # reading the config needs no logger; running it does
    with pytest.raises(ConfigError, match=re.escape(f"pip install 'actcomp_dist[{module}]'")):
        validate_run(config, world_size=2)


# -- LR schedule --------------------------------------------------------------------------------


def test_learning_rate_is_linear_warmup_then_cosine_to_min_lr():
    train = TrainSection(steps=20, lr=1.0, min_lr=0.1, warmup_steps=4, lr_decay="cosine")
    assert [learning_rate(s, train) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for step in range(4, 20):
        progress = (step - 4) / 16
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        # The same closed form in float64 on both sides: a few roundings apart at most.
        assert learning_rate(step, train) == pytest.approx(expected, rel=1e-12)
    assert learning_rate(20, train) == pytest.approx(0.1, rel=1e-12)
    # Past the end: stays at min_lr.
    assert learning_rate(100, train) == pytest.approx(0.1, rel=1e-12)
    linear = TrainSection(steps=20, lr=1.0, min_lr=0.0, warmup_steps=0, lr_decay="linear")
    assert learning_rate(10, linear) == pytest.approx(0.5, rel=1e-12)
    constant = TrainSection(steps=20, lr=0.3, min_lr=0.0, warmup_steps=2, lr_decay="constant")
    assert [learning_rate(s, constant) for s in (0, 1, 5, 19)] == [0.15, 0.3, 0.3, 0.3]


# -- checkpoint bookkeeping (files only) ---------------------------------------------------------


def _fake_checkpoint(directory: Path, step: int, compression: dict, complete: bool = True) -> Path:
    path = directory / ckpt.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    state = {
        "step": step,
        "world_size": 2,
        "config": {"compression": compression, "parallel": {"tensor_parallel": 1}},
    }
    (path / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    if complete:
        marker = {"step": step, "files": ckpt._file_manifest(path), "compression": compression}
        (path / ckpt.MARKER).write_text(json.dumps(marker))
    return path


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    compression = _tiny().compression.to_dict()
    assert ckpt.resolve_resume(tmp_path, "latest") is None
    assert ckpt.resolve_resume(tmp_path, None) is None
    _fake_checkpoint(tmp_path, 3, compression)
    ten = _fake_checkpoint(tmp_path, 10, compression)
    _fake_checkpoint(tmp_path, 12, compression, complete=False)  # a save that was interrupted
    assert ckpt.resolve_resume(tmp_path, "latest") == ten
    with pytest.raises(ckpt.CheckpointError, match="is not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "step_0000012"))
    assert ckpt.verify_checkpoint(ten, compression)["step"] == 10


def test_damaged_checkpoint_and_changed_compression_are_refused(tmp_path):
    compression = _tiny().compression.to_dict()
    path = _fake_checkpoint(tmp_path, 3, compression)
    changed = dict(compression, rank=0.5, resample_every=7)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.verify_checkpoint(path, changed)
    assert "different compression config (rank: checkpoint 0.25 -> config 0.5; " in str(error.value)
    assert "resample_every: checkpoint 50 -> config 7)" in str(error.value)

    data = bytearray((path / "weights.bin").read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    (path / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="damaged: weights.bin differs from what was"):
        ckpt.verify_checkpoint(path, compression)
    (path / "weights.bin").unlink()
    with pytest.raises(ckpt.CheckpointError, match="damaged: weights.bin is missing"):
        ckpt.verify_checkpoint(path, compression)
    (path / ckpt.MARKER).write_text('{"step": 3')  # a truncated marker
    with pytest.raises(ckpt.CheckpointError, match="unreadable COMPLETE marker"):
        ckpt.verify_checkpoint(path, compression)


# -- preemption requests (one process, no collective) --------------------------------------------


def test_preemption_handler_sees_a_signal_or_the_stop_file(tmp_path):
    import os

    import torch

    stop = tmp_path / "STOP"
    handler = PreemptionHandler(stop).install()
    try:
        cpu = torch.device("cpu")
        assert not handler.should_stop(cpu)
        stop.touch()
        assert handler.should_stop(cpu)
        handler.consume_stop_file()
        assert not stop.exists() and not handler.should_stop(cpu)
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the process keeps running
        assert handler.should_stop(cpu) and handler.received == signal.SIGUSR1
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
