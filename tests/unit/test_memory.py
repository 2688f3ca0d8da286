"""Memory accounting against graphs whose saved tensors are known by construction."""

from __future__ import annotations

import torch
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.memory import (
    peak_memory_by_category,
    saved_activation_bytes,
    saved_activation_bytes_by_module,
)


class SaveAll(torch.autograd.Function):
    """Identity on ``x`` that saves exactly the tensors it is given."""

    @staticmethod
    def forward(ctx, x, *to_save):
        ctx.save_for_backward(*to_save)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[None] * len(ctx.saved_tensors))


def _save(x, *tensors):
    return SaveAll.apply(x, *tensors)


def test_counts_each_storage_once_and_excludes_parameters():
    x = torch.randn(3, requires_grad=True)
    a = torch.randn(10, 10)  # 400 bytes
    b = torch.randn(7, dtype=torch.bfloat16)  # 14 bytes
    weight = nn.Parameter(torch.randn(50, 50))

    def forward():
        y = _save(x, a, a.t(), a[2:5], b, weight, weight.t(), weight[0])  # views share storage
        return _save(y, a.view(100), b)  # saved again by another node

    assert saved_activation_bytes(forward) == a.nbytes + b.nbytes


def test_a_saved_view_holds_its_whole_storage():
    """What the allocator keeps alive is the storage, not the view's elements."""
    x = torch.randn(3, requires_grad=True)
    big = torch.randn(1000)
    assert saved_activation_bytes(lambda: _save(x, big[:10])) == big.nbytes


def test_known_autograd_formulas():
    """Built-in ops with documented saved tensors: exp saves its result, mul saves both
    operands (each requires the other's value), and a sum saves nothing."""
    x = torch.randn(8, 16, requires_grad=True)
    y = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    assert saved_activation_bytes(lambda: x.exp()) == x.nbytes
    assert saved_activation_bytes(lambda: x * y) == x.nbytes + y.nbytes
    assert saved_activation_bytes(lambda: (x * 2).sum()) == 0


def test_exclude_leaves_out_given_tensors():
    x = torch.randn(3, requires_grad=True)
    buffer, other = torch.randn(64), torch.randn(16)
    assert saved_activation_bytes(lambda: _save(x, buffer, other), exclude=[buffer]) == (
        other.nbytes
    )


def test_per_module_breakdown_sums_to_the_total():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        CompressedLinear(32, 8, compression=CompressionConfig(method="compact", rank=8)),
    )
    x = torch.randn(10, 16, requires_grad=True)
    expected_output = model(x)

    outputs = []

    def forward():
        outputs.append(model(x))
        return outputs[-1].square().sum()

    by_module = saved_activation_bytes_by_module(model, forward)
    assert torch.equal(outputs[0], expected_output)  # the tracking hooks change nothing
    # Linear 0 saves its input x; ReLU saves its output; the compressed layer saves Z [10, 8]
    # (its input is the ReLU output, already counted, but it does not keep it); square() runs
    # outside every submodule and saves the model output.
    assert by_module == {"0": 10 * 16 * 4, "1": 10 * 32 * 4, "2": 10 * 8 * 4, "": 10 * 8 * 4}
    assert sum(by_module.values()) == saved_activation_bytes(forward)


def test_peak_memory_by_category():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(10, 16)

    def step():
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    peak = peak_memory_by_category(model, optimizer, step)
    categories = {
        "parameters",
        "buffers",
        "gradients",
        "activations",
        "temporaries",
        "optimizer_state",
        "other",
    }
    assert set(peak) == categories | {"total"}
    parameter_bytes = sum(p.nbytes for p in model.parameters())
    assert peak["parameters"] == parameter_bytes
    assert peak["buffers"] == 0
    assert peak["total"] == sum(peak[c] for c in categories)
    # AdamW keeps two moments per parameter element; they exist at the step's peak.
    assert peak["optimizer_state"] >= 2 * parameter_bytes
