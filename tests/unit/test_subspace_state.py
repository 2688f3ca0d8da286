"""``actcomp_dist.subspace.SubspaceState``: a subspace weight's m x r gradient, the seeds of the
projection that formed it, and the optimizer's sink, in one object owned by the layer.

The end-to-end behaviour (SubspaceAdamW's update, the DeepSpeed merger, the DP-partitioned Adam,
clipping) is checked against references in test_compact, test_optim, test_subspace_merger,
test_subspace_partitioned and test_parallel_subspace; here: the object's own contract, and that
the layers no longer reach into the optimizer package for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.subspace import (
    MixedProjectionsError,
    SubspaceState,
    is_subspace_parameter,
    subspace_state,
)

ROOT = Path(__file__).resolve().parents[2]


def _state(dtype=torch.float32):
    weight = torch.nn.Parameter(torch.zeros(4, 6, dtype=dtype))
    calls = []

    def projection(seeds, device, dtype):
        calls.append((seeds, device, dtype))
        generator = torch.Generator().manual_seed(seeds[0])
        return torch.randn(6, 2, generator=generator).to(device, dtype)

    weight.subspace = SubspaceState(weight, projection)
    return weight, calls


def test_micro_batches_of_one_step_accumulate_in_the_weight_dtype():
    weight, _ = _state(torch.bfloat16)
    a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    weight.subspace.accumulate(a, (7,))
    weight.subspace.accumulate(b, (7,))
    # Each micro-batch is cast to the weight's dtype, then added in that dtype (as autograd
    # accumulates .grad): the same two roundings and one addition, bit for bit.
    expected = a.to(torch.bfloat16).clone().add_(b.to(torch.bfloat16))
    assert weight.subspace.grad.dtype == torch.bfloat16
    assert torch.equal(weight.subspace.grad, expected)
    assert weight.subspace.seeds == (7,)


def test_a_second_projection_in_one_step_is_refused_and_clear_ends_the_step():
    weight, _ = _state()
    weight.subspace.accumulate(torch.ones(4, 2), (7,))
    with pytest.raises(MixedProjectionsError, match="different projections"):
        weight.subspace.accumulate(torch.ones(4, 2), (8,))
    with pytest.raises(MixedProjectionsError):
        weight.subspace.record_seeds((8,))
    weight.subspace.clear()
    assert weight.subspace.grad is None and weight.subspace.seeds is None
    weight.subspace.accumulate(torch.ones(4, 2), (8,))  # the next step may use a new one
    assert weight.subspace.seeds == (8,)


def test_a_sink_receives_each_micro_batch_and_nothing_is_kept():
    weight, _ = _state()
    received = []
    weight.subspace.sink = lambda w, ghat: received.append((w, ghat.clone()))
    ghat = torch.randn(4, 2, dtype=torch.float64)
    weight.subspace.accumulate(ghat, (3,))
    assert weight.subspace.grad is None and weight.subspace.seeds == (3,)
    assert received[0][0] is weight and torch.equal(received[0][1], ghat.float())


def test_projection_is_rebuilt_from_the_recorded_seeds():
    weight, calls = _state()
    with pytest.raises(RuntimeError, match="no projection recorded"):
        weight.subspace.projection("cpu", torch.float32)
    weight.subspace.record_seeds((5,))
    p = weight.subspace.projection("cpu", torch.float64)
    assert calls[-1] == ((5,), torch.device("cpu"), torch.float64) and p.dtype == torch.float64
    weight.subspace.projection("cpu", torch.float32, seeds=(6,))
    assert calls[-1][0] == (6,)


def test_a_subspace_layer_owns_one_state_and_a_lift_layer_none():
    subspace = CompressedLinear(
        8, 4, compression=CompressionConfig(method="compact", rank=2, grad_mode="subspace")
    )
    lift = CompressedLinear(8, 4, compression=CompressionConfig(method="compact", rank=2))
    assert is_subspace_parameter(subspace.weight) and not is_subspace_parameter(lift.weight)
    assert subspace_state(lift.weight) is None and subspace_state(subspace.bias) is None
    x = torch.randn(3, 8)
    subspace(x).sum().backward()
    state = subspace_state(subspace.weight)
    assert subspace.weight.grad is None and state.grad.shape == (4, 2)
    assert state.seeds == subspace.compressor.current_seeds()


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize(
    "path",
    [
        "actcomp_dist/autograd.py",
        "actcomp_dist/layers.py",
        "actcomp_dist/subspace.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "actcomp_dist/parallel").glob("*.py")),
    ],
)
def test_the_layers_do_not_import_the_optimizers(path):
    """The README's layering: the operators and the parallel layers sit below ``optim`` and
    reach the subspace state through :mod:`actcomp_dist.subspace`."""
    upward = {
        name
        for name in _imported_modules(ROOT / path)
        if name.split(".")[:2]
        in (["actcomp_dist", p] for p in ("optim", "training", "ablation", "cli", "hf"))
    }
    assert not upward, (path, upward)
