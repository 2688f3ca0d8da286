"""``compress_linears`` on real model code: in-place swap that shares parameters, name
patterns, one shared schedule, layer ids from block indices, and training of a tiny LLaMA-like
transformer (and ``nn.TransformerEncoderLayer``) with every compressing method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actcomp_dist import (
    CompressedLinear,
    CompressionConfig,
    CompressionSchedule,
    compress_linears,
    find_schedule,
)
from actcomp_dist.optim import SubspaceAdamW

# ---------------------------------------------------------------------------------------------
# A tiny LLaMA-like decoder: RMSNorm, causal attention with RoPE and q/k/v/o projections,
# SwiGLU MLP
# with gate/up/down projections, untied embedding and head. Names follow Hugging Face's LLaMA
# so the include patterns below are the ones a user would write.
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [b, heads, s, head_dim] (rotate-half form)."""
    half = x.shape[-1] // 2
    frequencies = 10000.0 ** (-torch.arange(half, dtype=x.dtype) / half)
    angles = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] * frequencies  # [s, half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat(
        [x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], -1
    )


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, heads, s, d / heads]
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = (
            rotary(split(self.q_proj(x))),
            rotary(split(self.k_proj(x))),
            split(self.v_proj(x)),
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(
        self, vocab: int = 32, dim: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _compressed(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


# ---------------------------------------------------------------------------------------------
# Swapping
# ---------------------------------------------------------------------------------------------


def test_swap_shares_parameters_and_keeps_outputs():
    torch.manual_seed(0)
    model = TinyLlama()
    tokens = torch.randint(0, 32, (2, 8))
    before = model(tokens)
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    state_keys = list(model.state_dict())
    cfg = CompressionConfig(method="compact", rank=0.5, seed=3)

    assert compress_linears(model, cfg, include=LLAMA_LINEARS) is model

    swapped = _compressed(model)
    expected = {n for n in originals if n.rsplit(".", 1)[-1] in LLAMA_LINEARS}
    assert set(swapped) == expected
    for name, layer in swapped.items():
        # The same Parameter objects: nothing copied, optimizers built before the swap still work.
        assert layer.weight is originals[name].weight
        assert layer.bias is None
    for name in set(originals) - expected:  # o_proj and lm_head stay plain nn.Linear
        assert type(model.get_submodule(name)) is nn.Linear
    assert list(model.state_dict()) == state_keys
    assert torch.equal(model(tokens), before)


def test_include_and_exclude_patterns():
    model = TinyLlama(layers=3)
    cfg = CompressionConfig(method="compact", rank=0.5)
    compress_linears(model, cfg, include=["*_proj"], exclude=["o_proj", "layers.1.*"])
    assert set(_compressed(model)) == {
        f"layers.{i}.{path}"
        for i in (0, 2)
        for path in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }

    everything = compress_linears(TinyLlama(), cfg)  # include=None takes every nn.Linear
    assert set(_compressed(everything)) == {
        n for n, m in TinyLlama().named_modules() if type(m) is nn.Linear
    }

    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        compress_linears(TinyLlama(), cfg, include=["not_a_layer"])


def test_one_shared_schedule_and_layer_ids_from_block_index():
    model = compress_linears(
        TinyLlama(layers=3),
        CompressionConfig(method="compact", rank=0.5, resample_every=2),
        include=LLAMA_LINEARS,
    )
    layers = _compressed(model)
    schedule = find_schedule(model)
    assert isinstance(schedule, CompressionSchedule) and schedule.resample_every == 2
    for name, layer in layers.items():
        assert layer.schedule is schedule and layer.compressor.schedule is schedule
        assert layer.layer_id == int(name.split(".")[1])
        assert layer.site == name.rsplit(".", 1)[-1]

    seeds_before = {n: layer.compressor.current_seeds() for n, layer in layers.items()}
    assert len(set(seeds_before.values())) == len(layers)  # every (layer, site) differs
    schedule.advance(2)  # one epoch later, every layer moves to a new projection at once
    for name, layer in layers.items():
        assert layer.compressor.current_seeds() != seeds_before[name]

    assert find_schedule(TinyLlama()) is None


def test_compress_linears_uses_a_given_schedule():
    cfg = CompressionConfig(method="compact", resample_every=5)
    schedule = CompressionSchedule(resample_every=5, step=7)
    model = compress_linears(TinyLlama(), cfg, include=["q_proj"], schedule=schedule)
    assert find_schedule(model) is schedule
    assert all(layer.schedule is schedule for layer in _compressed(model).values())

    # A schedule with another period would silently override the config's resample_every.
    with pytest.raises(ValueError, match=r"CompressionConfig.resample_every=50 but the shared"):
        compress_linears(TinyLlama(), cfg.replace(resample_every=50), schedule=schedule)


def test_compressing_twice_does_not_wrap_again():
    cfg = CompressionConfig(method="compact", rank=0.5)
    model = compress_linears(TinyLlama(), cfg, include=LLAMA_LINEARS)
    layers = _compressed(model)
    compress_linears(model, cfg)  # only the remaining plain nn.Linear modules are swapped
    again = _compressed(model)
    assert all(again[name] is layer for name, layer in layers.items())


# ---------------------------------------------------------------------------------------------
# Exactness inside real models: only the compressed weights' gradients may differ
# ---------------------------------------------------------------------------------------------


def _gradients_of_copies(make_model, cfg, include, inputs, loss_fn):
    """Gradients of an uncompressed model and of a compressed copy with identical weights."""
    torch.manual_seed(0)
    reference = make_model()
    compressed = make_model()
    compressed.load_state_dict(reference.state_dict())
    compress_linears(compressed, cfg, include=include)
    x_ref = inputs.clone().requires_grad_(inputs.is_floating_point())
    x_cmp = inputs.clone().requires_grad_(inputs.is_floating_point())
    out_ref, out_cmp = reference(x_ref), compressed(x_cmp)
    loss_fn(out_ref).backward()
    loss_fn(out_cmp).backward()
    return reference, compressed, (out_ref, x_ref), (out_cmp, x_cmp)


@pytest.mark.parametrize("method", ["compact", "lowrank", "subtoken"])
def test_tiny_llama_gradients_exact_except_compressed_weights(method):
    """dX is exact in every compressed layer, so everything upstream of a compressed weight's
    own gradient (outputs, every other parameter's gradient) equals the uncompressed model's."""
    cfg = CompressionConfig(method=method, rank=0.25, groups=8, seed=2)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    reference, compressed, (out_ref, _), (out_cmp, _) = _gradients_of_copies(
        TinyLlama, cfg, LLAMA_LINEARS, tokens, lambda out: out.square().mean()
    )
    assert torch.equal(out_cmp, out_ref)
    compressed_weights = {f"{n}.weight" for n in _compressed(compressed)}
    assert len(compressed_weights) == 12
    reference_grads = dict(reference.named_parameters())
    for name, param in compressed.named_parameters():
        ref = reference_grads[name].grad
        if name in compressed_weights:
            assert param.grad.shape == ref.shape and not torch.equal(param.grad, ref)
        else:
            assert torch.equal(param.grad, ref), name


def test_transformer_encoder_layer():
    """``nn.TransformerEncoderLayer``: linear1/linear2 are swapped (its attention calls
    ``F.multi_head_attention_forward`` with the raw weights, so ``out_proj`` is not a module
    call and is left alone); output, input gradient and every other gradient stay exact."""

    def make_model() -> nn.Module:
        return nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )

    cfg = CompressionConfig(method="compact", rank=0.25, seed=4)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    reference, compressed, (out_ref, x_ref), (out_cmp, x_cmp) = _gradients_of_copies(
        make_model, cfg, None, x, lambda out: out.square().mean()
    )
    assert set(_compressed(compressed)) == {"linear1", "linear2"}
    assert torch.equal(out_cmp, out_ref)
    assert torch.equal(x_cmp.grad, x_ref.grad)
    reference_grads = dict(reference.named_parameters())
    for name, param in compressed.named_parameters():
        if name in ("linear1.weight", "linear2.weight"):
            assert not torch.equal(param.grad, reference_grads[name].grad)
        else:
            assert torch.equal(param.grad, reference_grads[name].grad), name


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

VOCAB, SEQ, BATCH, STEPS, LR = 32, 16, 16, 60, 1e-2


def _train(method: str | None, grad_mode: str = "lift", freeze_linears: bool = False) -> float:
    """Mean loss of the last 5 of STEPS steps on a task that needs attention: the target at
    position t is the input token at position t - 1 (inputs i.i.d. uniform)."""
    torch.manual_seed(0)
    model = TinyLlama(vocab=VOCAB)
    if freeze_linears:
        for name, param in model.named_parameters():
            if name.split(".")[-2] in LLAMA_LINEARS:
                param.requires_grad_(False)
    if method is not None:
        cfg = CompressionConfig(
            method=method, rank=0.25, groups=8, grad_mode=grad_mode, resample_every=10, seed=1
        )
        compress_linears(model, cfg, include=LLAMA_LINEARS)
    # subspace_scale=1 makes a subspace step as large as a lift step at the same lr (CompAct's
    # 0.25 comes with a 4x larger lr); ordinary parameters get plain AdamW either way.
    optimizer = SubspaceAdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, subspace_scale=1.0
    )
    schedule = find_schedule(model)
    if schedule is not None:
        schedule.attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        logits = model(tokens)[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, :-1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if schedule is not None:
        assert schedule.step == STEPS  # advanced once per optimizer step by the hook
    return sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def reference_losses() -> tuple[float, float]:
    """(exact training, training with the compressible linears frozen)."""
    exact, frozen = _train(None), _train(None, freeze_linears=True)
    # The task is only learnable through the attention and MLP linears: freezing them must
    # leave most of the loss in place, or the comparison below would prove nothing.
    assert exact < 0.1 < 1.0 < frozen < math.log(VOCAB)
    return exact, frozen


@pytest.mark.parametrize(
    "method, grad_mode",
    [("compact", "lift"), ("compact", "subspace"), ("lowrank", "lift"), ("subtoken", "lift")],
)
def test_tiny_llama_trains(method, grad_mode, reference_losses):
    """Threshold: the compressed run must close at least half of the gap between the frozen
    control (what embeddings, norms, o_proj and head learn alone) and exact training. Measured
    with these seeds: compact 94%, compact/subspace 80%, lowrank 99%, subtoken 97%; a method
    whose weight gradients were useless would stay near 0%."""
    exact, frozen = reference_losses
    loss = _train(method, grad_mode)
    assert loss < frozen - 0.5 * (frozen - exact)


def test_compression_disabled_saves_the_full_input_then_restores():
    from actcomp_dist.layers import compression_disabled
    from actcomp_dist.memory import saved_activation_bytes

    layer = CompressedLinear(64, 32, compression=CompressionConfig(method="compact", rank=16))
    x = torch.randn(10, 64, requires_grad=True)
    compressed = saved_activation_bytes(lambda: layer(x))
    with compression_disabled(layer):
        full = saved_activation_bytes(lambda: layer(x))
    assert (compressed, full) == (10 * 16 * 4, 10 * 64 * 4)
    assert saved_activation_bytes(lambda: layer(x)) == compressed


def test_velora_paper_sites_select_value_and_down_projections():
    """VeLoRA compresses the inputs of v_proj and down_proj only (PAPER_SITES)."""
    from actcomp_dist.compression.subtoken import PAPER_SITES

    model = TinyLlama(layers=3)
    compress_linears(model, CompressionConfig(method="subtoken", groups=8), include=PAPER_SITES)
    expected = {
        f"layers.{i}.{site}" for i in range(3) for site in ("self_attn.v_proj", "mlp.down_proj")
    }
    assert set(_compressed(model)) == expected
