"""LoRAct's ``lowrank:R`` storage (``actcomp_dist.storage.LowRankStorage``) and the ``"loract"``
preset of ``actcomp_dist.hf``.

References:

- **The factorisation against float64 and closed forms**: ``A_hat = L Q^T = A Q Q^T``. For
  ``rank(A) <= k`` the sampled columns span ``A``'s column space and ``A_hat = A``: in float64
  to float64 rounding; in float32 within the rounding of a QR and two products, amplified by the
  conditioning of ``Y = A^T A[:, S]`` (computed here in float64). For any ``A`` the error is
  ``||A (I - Q Q^T)||_F`` and never below the best rank-k error (Eckart-Young).
- **Bytes**: ``(N + n) k`` elements per factorised tensor, exactly; the norm's factors are kept
  once for the norm and every projection (or LoRA A) that reads its output.
- **Model**: the forward is unchanged (bit-identical loss); with ``R`` at least the number of
  tokens the activations are exactly representable, and the gradients are as accurate as the
  unpatched model's against float64 (the wiring of every factor is right); at the preset's
  rank the saved bytes equal the closed form.
Policies applied with ``loss_chunk_tokens=None`` (transformers' loss; see test_hf_policy).
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf import apply_memory_policy
from actcomp_dist.hf.policy import LORACT_RANK_DIVISOR
from actcomp_dist.memory import saved_activation_bytes, saved_activation_bytes_by_module
from actcomp_dist.storage import LowRankStorage, storage_for
from tests.helpers.hf_models import (
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    TOKENS,
    assert_as_accurate_as_unpatched,
    causal_lm_loss,
    float64_grads,
    loss_and_grads,
    make_lora_model,
    make_model,
    random_tokens,
)
from tests.helpers.tolerances import gamma

peft = pytest.importorskip("peft")


def _low_rank_matrix(rows, cols, rank, dtype, seed=0):
    """``U diag(s) V^T`` with orthonormal U, V and singular values in [1, 2]."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64)).Q
    s = 1 + torch.rand(rank, generator=generator, dtype=torch.float64)
    return ((u * s) @ v.t()).to(dtype)


@pytest.mark.parametrize("rank", [3, 8])
def test_low_rank_input_is_reconstructed_against_float64(rank):
    n, k, tokens = 64, 8, 48
    storage = LowRankStorage(k)
    a64 = _low_rank_matrix(tokens, n, rank, torch.float64)
    a_hat64 = storage.unpack(storage.pack(a64), a64)
    assert (a_hat64 - a64).norm() <= 64 * gamma(n * k, torch.float64) * a64.norm()
    a32 = a64.float()
    a_hat32 = storage.unpack(storage.pack(a32), a32)
    # float32: a QR of Y (backward stable: relative error gamma_{nk} in Q's columns, amplified
    # by the condition number of Y on its range, sigma_1 / sigma_rank, computed in float64)
    # and the products A Q, L Q^T (gamma_n, gamma_k relative); factor 4 for the two uses of Q.
    generator = torch.Generator().manual_seed(0)  # LowRankStorage's columns (seed 0)
    columns = torch.randperm(n, generator=generator)[:k]
    singular = torch.linalg.svdvals(a64.t() @ a64[:, columns])
    condition = (singular[0] / singular[rank - 1]).item()
    bound = (
        4 * gamma(n * k, torch.float32) * condition + 2 * gamma(n + k, torch.float32)
    ) * a64.norm().item()
    assert (a_hat32.double() - a64).norm().item() <= bound


