"""Subspace optimizer state outside DeepSpeed, partitioned over data parallelism (ZeRO 1/2).

Why not the proxies of :mod:`actcomp_dist.optim.subspace_proxy` here: DeepSpeed ZeRO 1/2
keeps every parameter it manages whole on every rank, in the training precision. A proxy
``S`` [m, r] is zero between steps and nothing ever reads its value, yet it costs ``2 m r``
bytes per rank at every data-parallel size D — at 1B with r = n/4 that is 0.55 GB, more than
the partitioning of everything else saves once D >= 32. Giving DeepSpeed a smaller ``S``
would mean rewriting its flat buffers, its post-step all-gather and its checkpoint restore.
So at ZeRO 1/2 the subspace state is kept here instead, partitioned like ZeRO-2 partitions
gradients and optimizer state, and with the same rows the merger's fp32 masters use
(:func:`~actcomp_dist.optim.subspace_proxy.owned_rows`: rank d owns ``ceil(m / D)``
contiguous output rows of every compressed weight):

- **gradients**: each micro-batch's ``G_hat`` [m, r] is reduce-scattered over the
  data-parallel group in the layer's backward, by rows; a rank accumulates only its rows in
  fp32 ([ceil(m / D), r]). No rank keeps an m x r gradient past that layer's backward, and
  the m x n gradient is never formed.
- **one global clip**: DeepSpeed's ``scaled_global_norm`` is wrapped so that the norm it clips
  with (and reports) is ``sqrt(norm_ds^2 + norm_subspace^2)``, the latter summed over the
  data-parallel ranks' rows and over tensor-parallel shards (a dense row-parallel layer's
  ``G_hat`` is the same on every TP rank and is counted once, as DeepSpeed counts replicated
  parameters). The subspace gradients are then scaled by the coefficient DeepSpeed applies
  to its own (``unscale_and_clip_grads``: loss scale times ``max(1, (norm + 1e-6) / clip)``).
  A norm that is not finite makes DeepSpeed skip the step; the subspace gradients are then
  dropped with it.
- **Adam**: moments [ceil(m / D), r] fp32 per weight, the update rule of ``torch.optim.AdamW``
  without weight decay on ``S`` (the decay is applied to ``W``), one step counter (every
  subspace weight steps at every applied step, as DeepSpeed steps every proxy). The step's
  ``S`` rows are folded into the owned rows of the fp32 master (or of an fp32 weight),
  ``W <- W (1 - lr wd) + alpha S P^T``, and the updated rows are all-gathered into every
  rank's weight: exactly the merge of :class:`SubspaceMerger`, without an m x r ``S``.
- **checkpoint**: masters, moments and the step counter of this rank's rows, per rank.

Per rank, compressed weight [m, n] with projection rank r: ``(4 n + 12 r) ceil(m / D)`` bytes
in 16-bit training (master, moments, gradient), ``12 r ceil(m / D)`` in fp32 — all 1/D.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.optim.subspace_proxy import SubspaceMerger, SubspaceScale, owned_rows
from actcomp_dist.subspace import subspace_state


class PartitionedSubspaceAdam(SubspaceMerger):
    """The m x r gradients, Adam moments and fp32 masters of ``subspace`` weights, each rank
    holding its rows (see the module docstring). Used like :class:`SubspaceMerger`: call
    :meth:`merge` after every applied optimizer step; :meth:`attach_to` joins the engine's
    gradient-norm clip."""

    def __init__(
        self,
        model: nn.Module,
        subspace_scale: SubspaceScale,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        process_group: dist.ProcessGroup | None = None,
        model_parallel_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(model, subspace_scale, weight_decay, process_group=process_group)
        self.betas, self.eps = tuple(betas), eps
        self.model_parallel_group = model_parallel_group
        tp_rank = dist.get_rank(model_parallel_group) if model_parallel_group is not None else 0
        self.steps = 0
        # What the engine scaled its gradients by at this step (float or float32 tensor).
        self.clip_coefficient: torch.Tensor | float = 1.0
        self.rows: dict[int, tuple[int, int]] = {}
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # [rows, r] fp32
        self.grads: dict[int, torch.Tensor] = {}  # [rows, r] fp32, summed over ranks
        self._counted: dict[int, bool] = {}  # whether this rank adds the layer to the norm
        for layer in self.layers:
            weight = layer.weight
            start, end = owned_rows(weight.shape[0], self.dp_rank, self.dp_size)
            self.rows[id(weight)] = (start, end)
            width = layer.compressor.compressed_width
            self.moments[id(weight)] = tuple(
                torch.zeros(end - start, width, device=weight.device) for _ in range(2)
            )
            self._counted[id(weight)] = not layer.compressor.layout.partial_sum or tp_rank == 0
            subspace_state(weight).sink = self.reduce_gradient

    def _check_layers(self) -> None:
        proxies = [m for m in self.layers if getattr(m, "subspace_proxy", None) is not None]
        if proxies:
            raise ValueError("PartitionedSubspaceAdam keeps the m x r state itself: no proxies")

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {
            **super().state_tensors(),
            "gradients": list(self.grads.values()),
            "optimizer_state": [m for pair in self.moments.values() for m in pair],
        }

    # -- gradients ------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradient(self, weight: nn.Parameter, ghat: torch.Tensor) -> None:
        """Sum this micro-batch's ``ghat`` [m, r] over the data-parallel group and add this
        rank's rows to its fp32 accumulator (collective: every rank's backward reaches every
        layer in the same order)."""
        start, end = self.rows[id(weight)]
        if self.dp_size == 1:
            rows = ghat.float()
        else:
            m, chunk = ghat.shape[0], -(-ghat.shape[0] // self.dp_size)
            padded = ghat.new_zeros(self.dp_size * chunk, ghat.shape[1])  # [D * chunk, r]
            padded[:m].copy_(ghat)
            out = ghat.new_empty(chunk, ghat.shape[1])
            dist.reduce_scatter_tensor(out, padded, group=self.process_group)
            rows = out[: end - start].float()
        accumulated = self.grads.get(id(weight))
        if accumulated is None:
            self.grads[id(weight)] = rows if rows.data_ptr() != ghat.data_ptr() else rows.clone()
        else:
            accumulated.add_(rows)

    def zero_grad(self) -> None:
        self.grads.clear()
        for layer in self.layers:
            subspace_state(layer.weight).clear()

    def squared_norm(self) -> torch.Tensor:
        """Squared L2 norm of the data-parallel mean of every subspace gradient, summed over
        the data-parallel and tensor-parallel groups (collective)."""
        device = self.layers[0].weight.device if self.layers else torch.device("cpu")
        squared = torch.zeros((), device=device)
        for key, grad in self.grads.items():
            if self._counted[key]:
                squared += grad.pow(2).sum()
        squared /= self.dp_size**2  # the accumulators hold sums over ranks
        for group in (self.process_group, self.model_parallel_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(squared, group=group)
        return squared

    def attach_to(self, zero_optimizer: Any) -> None:
        """Join DeepSpeed ZeRO 1/2's clip: its norm becomes the joint one, and the subspace
        gradients get the coefficient it scales its own with; a skipped step drops them."""
        own_norm, own_step = zero_optimizer.scaled_global_norm, zero_optimizer.step

        def scaled_global_norm(norm_type: int = 2):
            # Both norms are of loss-scaled gradients (one backward of one scaled loss); a
            # negative one is DeepSpeed's "not finite".
            norm = torch.as_tensor(own_norm(norm_type), dtype=torch.float32)
            squared = self.squared_norm().to(norm.device)
            joint = torch.where(norm >= 0, (norm**2 + squared).sqrt(), norm)
            self.clip_coefficient = 1.0 / _combined_scale(
                joint, zero_optimizer.loss_scale, zero_optimizer.clip_grad
            )
            return joint

        def step(closure=None):
            # Without clipping (or a norm) DeepSpeed only unscales.
            self.clip_coefficient = 1.0 / zero_optimizer.loss_scale
            result = own_step(closure)
            if zero_optimizer.overflow:
                self.zero_grad()
            return result

        zero_optimizer.scaled_global_norm = scaled_global_norm
        zero_optimizer.step = step

    # -- the update -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, lr: float) -> None:
        """One Adam step of every subspace weight's owned rows, folded into the weight and
        gathered (collective over the data-parallel group); call after each applied step."""
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = lr / (1.0 - beta1**self.steps)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.steps)
        for layer in self.layers:
            weight = layer.weight
            start, end = self.rows[id(weight)]
            exp_avg, exp_avg_sq = self.moments[id(weight)]
            grad = self.grads.get(id(weight))
            if grad is None:  # no gradient reached this weight: Adam steps it with zero
                grad = torch.zeros_like(exp_avg)
            grad.mul_(self.clip_coefficient).div_(self.dp_size)
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            delta = torch.zeros_like(exp_avg).addcdiv_(exp_avg, denom, value=-step_size)
            _, master = self.masters.get(id(layer), (start, weight.data[start:end]))
            if self.weight_decay:
                master.mul_(1.0 - lr * self.weight_decay)
            state = subspace_state(weight)
            seeds = state.seeds if state.seeds is not None else layer.compressor.current_seeds()
            # The P the forward used (the weight's dtype), widened: G_hat was formed with it.
            projection = state.projection(weight.device, weight.dtype, seeds).float()
            master.add_((delta @ projection.t()).mul_(self.scales[id(layer)]))  # [rows, n]
            if master.data_ptr() != weight.data_ptr() or self.dp_size > 1:
                self._gather_rows(weight, master)
        self.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        names = {id(layer.weight): str(i) for i, layer in enumerate(self.layers)}
        return {
            **super().state_dict(),
            "steps": self.steps,
            "moments": {names[key]: pair for key, pair in self.moments.items()},
        }

    @torch.no_grad()
    def reset_state(self) -> None:
        """Masters from the weights, zero moments, step 0 (fresh optimizer state)."""
        super().reset_state()
        self.steps = 0
        for pair in self.moments.values():
            for moment in pair:
                moment.zero_()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "moments" not in state:
            raise ValueError(
                "this checkpoint keeps the subspace state on DeepSpeed proxies (saved before "
                "ZeRO 1/2 partitioned it); resume it with the code that wrote it"
            )
        super().load_state_dict(state)
        self.steps = state["steps"]
        for i, layer in enumerate(self.layers):
            saved = state["moments"][str(i)]
            for mine, value in zip(self.moments[id(layer.weight)], saved, strict=True):
                mine.copy_(value)


def _combined_scale(norm: torch.Tensor, loss_scale: float, clip: float) -> torch.Tensor | float:
    """What DeepSpeed ZeRO divides its gradients by, computed as ``unscale_and_clip_grads``
    computes it (float32 tensors; a norm that is not finite clips by infinity)."""
    if clip <= 0:
        return loss_scale
    if not bool(torch.isfinite(norm)) or float(norm) < 0:
        norm = torch.tensor(float("inf"), dtype=torch.float32, device=norm.device)
    return torch.clamp(((norm / loss_scale) + 1e-6) / clip, min=1.0) * loss_scale
