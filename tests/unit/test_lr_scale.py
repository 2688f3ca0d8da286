"""``train.lr_scale``: which group each parameter is in, and each group's learning rate under the
schedule, fresh and after a resume restarts the schedule (no process group: the torch
optimizer and ``LambdaLR`` the engine hands to DeepSpeed).

Reference: the closed-form schedule :func:`~actcomp_dist.training.schedule.learning_rate`
times the group's factor. ``LambdaLR`` computes ``(lr * factor) * (learning_rate / lr)`` in
float64: a few roundings from ``factor * learning_rate``, so rel 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actcomp_dist.models.kinds import parameter_group
from actcomp_dist.training.config import LR_SCALE_KEYS, TrainSection, lr_scale_factor
from actcomp_dist.training.engine import _param_groups
from actcomp_dist.training.schedule import (
    build_lr_scheduler,
    learning_rate,
    restart_lr_schedule,
    schedule_lr,
)

SPLIT = {"qkv": 0.25, "fc1": 0.25, "fc2": 0.25, "proj": 0.125}


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("embedding.weight", "embedding"),
        ("layers.0.input_norm.weight", "norm"),
        ("layers.11.mlp_norm.weight", "norm"),
        ("final_norm.weight", "norm"),
        ("layers.0.attention.qkv.weight", "qkv"),
        ("layers.3.attention.proj.weight", "proj"),
        ("layers.3.mlp.fc1.weight", "fc1"),
        ("layers.3.mlp.fc2.weight", "fc2"),
        ("output_layer.weight", "output"),
        ("layers.0.attention.qkv.adapter.A", "default"),  # held by the adapter module
        ("extra", "default"),
    ],
)
def test_parameter_group_is_the_group_of_the_module_holding_it(name, group):
    assert parameter_group(name) == group
    assert group in LR_SCALE_KEYS


def test_factor_lookup_falls_back_to_default_then_one():
    assert lr_scale_factor({}, "qkv") == 1.0
    assert lr_scale_factor({"default": 0.5}, "qkv") == 0.5
    assert lr_scale_factor({"default": 0.5, "qkv": 2}, "qkv") == 2.0


class _Block(nn.Module):
    """The parameter names of one LLaMA block and the outer layers, on plain modules."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.Module()
        self.input_norm.weight = nn.Parameter(torch.ones(4))
        self.attention = nn.Module()
        self.attention.qkv = nn.Linear(4, 12, bias=False)
        self.attention.proj = nn.Linear(4, 4, bias=False)
        self.mlp_norm = nn.Module()
        self.mlp_norm.weight = nn.Parameter(torch.ones(4))
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(4, 16, bias=False)
        self.mlp.fc2 = nn.Linear(8, 4, bias=False)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.final_norm = nn.Module()
        self.final_norm.weight = nn.Parameter(torch.ones(4))
        self.output_layer = nn.Linear(4, 10, bias=False)


def _train(**kw) -> TrainSection:
    base = dict(steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=3, weight_decay=0.1)
    return TrainSection(**{**base, **kw})


def test_param_groups_split_by_decay_and_factor_and_start_at_the_scaled_lr():
    model = _Model()
    train = _train(lr_scale={**SPLIT, "norm": 2.0})
    groups = _param_groups(model, train, exclude=set())
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            factor = lr_scale_factor(train.lr_scale, parameter_group(name))
            assert group["lr_scale"] == factor, name
            assert group["lr"] == train.lr * factor, name
            assert group["weight_decay"] == (0.1 if param.dim() >= 2 else 0.0), name
            seen.append(name)
    assert sorted(seen) == sorted(names.values())  # every parameter, once
    # Decayed groups first, then the vectors (norms at 2.0); model order inside each.
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [
        (0.1, 1.0),  # embedding, output
        (0.1, 0.25),  # qkv, fc1, fc2
        (0.1, 0.125),  # proj
        (0.0, 2.0),  # norms
    ]
    assert [names[id(p)] for p in groups[0]["params"]] == [
        "embedding.weight",
        "output_layer.weight",
    ]