def test_any_input_error_is_the_projection_residual_and_above_eckart_young():
    n, k, tokens = 64, 8, 48
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    storage = LowRankStorage(k)
    low, q = storage.pack(a)
    assert low.shape == (tokens, k) and q.shape == (n, k)
    # Householder QR (torch.linalg.qr) loses orthogonality by at most a small multiple of
    # n k u (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 19.4: the
    # constant is of order one; k taken here), and each entry of Q^T Q is an n-term dot product
    # of unit vectors (gamma_n by Cauchy-Schwarz).
    orthogonality = (q.t() @ q - torch.eye(k, dtype=torch.float64)).abs().max().item()
    assert orthogonality <= k * gamma(n * k, torch.float64) + gamma(n, torch.float64)
    error = (storage.unpack((low, q), a) - a).norm()
    residual = (a - a @ q @ q.t()).norm()
    assert abs(error - residual) <= 16 * gamma(n + k, torch.float64) * a.norm()
    singular = torch.linalg.svdvals(a)
    # Eckart-Young: no rank-k approximation beats the tail of the singular values. Both sides
    # are float64 from the same a: the SVD is backward stable (each singular value within a
    # small multiple of u ||a||, taken as gamma_{tokens n}) and the norms are sums of
    # tokens * n squares.
    tail = singular[k:].pow(2).sum().sqrt()
    assert error >= tail - 2 * gamma(tokens * n, torch.float64) * a.norm()
    assert error < a.norm()  # it keeps something


