"""Subspace training inside an engine that owns the optimizer (DeepSpeed ZeRO 0).

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
paper. ``alpha`` may differ by site (:data:`SubspaceScale`; CompAct halves it on the attention
output projection).

``W`` itself is not given to the engine's optimizer. When the model runs in bf16/fp16 the
merger keeps an fp32 master copy of ``W`` so that small updates are not lost to rounding,
partitioned by output rows over the data-parallel ranks (see :class:`SubspaceMerger`).

The trainer uses proxies at ZeRO 0 only: ZeRO 1/2 partition optimizer state and gradients but
keep every 16-bit parameter whole on every rank, so a proxy would cost ``2 m r`` bytes per rank
at any data-parallel size. There
:class:`~actcomp_dist.optim.subspace_partitioned.PartitionedSubspaceAdam` (a
:class:`SubspaceMerger` without proxies) keeps the m x r state itself, partitioned by rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.subspace import subspace_state

#: CompAct's alpha: one number for every subspace weight, or a map from a layer's site
#: (``qkv``, ``proj``, ``fc1``, ``fc2``) to its alpha with ``"default"`` for the sites it does
#: not name. The paper scales the attention output projection's update by
#: ``alpha_out = alpha / 2``: ``{"default": 0.25, "proj": 0.125}``.
SubspaceScale = float | Mapping[str, float]


def site_subspace_scale(scale: SubspaceScale, site: str) -> float:
    """The alpha of a subspace weight at ``site`` (``scale[site]``, else ``scale["default"]``
    for a map); a map without ``"default"`` or an alpha that is not > 0 is a ``ValueError``."""
    if isinstance(scale, Mapping):
        if "default" not in scale:
            raise ValueError(
                f"subspace_scale={dict(scale)!r} needs a 'default' entry (the alpha of the sites "
                f"it does not name)"
            )
        value = scale.get(site, scale["default"])
    else:
        value = scale
    if not value > 0:
        raise ValueError(f"subspace_scale for site {site!r} must be > 0, got {value!r}")
    return float(value)


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


def skip_subspace_weights_in_zero0_reduction(engine, model: nn.Module) -> None:
    """At ZeRO 0 DeepSpeed's data-parallel reduction collects every parameter that requires a
    gradient and gives one without a gradient a zero tensor, so that all ranks reduce the same
    sizes. A subspace weight never has a gradient (its m x r one is on its proxy): each step
    would allocate an m x n zero gradient per compressed weight and all-reduce it. Hide those
    weights from that one collection (every rank hides the same ones)."""
    weights = [layer.weight for layer in subspace_layers(model) if layer.weight.requires_grad]
    collect = engine._get_gradients_for_reduction

    def gradients_for_reduction():
        for weight in weights:
            weight.requires_grad_(False)
        try:
            return collect()
        finally:
            for weight in weights:
                weight.requires_grad_(True)

    engine._get_gradients_for_reduction = gradients_for_reduction


FP32Getter = Callable[[nn.Parameter], torch.Tensor]
FP32Setter = Callable[[nn.Parameter, torch.Tensor], None]


def owned_rows(rows: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """``(start, end)`` of the rows data-parallel rank ``dp_rank`` owns of a weight with
    ``rows`` rows: contiguous chunks of ``ceil(rows / dp_size)`` (the last ones may be short or
    empty)."""
    chunk = -(-rows // dp_size)
    start = min(rows, dp_rank * chunk)
    return start, min(rows, start + chunk)


class SubspaceMerger:
    """Folds each optimizer step of the ``subspace_proxy`` parameters into the weights.

    ``get_fp32``/``set_fp32`` read and write the optimizer's fp32 value of a proxy (DeepSpeed:
    ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_set_full_fp32_param``, which are
    collective under ZeRO, so every rank must call :meth:`merge`); by default the parameter
    itself is used.

    **Partitioned fp32 masters.** A weight kept in bf16/fp16 needs an fp32 master (m x n, as
    large as the weight twice over). With ``process_group`` (the data-parallel group) each of
    its D ranks keeps the master of its own contiguous ``ceil(m / D)`` output rows only
    (:func:`owned_rows`), applies the step to those rows, and the updated 16-bit rows are
    all-gathered into every rank's weight — ZeRO-1's partition of optimizer state applied to
    the one piece DeepSpeed cannot hold. Rows, not a flat split, because a row's update
    ``alpha * S[i] P^T`` needs only row ``i`` of ``S``: no rank forms the whole m x n update
    either. Each output row is the same length-r product at every D (a GEMM may block fewer
    rows differently: the results agree within the rounding of that product, which the tests
    bound). fp32 weights are their own masters: there is nothing
    to partition, and every rank applies the whole (identical) update without communication.

    Why not DeepSpeed's own partitioned state: DeepSpeed keeps fp32 masters only of the
    parameters its optimizer steps, with their full m x n gradients in its flat buffers —
    exactly what ``subspace`` mode exists to avoid.
    """

    def __init__(
        self,
        model: nn.Module,
        subspace_scale: SubspaceScale,
        weight_decay: float,
        get_fp32: FP32Getter | None = None,
        set_fp32: FP32Setter | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.layers = subspace_layers(model)
        self._check_layers()
        self.subspace_scale = subspace_scale
        # id(layer) -> the alpha of its site
        self.scales = {
            id(layer): site_subspace_scale(subspace_scale, layer.compressor.site)
            for layer in self.layers
        }
        self.weight_decay = weight_decay
        self.get_fp32 = get_fp32 or (lambda p: p.detach().float())
        self.set_fp32 = set_fp32
        self.process_group = process_group
        self.dp_size = dist.get_world_size(process_group) if process_group is not None else 1
        self.dp_rank = dist.get_rank(process_group) if process_group is not None else 0
        # id(layer) -> (first row, fp32 master of this rank's rows [end - start, n])
        self.masters: dict[int, tuple[int, torch.Tensor]] = {}
        for layer in self.layers:
            weight = layer.weight
            if weight.dtype == torch.float32:
                continue
            start, end = owned_rows(weight.shape[0], self.dp_rank, self.dp_size)
            self.masters[id(layer)] = (start, weight.detach()[start:end].float().clone())

    def _check_layers(self) -> None:
        missing = [layer for layer in self.layers if getattr(layer, "subspace_proxy", None) is None]
        if missing:
            raise ValueError("call attach_subspace_proxies(model) before SubspaceMerger(model)")

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this object keeps, by model-state category (for the memory probe)."""
        return {"subspace_masters": [master for _, master in self.masters.values()]}

    def proxy_parameters(self) -> list[nn.Parameter]:
        return [layer.subspace_proxy for layer in self.layers]

    def master_bytes(self) -> int:
        """Bytes of the fp32 masters this rank keeps."""
        return sum(m.numel() * m.element_size() for _, m in self.masters.values())

    @torch.no_grad()
    def merge(self, lr: float) -> None:
        """``W <- W (1 - lr wd) + alpha S P^T``, then ``S <- 0``; call once after each step
        (collective over ``process_group`` when masters are partitioned)."""
        for layer in self.layers:
            proxy, weight = layer.subspace_proxy, layer.weight
            state = subspace_state(weight)
            seeds = state.seeds if state is not None else None
            delta = self.get_fp32(proxy)  # [m, r]
            start, master = self.masters.get(id(layer), (0, weight))
            if self.weight_decay:
                master.mul_(1.0 - lr * self.weight_decay)
            if seeds is not None:
                # The P the forward used (the weight's dtype, so the projection cache holds
                # one dtype), widened: the gradient G_hat = g^T X P was formed with it.
                projection = state.projection(delta.device, weight.dtype).float()  # [n, r]
                rows = delta[start : start + master.shape[0]].float()  # [rows, r]
                master.add_((rows @ projection.t()).mul_(self.scales[id(layer)]))
            if master is not weight:
                self._gather_rows(weight, master)
            proxy.zero_()
            if self.set_fp32 is not None:
                self.set_fp32(proxy, torch.zeros_like(delta, dtype=torch.float32))
            if state is not None:
                state.clear()

    def _gather_rows(self, weight: torch.Tensor, master: torch.Tensor) -> None:
        """Every rank's updated rows, rounded to the weight's dtype, into ``weight``."""
        if self.dp_size == 1:
            weight.copy_(master)
            return
        rows, chunk = weight.shape[0], -(-weight.shape[0] // self.dp_size)
        # One padded chunk per rank ([D * chunk, n]); all_gather of equal shapes works on
        # gloo and NCCL alike.
        gathered = torch.empty(
            (self.dp_size * chunk, *weight.shape[1:]), device=weight.device, dtype=weight.dtype
        )
        local = torch.zeros((chunk, *weight.shape[1:]), device=weight.device, dtype=weight.dtype)
        local[: master.shape[0]].copy_(master)
        dist.all_gather(list(gathered.chunk(self.dp_size)), local, group=self.process_group)
        weight.copy_(gathered[:rows])

    def state_dict(self) -> dict[str, Any]:
        """This rank's masters (its rows only) and the partition they belong to."""
        names = {id(layer): str(i) for i, layer in enumerate(self.layers)}
        return {
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "masters": {names[key]: master for key, (_, master) in self.masters.items()},
        }

    @torch.no_grad()
    def reset_state(self) -> None:
        """Masters from the weights as they are now (a resume that keeps the weights and
        starts the optimizer state fresh)."""
        for layer in self.layers:
            if id(layer) in self.masters:
                start, master = self.masters[id(layer)]
                master.copy_(layer.weight.detach()[start : start + master.shape[0]])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "masters" not in state:  # saved before the masters were partitioned: whole weights
            for i, layer in enumerate(self.layers):
                if id(layer) in self.masters:
                    start, master = self.masters[id(layer)]
                    master.copy_(state[str(i)][start : start + master.shape[0]])
            return
        if (state["dp_size"], state["dp_rank"]) != (self.dp_size, self.dp_rank):
            raise ValueError(
                f"subspace masters were saved by data-parallel rank {state['dp_rank']} of "
                f"{state['dp_size']}; this is rank {self.dp_rank} of {self.dp_size} (resume "
                f"with the same data-parallel size)"
            )
        for i, layer in enumerate(self.layers):
            if id(layer) in self.masters:
                self.masters[id(layer)][1].copy_(state["masters"][str(i)])
