"""The state a weight trained in CompAct's ``subspace`` mode carries between backward and the
optimizer step, in one object: ``weight.subspace``, a :class:`SubspaceState`.

In ``subspace`` mode backward never forms the m x n weight gradient. It forms
``G_hat = g^T X P`` [m, r] (``P`` [n, r] the layer's projection) and the optimizer updates the
weight along ``P^T``. Between the two, three things must travel together:

- the m x r gradient, summed over the micro-batches of one step (:attr:`SubspaceState.grad`);
- the seeds of the projection that formed it (:attr:`SubspaceState.seeds`). Every micro-batch
  of a step must use the same projection, otherwise the sum mixes subspaces; the seeds are the
  ones stored in the autograd context at forward time, never re-read from the schedule;
- how to rebuild ``P`` from those seeds (:meth:`SubspaceState.projection`, the compressor's).

Who writes and who reads:

- the layer (:func:`actcomp_dist.layers.mark_subspace_parameter`) attaches the state when it is
  built in ``subspace`` mode;
- backward (:mod:`actcomp_dist.autograd`, :mod:`actcomp_dist.parallel.linear`) calls
  :meth:`SubspaceState.accumulate` with each micro-batch's ``G_hat``, or
  :meth:`SubspaceState.record_seeds` when the gradient goes elsewhere (a DeepSpeed proxy
  parameter's ``.grad``);
- an optimizer that keeps the m x r gradient itself (partitioned over data parallelism) sets
  :attr:`SubspaceState.sink`: ``accumulate`` then hands ``G_hat`` to it and keeps nothing;
- :class:`~actcomp_dist.optim.SubspaceAdamW`, the DeepSpeed merger and the gradient clip read
  ``grad``, ``seeds`` and ``projection`` and call :meth:`SubspaceState.clear` after the step.

This module imports nothing from the rest of the package, so the layers (``layers``,
``autograd``, ``parallel``) and the optimizers (``optim``) both depend on it and not on each
other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``projection(seeds, device, dtype) -> P`` [n, r]: a compressor's projection for ``seeds``.
ProjectionFn = Callable[[tuple[int, ...], torch.device, torch.dtype], torch.Tensor]
#: ``sink(weight, ghat)``: an optimizer's receiver of one micro-batch's m x r gradient.
GradientSink = Callable[[torch.nn.Parameter, torch.Tensor], None]


class MixedProjectionsError(RuntimeError):
    """The micro-batches of one optimizer step used different projections."""


class SubspaceState:
    """The m x r gradient of one subspace weight, the seeds of its projection, and how to
    rebuild the projection.

    Attributes:
        grad: ``G_hat`` [m, r] in the weight's dtype, summed over this step's micro-batches
            (``None`` before the first backward of a step, or when a :attr:`sink` takes it).
        seeds: the seeds of the projection that formed this step's gradient (``None`` between
            steps).
        sink: an optimizer's receiver of each micro-batch's ``G_hat`` (``None``: accumulate
            into :attr:`grad`).
    """

    def __init__(self, weight: torch.nn.Parameter, projection: ProjectionFn) -> None:
        self._weight_ref = weight  # the parameter this state belongs to (handed to the sink)
        self._projection = projection
        self.grad: torch.Tensor | None = None
        self.seeds: tuple[int, ...] | None = None
        self.sink: GradientSink | None = None

    def record_seeds(self, seeds: tuple[int, ...]) -> None:
        """Remember which projection formed this step's gradient; a second, different one in
        the same step is a :class:`MixedProjectionsError` (the schedule was advanced between
        micro-batches)."""
        if self.seeds is not None and self.seeds != seeds:
            raise MixedProjectionsError(
                "gradients of one optimizer step were computed with different projections; "
                "advance the CompressionSchedule only once per optimizer step, after the step"
            )
        self.seeds = seeds

    def accumulate(self, ghat: torch.Tensor, seeds: tuple[int, ...]) -> None:
        """Add one micro-batch's ``ghat`` [m, r] (cast to the weight's dtype), formed with the
        projection of ``seeds``, or hand it to the :attr:`sink`."""
        self.record_seeds(seeds)
        ghat = ghat.to(self._weight_ref.dtype)
        if self.sink is not None:
            self.sink(self._weight_ref, ghat)
        elif self.grad is None:
            self.grad = ghat
        else:
            self.grad.add_(ghat)

    def projection(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        seeds: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """``P`` [n, r] for ``seeds`` (default: the recorded :attr:`seeds`)."""
        seeds = self.seeds if seeds is None else seeds
        if seeds is None:
            raise RuntimeError("no projection recorded: no backward ran since the last step")
        return self._projection(seeds, torch.device(device), dtype)

    def clear(self) -> None:
        """Forget this step's gradient and seeds (after the optimizer step)."""
        self.grad = None
        self.seeds = None


def subspace_state(param: torch.Tensor) -> SubspaceState | None:
    """The :class:`SubspaceState` of a weight trained in ``subspace`` mode, else ``None``."""
    state = getattr(param, "subspace", None)
    return state if isinstance(state, SubspaceState) else None


def is_subspace_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` is updated in its compressor's subspace (carries a state)."""
    return subspace_state(param) is not None
