"""Exact memory accounting.

``saved_activation_bytes`` counts the bytes of every tensor autograd saves for backward while a
function runs, through ``torch.autograd.graph.saved_tensors_hooks``: each storage is counted
once (a view and its base share memory), and parameters are excluded (a saved weight often
arrives as a view whose ``_base`` is the parameter). Counting storages, not tensors, is what
the allocator really holds, and it is exact and deterministic on any device — unlike RSS or
allocator peaks, which depend on caching and timing.

``peak_memory_by_category`` wraps PyTorch's ``MemTracker`` for the peak of one training step
split into parameters, gradients, activations, optimizer state and temporaries; on a GPU it
also reports ``torch.cuda.max_memory_allocated``.

``model_state_bytes`` counts what a rank holds between steps and inside one — parameters,
gradients, optimizer state, the subspace merger's fp32 masters, cached projections — from the
live tensors, each storage once (so a parameter that is a view of an engine's flat buffer counts
as the buffer); ``ModelStateProbe`` takes it inside each optimizer step, the only moment where
gradients and Adam's moments coexist.

The analytic model (closed-form predictions of the same saved bytes, and of parameters,
gradients and optimizer state under ZeRO) is :mod:`actcomp_dist.memory_model`; its main
functions are re-exported here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from actcomp_dist.memory_model import (  # noqa: F401  (re-exported)
    ActivationSetting,
    plan_memory,
    predict_model_states,
    predict_saved_activations,
)


def _is_parameter(t: torch.Tensor) -> bool:
    while t is not None:
        if isinstance(t, nn.Parameter):
            return True
        t = t._base
    return False


class SavedTensorCounter:
    """Records every tensor saved for backward inside its context, de-duplicated by storage.

    ``exclude`` adds storages never to count (e.g. a model's buffers). Attribution to modules
    works when ``track_modules`` is given: a saved tensor is charged to the innermost module
    whose forward is running.
    """

    def __init__(
        self,
        exclude: Iterable[torch.Tensor] = (),
        track_modules: nn.Module | None = None,
    ) -> None:
        self._excluded = {self._key(t) for t in exclude}
        self._seen: set[tuple] = set()
        self.total_bytes = 0
        self.by_module: dict[str, int] = defaultdict(int)
        #: Bytes by device type (``cuda``, ``cpu``): what ``offload`` keeps on the host.
        self.by_device: dict[str, int] = defaultdict(int)
        self._root = track_modules
        self._stack: list[str] = []
        self._handles: list[Any] = []

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if _is_parameter(t):
            return t
        key = self._key(t)
        if key in self._excluded or key in self._seen or key[2] == 0:
            return t
        self._seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        self.total_bytes += nbytes
        self.by_module[self._stack[-1] if self._stack else ""] += nbytes
        self.by_device[key[0]] += nbytes
        return t

    def _attach(self) -> None:
        if self._root is None:
            return

        # The hooks must return None: a forward hook's return value replaces the module's
        # output (and a pre-hook's its input).
        def enter(name: str) -> None:
            self._stack.append(name)

        def leave() -> None:
            self._stack.pop()

        for name, module in self._root.named_modules():
            self._handles.append(
                module.register_forward_pre_hook(lambda m, a, name=name: enter(name))
            )
            self._handles.append(
                module.register_forward_hook(lambda m, a, o: leave(), always_call=True)
            )

    def __enter__(self) -> SavedTensorCounter:
        self._attach()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of all tensors saved for backward while ``fn()`` runs (parameters excluded).

    The graph ``fn`` builds is released before returning; call it with the forward of one
    micro-batch (e.g. ``lambda: model(x).sum()``).
    """
    with SavedTensorCounter(exclude) as counter:
        fn()
    return counter.total_bytes


def saved_activation_bytes_by_module(
    model: nn.Module, fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> dict[str, int]:
    """Like :func:`saved_activation_bytes`, split by the innermost module (dotted name; ``""``
    for tensors saved outside any submodule) whose forward saved each tensor."""
    with SavedTensorCounter(exclude, track_modules=model) as counter:
        fn()
    return dict(counter.by_module)


def group_bytes(by_module: dict[str, int], key: Callable[[str], str]) -> dict[str, int]:
    """Sum a per-module breakdown by ``key(name)`` (e.g. the last name component = layer kind)."""
    out: dict[str, int] = defaultdict(int)
    for name, nbytes in by_module.items():
        out[key(name)] += nbytes
    return dict(out)


@contextmanager
def _cuda_peak(device: torch.device, out: dict[str, int]):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)


def peak_memory_by_category(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step_fn: Callable[[], Any] | Sequence[Callable[[], Any]],
) -> dict[str, int]:
    """Peak bytes per category during one call of ``step_fn`` (a full training step).

    With gradient accumulation pass a list of callables instead, one per micro-batch (the last
    one also stepping the optimizer): they run in order, and MemTracker's per-module statistics
    are cleared between them (it refuses a second forward of a module in one session; the peak
    is kept).

    Keys: ``parameters``, ``buffers``, ``gradients``, ``activations``, ``temporaries``,
    ``optimizer_state``, ``other`` and ``total`` (MemTracker's categories at the moment of the
    overall peak); on a GPU also ``cuda_max_memory_allocated``.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    phases = [step_fn] if callable(step_fn) else list(step_fn)
    device = next(model.parameters()).device
    tracker = MemTracker()
    external = [model] + ([optimizer] if optimizer is not None else [])
    tracker.track_external(*external)
    out: dict[str, int] = {}
    with _cuda_peak(device, out), tracker:
        for phase in phases:
            tracker.reset_mod_stats()
            phase()
    snapshot = tracker.get_tracker_snapshot("peak")
    per_device = snapshot.get(device) or next(iter(snapshot.values()))
    for ref_type, nbytes in per_device.items():
        # MemTracker's keys: its ``_MemRefType`` values ("Parameter", "Optstate", ...), "Total".
        name = str(getattr(ref_type, "value", ref_type)).lower()
        out[_CATEGORY_NAMES.get(name, name)] = int(nbytes)
    return out


_CATEGORY_NAMES = {
    "parameter": "parameters",
    "buffer": "buffers",
    "gradient": "gradients",
    "activation": "activations",
    "temp": "temporaries",
    "optstate": "optimizer_state",
    "other": "other",
    "total": "total",
}


# -- model states (measured) --------------------------------------------------------------------

MODEL_STATE_CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer_state",
    "subspace_masters",
    "projection_cache",
    "other",
)


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """``optimizer`` and the optimizers it wraps (DeepSpeed's ZeRO / bf16 optimizers keep the
    torch optimizer they step in ``.optimizer``)."""
    found, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            found.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def _held_tensors(value: Any, depth: int = 3) -> Iterable[torch.Tensor]:
    """Tensors directly in ``value`` or in its lists / tuples / dicts (``depth`` levels)."""
    if isinstance(value, torch.Tensor):
        yield value
        ds_tensor = getattr(value, "ds_tensor", None)  # a ZeRO-3 parameter's own partition
        if isinstance(ds_tensor, torch.Tensor):
            yield ds_tensor
    elif depth > 0 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _held_tensors(item, depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for item in value.values():
            yield from _held_tensors(item, depth - 1)


def _attribute_category(name: str) -> str:
    """Category of a tensor an engine's optimizer holds in attribute ``name`` (DeepSpeed's
    naming: ``averaged_gradients``, ``grads_in_partition``, ``bit16_groups_flat``,
    ``fp16_partitioned_groups_flat``, ``fp32_partitioned_groups_flat``, ``ipg_buffer``...)."""
    name = name.lower()
    if "grad" in name:
        return "gradients"
    if "fp32" in name:
        return "optimizer_state"
    if any(key in name for key in ("bit16", "fp16", "bf16", "param")):
        return "parameters"
    return "other"


def model_state_bytes(
    model: nn.Module, optimizer: Any = None, merger: Any = None
) -> dict[str, int]:
    """Bytes this rank holds of the model states, from the live tensors, each storage counted
    once (a view of a flat buffer is the buffer), by category (:data:`MODEL_STATE_CATEGORIES`)
    and ``total``. The model's buffers are not model state and are left out.

    - ``parameters``: the model's parameters (under ZeRO-3 their partitions);
    - ``gradients``: their ``.grad``, the gradients of the optimizer's own parameters (ZeRO's
      fp32 partitions) and the gradient buffers the engine's optimizer holds;
    - ``optimizer_state``: the torch optimizer's parameters that are not the model's (ZeRO's
      fp32 master partitions) and its state (Adam's moments);
    - ``subspace_masters``: the fp32 masters of a :class:`~actcomp_dist.optim.subspace_proxy.
      SubspaceMerger` (this rank's rows); the m x r gradients and Adam moments a
      :class:`~actcomp_dist.optim.subspace_partitioned.PartitionedSubspaceAdam` keeps count
      as ``gradients`` and ``optimizer_state``;
    - ``projection_cache``: the projections ``compact`` layers keep (``cache_projection``);
    - ``other``: any other tensor the engine's optimizer holds (e.g. a reduction bucket).

    ``optimizer`` may be a torch optimizer or an engine's wrapper of one (DeepSpeed's ZeRO
    optimizers). Gradients exist only between backward and the end of the optimizer step, and
    Adam creates its moments in its first step: measure inside a step
    (:class:`ModelStateProbe`) to see them.
    """
    seen: set[tuple] = set()
    out = dict.fromkeys(MODEL_STATE_CATEGORIES, 0)

    def add(category: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or tensor.device.type == "meta":
            return
        key = _storage_key(tensor)
        if key in seen or key[2] == 0:
            return
        seen.add(key)
        if category is not None:
            out[category] += key[3]

    for buffer in model.buffers():
        add(None, buffer)
    parameters = list(model.parameters())
    for param in parameters:
        for tensor in _held_tensors(param, depth=0):
            add("parameters", tensor)
    for param in parameters:
        add("gradients", param.grad)
    torch_optimizers = _torch_optimizers(optimizer)
    for opt in torch_optimizers:
        for group in opt.param_groups:
            for param in group["params"]:
                add("optimizer_state", param)
                add("gradients", param.grad)
        for state in opt.state.values():
            for tensor in _held_tensors(state):
                add("optimizer_state", tensor)
    if merger is not None:
        for category, tensors in merger.state_tensors().items():
            for tensor in tensors:
                add(category, tensor)
    for module in model.modules():
        cache = getattr(getattr(module, "compressor", None), "_cache", None)
        if isinstance(cache, torch.Tensor):
            add("projection_cache", cache)
    wrapper = optimizer
    while wrapper is not None and not isinstance(wrapper, torch.optim.Optimizer):
        for name, value in vars(wrapper).items():
            if isinstance(value, nn.Module):
                continue
            for tensor in _held_tensors(value):
                add(_attribute_category(name), tensor)
        wrapper = getattr(wrapper, "optimizer", None)
    out["total"] = sum(out[c] for c in MODEL_STATE_CATEGORIES)
    return out


class ModelStateProbe:
    """Measures :func:`model_state_bytes` at every step of the torch optimizer inside
    ``optimizer`` (after its update, before the engine frees the gradients it stepped with:
    gradients, Adam's moments and fp32 masters all exist then). An engine that steps its
    parameter groups one at a time (DeepSpeed ZeRO 1/2) fires the hook once per group; the
    largest total of one optimizer step is kept in ``last``; call :meth:`measure` after the
    last backward of a step too (before the engine's step reduces and frees gradients) and
    :meth:`reset` before each step. ``active``: measure in this step (a walk over every
    parameter, gradient and optimizer tensor: not free on a small model); while ``False`` the
    hook does nothing and ``last`` stays as :meth:`reset` left it.
    """

    def __init__(self, model: nn.Module, optimizer: Any, merger: Any = None) -> None:
        self.model, self.optimizer, self.merger = model, optimizer, merger
        self.last: dict[str, int] | None = None
        self.active = True
        self._handles = [
            opt.register_step_post_hook(lambda *args: self.measure())
            for opt in _torch_optimizers(optimizer)[-1:]
        ]

    def measure(self) -> None:
        if not self.active:
            return
        current = model_state_bytes(self.model, self.optimizer, self.merger)
        if self.last is None or current["total"] > self.last["total"]:
            self.last = current

    def reset(self) -> None:
        self.last = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