def test_factors_are_deterministic_bytes_exact_and_global_rng_untouched():
    storage = storage_for("lowrank:8")
    x = torch.randn(2, 16, 64)
    state = torch.get_rng_state()
    first, second = storage.pack(x), storage.pack(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    kept = sum(t.numel() * t.element_size() for t in first)
    assert kept == storage.saved_bytes(x.numel(), 64, dtype_bytes=4) == (32 + 64) * 8 * 4


def _authors_reconstruction(a64: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' rule (github.com/shijxcs/meft, commit 78695c1, ``linalg/qb.py``
    ``randomized_qb`` with its defaults: ``test_matrix="subs"``, ``niter=0``, no
    oversampling), written out in float64 for ``A`` [N, n] with N > n: it factorises ``A^T``,
    so the test matrix is ``k`` of the ``n`` feature columns, ``torch.randperm(n)[:k]`` from
    the global CPU generator; ``Y = A^T A[:, S] / sqrt(N)``, ``Q = qr(Y)``, ``A_hat = A Q Q^T``.
    Returns ``A_hat`` and ``Y``."""
    tokens, n = a64.shape
    columns = torch.randperm(n)[:k]
    y = a64.t() @ a64[:, columns] / tokens**0.5
    q = torch.linalg.qr(y).Q
    return a64 @ q @ q.t(), y


def test_fresh_columns_follow_the_authors_draw_against_float64():
    """``fresh_columns=True`` (what ``actcomp_dist.hf`` uses): every pack draws its columns
    from the global CPU generator as the authors' code does, so with the generator seeded alike
    each pack reconstructs what the authors' rule (float64, by hand) gives for that draw, two
    packs of one tensor differ, and the generator ends where two of the authors' draws leave
    it; ``skip`` takes the same draw without factorising."""
    tokens, n, k = 48, 64, 8
    a64 = torch.randn(tokens, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    storage = LowRankStorage(k, fresh_columns=True)
    torch.manual_seed(11)
    packs = [storage.pack(a64), storage.pack(a64)]
    after_packs = torch.get_rng_state()
    torch.manual_seed(11)
    rules = [_authors_reconstruction(a64, k), _authors_reconstruction(a64, k)]
    assert torch.equal(torch.get_rng_state(), after_packs)
    torch.manual_seed(11)
    storage.skip(n)
    storage.skip(n)
    assert torch.equal(torch.get_rng_state(), after_packs)
    for packed, (rule, y) in zip(packs, rules, strict=True):
        # Both are float64 projections onto the range of the same Y (up to the 1/sqrt(N) the
        # authors scale it by, which leaves the range alone): they differ by the rounding of
        # two QRs of Y and three products, amplified by Y's conditioning on its range
        # (perturbation of an orthogonal projector; Higham, 2nd ed., Thm 19.4 for the QR).
        singular = torch.linalg.svdvals(y)
        condition = (singular[0] / singular[-1]).item()
        bound = (4 * gamma(n * k, torch.float64) * condition + 3 * gamma(n, torch.float64)) * (
            a64.norm().item()
        )
        assert (storage.unpack(packed, a64) - rule).norm().item() <= bound
    # Two draws, two bases: far apart (by the size of the approximation, not rounding).
    assert (rules[0][0] - rules[1][0]).norm() > 0.1 * a64.norm()


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_full_rank_low_rank_storage_gives_exact_gradients(lora):
    """R >= tokens: every factorised activation has rank <= R, so backward is exact up to
    rounding; this checks that each factor reaches its reader (norm, q/k/v, gate/up, LoRA A)."""
    build = make_lora_model if lora else make_model
    tokens = random_tokens()
    model = build()
    loss, grads = loss_and_grads(model, tokens)
    reference = float64_grads(model, tokens)
    apply_memory_policy(
        model,
        {"norm": f"lowrank:{HIDDEN}", "swiglu": f"lowrank:{INTERMEDIATE}"},
        loss_chunk_tokens=None,
    )
    patched_loss, patched_grads = loss_and_grads(model, tokens)
    assert torch.equal(patched_loss, loss)
    assert_as_accurate_as_unpatched(patched_grads, grads, reference, torch.float32)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loract_preset_saved_bytes_closed_form(lora):
    """Against ``exact``: each decoder-layer norm keeps ``(N + h) k_h`` instead of its output
    (``N h``; its readers kept the same tensor), each MLP ``2 (N + I) k_I`` instead of gate and
    up (``2 N I``); ``k = hidden // 8`` for both. The readers keep nothing of their own."""
    build = make_lora_model if lora else make_model
    tokens = random_tokens()
    model = apply_memory_policy(build(), "exact", loss_chunk_tokens=None)
    exact = saved_activation_bytes(lambda: causal_lm_loss(model, tokens))
    loss = causal_lm_loss(model, tokens).detach()
    apply_memory_policy(model, "loract", loss_chunk_tokens=None)
    loract = saved_activation_bytes(lambda: causal_lm_loss(model, tokens))
    assert torch.equal(causal_lm_loss(model, tokens).detach(), loss)  # forward unchanged
    k_h = k_i = HIDDEN // LORACT_RANK_DIVISOR
    norm_saving = TOKENS * HIDDEN - (TOKENS + HIDDEN) * k_h
    mlp_saving = 2 * (TOKENS * INTERMEDIATE - (TOKENS + INTERMEDIATE) * k_i)
    # Under LoRA both compute down's A from (kept or packed) gate and up and B keeps ``A h``
    # [N, r] in both: no difference there.
    assert exact - loract == 4 * LAYERS * (2 * norm_saving + mlp_saving)
    by_module = saved_activation_bytes_by_module(model, lambda: causal_lm_loss(model, tokens))
    for name, nbytes in by_module.items():
        if name.endswith(("k_proj.lora_A.default", "v_proj.lora_A.default", "up_proj")):
            pytest.fail(f"{name} keeps {nbytes} bytes of its own")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loract_preset_draws_alike_under_hf_gradient_checkpointing(reentrant, lora):
    """The ``"loract"`` preset draws its columns from the global RNG in every call; under HF
    gradient checkpointing (either variant) the norms and the MLP take the draws of the run
    without it (reentrant: its no-grad first pass skips them, the re-run packs with the RNG
    state restored), so the loss, every gradient and the global RNG state after the step are
    bit-identical (the same ops on the same inputs and factors)."""
    tokens = random_tokens()
    build = make_lora_model if lora else make_model
    plain = apply_memory_policy(build(), "loract", loss_chunk_tokens=None)
    torch.manual_seed(7)
    loss, grads = loss_and_grads(plain, tokens)
    rng_after = torch.get_rng_state()
    model = apply_memory_policy(build(), "loract", loss_chunk_tokens=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(7)
    checkpointed_loss, checkpointed = loss_and_grads(model, tokens)
    assert torch.equal(checkpointed_loss, loss)
    assert set(checkpointed) == set(grads)
    for name, grad in grads.items():
        assert torch.equal(checkpointed[name], grad), name
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_loract_refusals_leave_the_model_untouched():
    config = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    model = peft.get_peft_model(make_model(), config)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="q_proj adapter 'default' has Dropout"):
        apply_memory_policy(model, "loract", loss_chunk_tokens=None)
    with pytest.raises(ValueError, match="choose one"):
        apply_memory_policy(
            make_model(), "loract", compression=CompressionConfig("compact"), loss_chunk_tokens=None
        )
    with pytest.raises(ValueError, match="memory.policy.attention='lowrank:4' is not served"):
        apply_memory_policy(model, {"attention": "lowrank:4"}, loss_chunk_tokens=None)
    assert [type(m) for m in model.modules()] == classes
