"""`SubspaceAdamW`: AdamW whose compressed-gradient weights keep m x r moments (CompAct).

A weight trained in ``subspace`` mode carries a :class:`~actcomp_dist.subspace.SubspaceState`
(``weight.subspace``): ``G_hat`` [m, r] (its ``.grad`` stays ``None``) and the seeds of the
projection ``P`` [n, r] it was formed with. For
such a weight the optimizer keeps Adam moments of shape [m, r] (float32) and applies

    N = m_hat / (sqrt(v_hat) + eps)          (bias-corrected Adam direction, [m, r])
    W <- W * (1 - lr * weight_decay) - lr * alpha * N P^T

with ``alpha`` = ``subspace_scale`` (CompAct's default 0.25 for pretraining). ``P`` is rebuilt
from the stored seeds (or taken from the layer's cache) in the weight's dtype — the values the
forward pass multiplied by — and widened to float32 for the update. Moments are kept when ``P`` is resampled (the paper's
default). Every other parameter in the same optimizer gets plain AdamW (the same update rule
as ``torch.optim.AdamW``).

With ``process_group`` set, the compressed gradients are averaged over that (data-parallel)
group before the update, as one flat all-reduce of the m x r tensors — the m x n gradient is
never formed or communicated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from actcomp_dist.subspace import is_subspace_parameter, subspace_state


class SubspaceAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        subspace_scale: float = 0.25,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if subspace_scale <= 0:
            raise ValueError(f"subspace_scale must be > 0, got {subspace_scale}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, subspace_scale=subspace_scale
        )
        super().__init__(params, defaults)
        self.process_group = process_group

    def subspace_parameters(self) -> list[torch.Tensor]:
        return [
            p for group in self.param_groups for p in group["params"] if is_subspace_parameter(p)
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.subspace_parameters():
            subspace_state(p).clear()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts loaded state to each parameter's dtype; the moments here
        # are float32 for every parameter (bf16 weights included), so take them from the saved
        # dict instead of from the (possibly bf16-rounded) copies.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = value.to(p.device, torch.float32, copy=True)

    @torch.no_grad()
    def all_reduce_compressed_grads(self) -> None:
        """Average every m x r subspace gradient over ``process_group`` in one flat all-reduce."""
        states = [subspace_state(p) for p in self.subspace_parameters()]
        grads = [state.grad for state in states if state.grad is not None]
        if self.process_group is None or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.process_group)
        flat.div_(dist.get_world_size(self.process_group))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.all_reduce_compressed_grads()
        for group in self.param_groups:
            for p in group["params"]:
                subspace = is_subspace_parameter(p)
                grad = subspace_state(p).grad if subspace else p.grad
                if grad is None:
                    continue
                self._update(p, grad, group, subspace)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, subspace: bool) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = grad.float()

        p.mul_(1.0 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1**step)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
        if not subspace:
            if p.dtype == torch.float32:
                p.addcdiv_(exp_avg, denom, value=-step_size)
            else:
                p.add_((exp_avg / denom).mul_(-step_size).to(p.dtype))
            return
        # The projection in the weight's dtype (as the forward used it), widened to fp32.
        projection = subspace_state(p).projection(p.device, p.dtype).float()
        direction = (exp_avg / denom) @ projection.t()  # [m, n]
        p.add_(direction.mul_(-step_size * group["subspace_scale"]).to(p.dtype))
