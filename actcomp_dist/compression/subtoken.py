"""``subtoken``: rank-1 sub-token projection (VeLoRA, arXiv 2405.17991).

Each token's n features are split into G groups of size d = n/G (the *global* width, so a
row-parallel shard holds whole groups). Every sub-token is projected on one fixed unit vector
``v`` [d] and only the scalar ``s = x_group . v`` is saved: ``S`` [N, G]. Backward rebuilds
``x_group ~= s v`` and so ``dW[:, group j] = (g^T S)[:, j] v^T``; ``dX`` stays exact.

``v`` is the normalised mean of the first training batch's sub-tokens, then frozen. It is a
buffer (``subtoken_vector``) in the model's state dict, and when the layer is sharded or
replicated the mean is taken over every rank's sub-tokens (the caller passes an ``all_reduce``;
:class:`~actcomp_dist.layers.CompressedLinear` and ``compress_linears`` sum over every rank by
default once ``torch.distributed`` is initialised, the parallel layers always) so all ranks
hold the same ``v``.

**As the paper does** (Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
Projections", NeurIPS 2024): rank 1, ``v`` the normalised first-batch average
(``batch_average_once``), and the gradient scale ``velora_scale``: the reconstructed input
``s v`` is multiplied by it, i.e. ``dW = velora_scale (g^T S) (x) v`` (the bias gradient is
not scaled). The paper compresses the inputs of ``v_proj`` and ``down_proj`` only, with 32
groups and ``velora_scale = 0.1`` for LLaMA fine-tuning, and 1.0 for pretraining.
"""

from __future__ import annotations

import re

import torch

from actcomp_dist.compression.base import AllReduce, Compressed, Compressor, SavedWidth
from actcomp_dist.compression.registry import register_compressor

#: The linears whose inputs VeLoRA compresses, as Hugging Face LLaMA names them (the
#: ``include`` of ``compress_linears``): the value and the down projections.
PAPER_SITES = ("v_proj", "down_proj")


@register_compressor("subtoken")
class SubTokenCompressor(Compressor):
    options = ("groups", "velora_scale")
    ablation_option = "groups"
    # S = X_groups v is linear in X, so g^T S = (g^T X)_groups v: the gradient from the
    # sub-token scalars is the exact gradient with each sub-token projected on v.
    projects_exact_gradient = True

    def __init__(self, config, layout, layer_id, site, schedule) -> None:
        super().__init__(config, layout, layer_id, site, schedule)
        self.group_width = layout.total_width // config.groups
        self.local_groups = self.saved_width(config, layout).per_token
        self.register_buffer("subtoken_vector", torch.zeros(self.group_width))
        self.register_buffer("subtoken_initialized", torch.zeros((), dtype=torch.bool))

    @classmethod
    def saved_width(cls, config, layout) -> SavedWidth:
        groups, width = config.groups, layout.total_width
        if width % groups != 0:
            raise ValueError(
                f"CompressionConfig.groups={groups} must divide the input width {width}"
            )
        group_width = width // groups
        if layout.local_width % group_width != 0:
            raise ValueError(
                f"the local input width {layout.local_width} does not hold whole sub-tokens of "
                f"width {group_width}"
            )
        return SavedWidth(layout.local_width // group_width)  # one scalar per sub-token

    @classmethod
    def parse_ablation_argument(cls, text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
            raise ValueError(
                f"subtoken takes the number of sub-token groups, a positive int such as 32, "
                f"not {text!r}"
            )
        return int(text)

    @torch.no_grad()
    def maybe_initialize(self, x2d: torch.Tensor, all_reduce: AllReduce | None = None) -> None:
        if bool(self.subtoken_initialized):
            return
        sub = x2d.detach().float().reshape(-1, self.group_width)  # [N*G_local, d]
        stats = torch.cat([sub.sum(0), sub.new_tensor([sub.shape[0]])])
        if all_reduce is not None:
            stats = all_reduce(stats)
        mean = stats[:-1] / stats[-1]
        norm = mean.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(
                f"subtoken layer {self.layer_id} site {self.site!r}: the first batch's mean "
                f"sub-token is zero or not finite; cannot choose a projection vector"
            )
        self.subtoken_vector.copy_(mean / norm)
        self.subtoken_initialized.fill_(True)

    def compress(self, x2d: torch.Tensor) -> Compressed:
        if not bool(self.subtoken_initialized):
            raise RuntimeError(
                f"subtoken layer {self.layer_id} site {self.site!r} compressed before its vector "
                f"was initialised"
            )
        v = self.subtoken_vector.to(x2d.dtype)
        scalars = x2d.reshape(x2d.shape[0], self.local_groups, self.group_width) @ v  # [N, G]
        return Compressed(tokens=scalars)

    def lift(self, ghat, basis, seeds):
        # The reconstructed input is velora_scale * s v: scale the (tiny) vector, not dW.
        v = (self.subtoken_vector * self.config.velora_scale).to(ghat.dtype)
        return (ghat.unsqueeze(-1) * v).reshape(ghat.shape[0], self.in_features)  # [m, n]

    def project_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        if not bool(self.subtoken_initialized):
            raise RuntimeError(
                f"subtoken layer {self.layer_id} site {self.site!r} projected a gradient before "
                f"its vector was initialised"
            )
        v = self.subtoken_vector.to(grad.dtype)
        ghat = grad.reshape(grad.shape[0], self.local_groups, self.group_width) @ v  # [m, G]
        return self.lift(ghat, (), ())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, groups={self.local_groups}, "
            f"group_width={self.group_width}, velora_scale={self.config.velora_scale}"
        )