def test_without_factors_the_groups_are_matrices_then_vectors():
    model = _Model()
    for scale in ({}, {"default": 1, "qkv": 1.0, "norm": 1}):
        groups = _param_groups(model, _train(lr_scale=scale), exclude=set())
        assert [len(g["params"]) for g in groups] == [10, 5]
        assert [g["lr"] for g in groups] == [1e-2, 1e-2]


@pytest.mark.parametrize(
    "scale, tied, grad_mode",
    [
        ({}, False, "lift"),
        ({**SPLIT, "norm": 2.0}, False, "lift"),
        ({"proj": 0.5, "embedding": 0.5, "output": 3.0}, True, "lift"),
        ({"proj": 0.5, "default": 2.0}, False, "subspace"),  # qkv, fc1, fc2 in no group
    ],
)
def test_planner_sizes_the_trainers_param_groups(single_rank, scale, tied, grad_mode):
    """The memory model's param groups (their sizes set the gradients' peak while ZeRO 1-3
    steps one group) are the trainer's, counted on the real LLaMA model."""
    from actcomp_dist import CompressionConfig
    from actcomp_dist.memory_model import optimizer_group_sizes
    from actcomp_dist.models import build_llama, get_model_config
    from actcomp_dist.optim.subspace_proxy import subspace_layers
    from actcomp_dist.training.model_states import lr_factors

    config = get_model_config("tiny").replace(tie_embeddings=tied)
    compression = CompressionConfig(method="compact", rank=0.25, grad_mode=grad_mode)
    model = build_llama(config, compression)
    exclude = {id(layer.weight) for layer in subspace_layers(model)}
    assert bool(exclude) == (grad_mode == "subspace")
    train = _train(lr_scale=scale)
    groups = _param_groups(model, train, exclude)
    run = type("Run", (), {"train": train})()
    predicted = optimizer_group_sizes(config, compression, 1, lr_factors(run))
    assert predicted == [sum(p.numel() for p in g["params"]) for g in groups]


def _optimizer(train: TrainSection) -> tuple[torch.optim.Optimizer, list[float]]:
    groups = _param_groups(_Model(), train, exclude=set())
    optimizer = torch.optim.AdamW(groups, lr=train.lr)
    return optimizer, [g["lr_scale"] for g in groups]


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_each_group_follows_the_schedule_times_its_factor(decay):
    train = _train(lr_decay=decay, lr_scale={**SPLIT, "default": 0.5, "embedding": 1})
    optimizer, factors = _optimizer(train)
    scheduler = build_lr_scheduler(optimizer, train)
    for step in range(train.steps + 2):  # warm-up, decay, past the end
        for group, factor in zip(optimizer.param_groups, factors, strict=True):
            assert group["lr"] == pytest.approx(factor * learning_rate(step, train), rel=1e-12)
        # The schedule's own lr, from the factor-1 group (the embedding's).
        assert schedule_lr(scheduler) == pytest.approx(learning_rate(step, train), rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_schedule_lr_without_a_factor_one_group_divides_the_first():
    train = _train(lr_scale={"default": 0.5, "norm": 0.25})
    optimizer, _ = _optimizer(train)
    scheduler = build_lr_scheduler(optimizer, train)
    for step in range(5):
        assert schedule_lr(scheduler) == pytest.approx(learning_rate(step, train), rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_a_restarted_schedule_keeps_each_groups_factor():
    """A resume that changes the schedule (longer run, other peak lr) recomputes every group's
    lr from the new settings at the restored step, times the group's factor."""
    before = _train(lr_scale=SPLIT)
    optimizer, factors = _optimizer(before)
    scheduler = build_lr_scheduler(optimizer, before)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    after = _train(lr_scale=SPLIT, steps=30, lr=5e-3, min_lr=5e-4)
    resumed = build_lr_scheduler(optimizer, after)
    resumed.load_state_dict(state)  # base_lrs and last_epoch of the run that saved it
    restart_lr_schedule(resumed, after)
    for step in range(5, 9):
        for group, factor in zip(optimizer.param_groups, factors, strict=True):
            assert group["lr"] == pytest.approx(factor * learning_rate(step, after), rel=1e-12)
        optimizer.step()
        resumed.step()
