"""Running one stored-activation site by itself, for the storage-policy tests."""

from __future__ import annotations

from actcomp_dist.models.llama import swiglu


def fc2_grads(fc2, gate_up, grad_out, storage):
    """FC2 on ``swiglu(gate_up)`` with ``storage`` (None: keep the input), backward from
    ``grad_out``: the output, the gradient into ``gate_up`` and FC2's weight gradient."""
    source = gate_up.detach().requires_grad_(True)
    fc2.weight.grad = None
    out, _ = fc2(source, input_fn=swiglu, storage=storage)
    out.backward(grad_out)
    return out.detach(), source.grad, fc2.weight.grad.clone()
