"""Optimizers for compressed-gradient (``subspace``) training."""

from actcomp_dist.optim.clip import clip_grad_norm_, clip_grad_norm_per_parameter_
from actcomp_dist.optim.subspace_adamw import SubspaceAdamW
from actcomp_dist.subspace import is_subspace_parameter

__all__ = [
    "SubspaceAdamW",
    "clip_grad_norm_",
    "clip_grad_norm_per_parameter_",
    "is_subspace_parameter",
]
