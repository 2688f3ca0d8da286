"""Subspace training inside an engine that owns the optimizer (DeepSpeed ZeRO 0-2).

CompAct's ``subspace`` mode updates ``W`` along ``P^T`` with Adam moments of shape m x r.
:class:`~actcomp_dist.optim.SubspaceAdamW` does that for plain PyTorch. Inside DeepSpeed the
gradients of the parameters it manages are reduced, clipped and stepped inside its flat
(ZeRO-partitioned) buffers, so a second optimizer beside it could not share its global
gradient-norm clip. Here the m x r gradient is instead made the gradient of a real parameter
DeepSpeed manages, by an exact re-parametrisation:

    W_eff = W + alpha * S P^T,      S = 0 between steps            (S: [m, r])
    dL/dS = alpha * (dL/dW_eff) P  ~ alpha * g^T X P = alpha * g^T Z = alpha * G_hat

The layers hand ``G_hat`` to ``S`` as its gradient (the constant ``alpha`` is left out: Adam is
invariant to it, and leaving it out keeps the clipped norm that of ``G_hat`` itself). DeepSpeed
then does everything it does for any parameter: averages the m x r gradient over data-parallel
ranks (never the m x n one), includes it in its one global gradient-norm clip, applies its
LR schedule, keeps ``S``'s Adam moments (m x r, ZeRO-partitioned) and checkpoints them. After
each optimizer step :meth:`SubspaceMerger.merge` folds the step into the weight,
``W <- W * (1 - lr * wd) + alpha * S P^T``, and resets ``S`` to zero; with Adam's update
``S = -lr * N`` this is exactly ``W <- W - lr * alpha * N P^T``. ``P`` is rebuilt from the
seeds recorded when the gradient was formed. Moments persist across resamples, as in the
paper.

``W`` itself is not given to the engine's optimizer. When the model runs in bf16/fp16 the
merger keeps an fp32 master copy of ``W`` so that small updates are not lost to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def record_subspace_seeds(weight: nn.Parameter, seeds: tuple[int, ...]) -> None:
    """Remember which projection formed this step's gradient; every micro-batch of one step
    must use the same one (otherwise the accumulated m x r gradients mix subspaces)."""
    previous = getattr(weight, "compressed_grad_seeds", None)
    if previous is not None and previous != seeds:
        raise RuntimeError(
            "gradients of one optimizer step were computed with different projections; advance "
            "the CompressionSchedule only once per optimizer step, after the step"
        )
    weight.compressed_grad_seeds = seeds


def subspace_layers(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` trained in subspace mode (those with a compressor and
    ``subspace=True``)."""
    return [
        m for m in model.modules() if getattr(m, "subspace", False) and hasattr(m, "compressor")
    ]


def attach_subspace_proxies(model: nn.Module) -> list[nn.Parameter]:
    """Give every subspace layer a zero parameter ``subspace_proxy`` [m_local, r_local] that
    receives ``G_hat`` as its gradient; returns the new parameters.

    Tensor-parallel attributes are copied from the weight: a column-parallel weight's rows
    and a block-diagonal row-parallel weight's columns are sharded the same way in ``S``. A
    dense row-parallel layer's ``S`` [m, r] is replicated instead (its ``G_hat`` is the same on
    every TP rank, each lifting it with its own rows of P), so it gets no such attributes and
    gradient norms count it once, like any replicated parameter.
    Call after the model is built and before the engine/optimizer is created.
    """
    proxies = []
    for layer in subspace_layers(model):
        weight = layer.weight
        proxy = nn.Parameter(
            torch.zeros(
                weight.shape[0],
                layer.compressor.compressed_width,
                device=weight.device,
                dtype=weight.dtype,
            )
        )
        replicated = layer.compressor.layout.partial_sum
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "allreduce"):
            if hasattr(weight, attr) and not replicated:
                setattr(proxy, attr, getattr(weight, attr))
        layer.subspace_proxy = proxy
        proxies.append(proxy)
    return proxies


FP32Getter = Callable[[nn.Parameter], torch.Tensor]
FP32Setter = Callable[[nn.Parameter, torch.Tensor], None]


class SubspaceMerger:
    """Folds each optimizer step of the ``subspace_proxy`` parameters into the weights.

    ``get_fp32``/``set_fp32`` read and write the optimizer's fp32 value of a proxy (DeepSpeed:
    ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_set_full_fp32_param``, which are
    collective under ZeRO, so every rank must call :meth:`merge`); by default the parameter
    itself is used.
    """

    def __init__(
        self,
        model: nn.Module,
        subspace_scale: float,
        weight_decay: float,
        get_fp32: FP32Getter | None = None,
        set_fp32: FP32Setter | None = None,
    ) -> None:
        self.layers = subspace_layers(model)
        missing = [layer for layer in self.layers if getattr(layer, "subspace_proxy", None) is None]
        if missing:
            raise ValueError("call attach_subspace_proxies(model) before SubspaceMerger(model)")
        self.subspace_scale = subspace_scale
        self.weight_decay = weight_decay
        self.get_fp32 = get_fp32 or (lambda p: p.detach().float())
        self.set_fp32 = set_fp32
        self.masters = {
            id(layer): layer.weight.detach().float().clone()
            for layer in self.layers
            if layer.weight.dtype != torch.float32
        }

    def proxy_parameters(self) -> list[nn.Parameter]:
        return [layer.subspace_proxy for layer in self.layers]

    @torch.no_grad()
    def merge(self, lr: float) -> None:
        """``W <- W (1 - lr wd) + alpha S P^T``, then ``S <- 0``; call once after each step."""
        for layer in self.layers:
            proxy, weight = layer.subspace_proxy, layer.weight
            seeds = getattr(weight, "compressed_grad_seeds", None)
            delta = self.get_fp32(proxy)  # [m, r]
            master = self.masters.get(id(layer), weight)
            if self.weight_decay:
                master.mul_(1.0 - lr * self.weight_decay)
            if seeds is not None:
                projection = layer.compressor.projection(seeds, delta.device, torch.float32)
                master.add_((delta.float() @ projection.t()).mul_(self.subspace_scale))
            if master is not weight:
                weight.copy_(master)
            proxy.zero_()
            if self.set_fp32 is not None:
                self.set_fp32(proxy, torch.zeros_like(delta, dtype=torch.float32))
            weight.compressed_grad_seeds = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = {id(layer): str(i) for i, layer in enumerate(self.layers)}
        return {names[key]: master for key, master in self.masters.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            if id(layer) in self.masters:
                self.masters[id(layer)].copy_(state[str(i)])
