"""``CompressionConfig`` fails loudly: every bad value is a ``ValueError`` that names the field
(``CompressionConfig.<field>``) and says what would be valid."""

from __future__ import annotations

import re

import pytest

from actcomp_dist import CompressedLinear, CompressionConfig, list_compressors


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 0}, "CompressionConfig.rank=0"),
        ({"rank": -3}, "CompressionConfig.rank=-3"),
        ({"rank": 0.0}, "CompressionConfig.rank=0.0"),
        ({"rank": -0.5}, "CompressionConfig.rank=-0.5"),
        ({"rank": 1.5}, "CompressionConfig.rank=1.5: a ratio of the input width must be in"),
        ({"rank": float("nan")}, "CompressionConfig.rank=nan"),
        ({"rank": "1/4"}, "CompressionConfig.rank must be a number"),
        ({"rank": True}, "CompressionConfig.rank must be a number"),
        ({"projection": "orthogonal"}, "CompressionConfig.projection='orthogonal'"),
        ({"grad_mode": "galore"}, "CompressionConfig.grad_mode='galore'"),
        ({"lowrank_algorithm": "svd"}, "CompressionConfig.lowrank_algorithm='svd'"),
        ({"resample_every": 0}, "CompressionConfig.resample_every=0 must be an int >= 1"),
        ({"resample_every": 2.5}, "CompressionConfig.resample_every=2.5"),
        ({"groups": 0}, "CompressionConfig.groups=0"),
        ({"seed": -1}, "CompressionConfig.seed=-1"),
        ({"power_iterations": -1}, "CompressionConfig.power_iterations=-1"),
        ({"oversampling": -1}, "CompressionConfig.oversampling=-1 must be an int >= 0"),
        ({"row_parallel_blocks": 0}, "CompressionConfig.row_parallel_blocks=0"),
        (
            {"row_parallel_projection": "diagonal"},
            "CompressionConfig.row_parallel_projection='diagonal' is not one of ['dense', 'block']",
        ),
        ({"sites": "qkv"}, "CompressionConfig.sites"),
        (
            {"method": "lowrank", "grad_mode": "subspace"},
            "CompressionConfig.grad_mode='subspace' needs method='compact'",
        ),
    ],
)
def test_bad_field_names_the_field(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CompressionConfig(**{"method": "compact", **fields})


def test_valid_choices_are_listed():
    with pytest.raises(ValueError, match=re.escape("['gaussian', 'rademacher', 'sparse']")):
        CompressionConfig(method="compact", projection="orthogonal")
    with pytest.raises(ValueError, match=re.escape("['lift', 'subspace']")):
        CompressionConfig(method="compact", grad_mode="galore")


def test_unknown_method_lists_the_registered_methods():
    with pytest.raises(ValueError) as error:
        CompressionConfig(method="compactt")
    message = str(error.value)
    assert "CompressionConfig.method='compactt'" in message
    assert str(list_compressors()) in message


@pytest.mark.parametrize("method", ["compact", "lowrank"])
def test_rank_larger_than_the_width_fails_at_layer_construction(method):
    cfg = CompressionConfig(method=method, rank=64)  # valid on its own: widths differ per layer
    CompressedLinear(64, 8, compression=cfg)
    with pytest.raises(ValueError, match=re.escape("CompressionConfig.rank=64 exceeds the layer")):
        CompressedLinear(48, 8, compression=cfg)


def test_groups_not_dividing_the_width_fails_at_layer_construction():
    cfg = CompressionConfig(method="subtoken", groups=6)
    with pytest.raises(ValueError, match=re.escape("CompressionConfig.groups=6 must divide")):
        CompressedLinear(64, 8, compression=cfg)


def test_rank_kinds_resolve_against_the_width():
    assert CompressionConfig(rank=0.25).resolve_rank(512) == 128
    assert CompressionConfig(rank=0.3).resolve_rank(10) == 3
    assert CompressionConfig(rank=1e-6).resolve_rank(10) == 1  # never below 1
    assert CompressionConfig(rank=1.0).resolve_rank(10) == 10
    assert CompressionConfig(rank=1).resolve_rank(10) == 1  # an int is absolute
    assert CompressionConfig(rank=10).resolve_rank(10) == 10


def test_from_dict_round_trip_and_unknown_key():
    cfg = CompressionConfig(
        method="compact", rank=0.125, projection="sparse", resample_every=200, sites=["fc1"]
    )
    assert cfg.sites == ("fc1",)
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown compression field\(s\) \['rnak'\]") as error:
        CompressionConfig.from_dict({"method": "compact", "rnak": 0.25})
    assert "'rank'" in str(error.value)  # the valid keys are listed


def test_config_is_immutable():
    cfg = CompressionConfig(method="compact")
    with pytest.raises(AttributeError):
        cfg.rank = 0.5
    assert cfg.replace(rank=0.5).rank == 0.5 and cfg.rank == 0.25
