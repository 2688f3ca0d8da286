"""The fused output layer + cross-entropy of ``apply_memory_policy(..., loss_chunk_tokens=N)``
(:mod:`actcomp_dist.hf.loss`) against transformers' own ``ForCausalLMLoss``.

References:

- **Loss**: both the fused and transformers' loss are evaluated in fp32 from the same fp32 hidden
  states (the ``exact`` blocks' forward is bit-identical to the unpatched one), so they are two
  roundings of one quantity: per labelled token ``logsumexp_v(z) - z_y`` with ``z = h W^T``,
  then the sum over the ``n`` labelled tokens over the normaliser. ``logsumexp`` and ``z_y``
  move by at most ``max_v |dz_v|`` each when the logits are rounded, ``|dz_v| <= gamma_h
  (|h| |W|^T)_v``; the fp32 log-sum-exp and the sum add ``gamma_{V + n}`` of ``|lse| + |z_y|``
  (:func:`tests.helpers.hf_models.fused_loss_rounding_bound`; each evaluation within it of the
  exact value, so they differ by at most twice it). A wrong term (a token counted twice, a wrong normaliser) moves the loss by
  about ``loss / n``, far above that bound in fp32. Under bf16 autocast the logits' own
  rounding (``3 u_bf16`` of ``|h| |W|``) makes the bound about ``loss / n`` at these shapes: that
  test catches a wrong normaliser or a missing upcast, not one token.
- **Gradients**: the same closed form ``(softmax - onehot) / normaliser`` propagated through
  the same GEMMs, a chunk of rows at a time. Both are compared with the unpatched model run in
  float64: the patched error must be no larger than twice the unpatched one plus one rounding
  of the largest reference value
  (:func:`tests.helpers.hf_models.assert_as_accurate_as_unpatched`).
- **Memory**: exact bytes. The causal LM's own forward (where the fused function runs) keeps
  ``dh`` of the labelled tokens ``[n, h]`` and a bool mask ``[N]``, plus ``dW`` ``[V, h]``
  when the head is trained; nothing else in the model changes.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.hf import apply_memory_policy
from actcomp_dist.hf.loss import linear_cross_entropy
from actcomp_dist.memory import saved_activation_bytes_by_module
from tests.helpers.hf_models import (
    BATCH,
    HIDDEN,
    SEQ,
    VOCAB,
    assert_as_accurate_as_unpatched,
    fused_loss_rounding_bound,
    make_lora_model,
    make_model,
    random_tokens,
)
from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_as_accurate_as

peft = pytest.importorskip("peft")
PROMPT = 5  # labels -100 on the first PROMPT tokens of every row, as a prompt / response task


def _labels(tokens: torch.Tensor) -> torch.Tensor:
    labels = tokens.clone()
    labels[:, :PROMPT] = -100
    return labels


def _labelled_tokens(labels: torch.Tensor) -> int:
    """Tokens with a label after transformers' shift (token t predicts label t + 1)."""
    return int((labels[:, 1:] != -100).sum())


def _run(model, tokens, labels, autocast=False, **kwargs):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=tokens, labels=labels, **kwargs).loss
    loss.backward()
    values = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    values["loss"] = loss.detach().reshape(1)
    return values


def _build(kind: str):
    if kind == "lora":
        return make_lora_model()
    return make_model(tie_word_embeddings=kind == "full_tied")


@pytest.mark.parametrize("kind", ["lora", "full", "full_tied"])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("num_items", [None, 11])
def test_fused_loss_as_accurate_as_transformers_loss(kind, chunk, num_items):
    """Chunks of one token, of a size that does not divide the labelled tokens, and one chunk;
    the Trainer's ``num_items_in_batch`` normaliser or the mean; a frozen head (LoRA), a trained
    one, and one tied to the input embedding."""
    tokens = random_tokens()
    labels = _labels(tokens)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    model = _build(kind)
    unpatched = _run(model, tokens, labels, **kwargs)
    reference = _run(_build(kind).double(), tokens, labels, **kwargs)
    apply_memory_policy(model, "exact", loss_chunk_tokens=chunk)
    patched = _run(model, tokens, labels, **kwargs)
    loss, unpatched_loss = patched.pop("loss"), unpatched.pop("loss")
    bound = fused_loss_rounding_bound(model, tokens, labels, num_items)
    assert (loss - unpatched_loss).abs().item() <= bound, (loss, unpatched_loss, bound)
    del reference["loss"]
    assert_as_accurate_as_unpatched(patched, unpatched, reference, torch.float32, kind)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fused_loss_under_bf16_autocast(kind):
    """The head's GEMM in bf16 under autocast, as transformers' ``lm_head``; the loss in fp32."""
    tokens = random_tokens()
    labels = _labels(tokens)
    model = _build(kind)
    unpatched = _run(model, tokens, labels, autocast=True)
    reference = _run(_build(kind).double(), tokens, labels)
    apply_memory_policy(model, "exact")
    patched = _run(model, tokens, labels, autocast=True)
    loss, unpatched_loss = patched.pop("loss"), unpatched.pop("loss")
    bound = fused_loss_rounding_bound(model, tokens, labels, None, autocast=True)
    assert (loss - unpatched_loss).abs().item() <= bound, (loss, unpatched_loss, bound)
    del reference["loss"]
    assert_as_accurate_as_unpatched(patched, unpatched, reference, torch.bfloat16, kind)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fused_loss_keeps_no_logits(kind):
    tokens = random_tokens()
    labels = _labels(tokens)
    model = _build(kind)
    apply_memory_policy(model, "exact", loss_chunk_tokens=None)
    transformers_loss = saved_activation_bytes_by_module(
        model, lambda: model(input_ids=tokens, labels=labels).loss
    )
    apply_memory_policy(model, "exact")
    fused = saved_activation_bytes_by_module(
        model, lambda: model(input_ids=tokens, labels=labels).loss
    )
    causal_lm = "base_model.model" if kind == "lora" else ""
    tokens_total = BATCH * SEQ
    # dh of the labelled tokens (fp32) and the bool mask of where they go; dW when trained.
    expected = _labelled_tokens(labels) * HIDDEN * 4 + tokens_total
    if kind == "full":
        expected += VOCAB * HIDDEN * 4
    assert fused[causal_lm] == expected
    # transformers keeps at least the fp32 log-probabilities [N, V] there.
    assert transformers_loss[causal_lm] >= tokens_total * VOCAB * 4
    others = {name: n for name, n in fused.items() if name != causal_lm}
    assert others == {name: n for name, n in transformers_loss.items() if name != causal_lm}


def test_without_labels_or_grad_the_forward_is_transformers():
    tokens = random_tokens()
    labels = _labels(tokens)
    model = make_model()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        eval_loss = model(input_ids=tokens, labels=labels).loss
    apply_memory_policy(model, "exact")
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, logits)
        out = model(input_ids=tokens, labels=labels)
        assert torch.equal(out.loss, eval_loss) and torch.equal(out.logits, logits)
    assert torch.equal(model(input_ids=tokens).logits, logits)
    # Training: the loss only; no logits were formed for all tokens at once.
    out = model(input_ids=tokens, labels=labels)
    assert out.logits is None
    as_tuple = model(input_ids=tokens, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], out.loss)


def _classes(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("chunk", [0, True, 2.5, "1024"])
def test_bad_chunk_sizes_are_refused_and_nothing_is_patched(chunk):
    model = make_model()
    classes = _classes(model)
    with pytest.raises(ValueError, match="loss_chunk_tokens=.* must be an int >= 1"):
        apply_memory_policy(model, "exact", loss_chunk_tokens=chunk)
    assert _classes(model) == classes


def test_a_wrapped_head_or_another_loss_is_refused_and_nothing_is_patched():
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = peft.get_peft_model(make_model(), config)
    classes = _classes(model)
    with pytest.raises(ValueError, match=r"base_model\.model\.lm_head is a ModulesToSaveWrapper"):
        apply_memory_policy(model, "loract")
    assert _classes(model) == classes
    apply_memory_policy(model, "loract", loss_chunk_tokens=None)  # transformers' loss serves

    model = make_model()
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    classes = _classes(model)
    with pytest.raises(ValueError, match="ForCausalLMLoss; LlamaForCausalLM has loss_function"):
        apply_memory_policy(model, "exact")
    assert _classes(model) == classes


@pytest.mark.parametrize(
    ("tokens", "loss_scale"),
    [(64, 2.0**16), (8192, 2.0**10)],
    ids=["first_scale_of_the_scalers", "many_tokens"],
)
def test_fused_loss_under_fp16_loss_scaling(tokens, loss_scale):
    """fp16 head (fp16 weights, as DeepSpeed's fp16 engine) with the loss multiplied by a loss
    scale before backward, as GradScaler and DeepSpeed's dynamic scaler do: the gradients
    divided by the scale are as accurate against float64 as those of the plain fp16 head +
    fp32 cross-entropy under the same scale. 2^16 is both scalers' first scale (not finite in
    fp16: the factor must be applied in fp32); with 8192 tokens the probabilities over the
    token count fall below fp16's normal range, so the 1/n may not be applied before the cast
    to fp16 (the scale would come too late to lift them). The float64 reference is the
    unscaled loss of the same fp16-rounded operands."""
    generator = torch.Generator().manual_seed(0)
    width, vocab = 8, 1024
    hidden64 = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    weight64 = torch.randn(vocab, width, generator=generator, dtype=torch.float64) * 0.5
    target = torch.randint(0, vocab, (tokens,), generator=generator)
    grads = {}
    for name in ("fused", "plain", "float64"):
        dtype = torch.float64 if name == "float64" else torch.float16
        hidden = hidden64.half().to(dtype).requires_grad_(True)
        weight = weight64.half().to(dtype).requires_grad_(True)
        if name == "fused":
            loss = linear_cross_entropy(hidden, weight, None, target, chunk_tokens=1000)
        else:
            loss = torch.nn.functional.cross_entropy(
                torch.nn.functional.linear(hidden, weight).float(), target
            )
        scale = 1.0 if name == "float64" else loss_scale
        (loss * scale).backward()
        assert hidden.grad.dtype == weight.grad.dtype == dtype
        grads[name] = {"hidden": hidden.grad / scale, "weight": weight.grad / scale}
    assert all(g.isfinite().all() for g in grads["fused"].values())
    assert_as_accurate_as(grads["fused"], grads["plain"], grads["float64"], torch.float16)


def test_fused_loss_backward_scales_in_fp32_under_bf16():
    """bf16 head, the loss divided by 3 before backward (three gradient accumulation steps,
    as the HF Trainer and DeepSpeed divide it): each gradient is the one of the undivided loss
    (the same stored bf16 values) divided by 3 and rounded once to bf16, within ``u_bf16``
    of the float64 quotient. 1 / 3 rounded to bf16 first is 2^-9 off, and the product's own
    rounding adds up to ``u_bf16`` more: that would fail here."""
    generator = torch.Generator().manual_seed(0)
    hidden64 = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    weight64 = torch.randn(512, 16, generator=generator, dtype=torch.float64) * 0.5
    target = torch.randint(0, 512, (64,), generator=generator)
    grads = {}
    for divisor in (1, 3):
        hidden = hidden64.to(torch.bfloat16).requires_grad_(True)
        weight = weight64.to(torch.bfloat16).requires_grad_(True)
        loss = linear_cross_entropy(hidden, weight, None, target, chunk_tokens=16)
        (loss / divisor).backward()
        grads[divisor] = (hidden.grad, weight.grad)
    for one, third in zip(grads[1], grads[3], strict=True):
        exact = one.double() / 3
        bound = UNIT_ROUNDOFF[torch.bfloat16] * exact.abs()
        assert ((third.double() - exact).abs() <= bound).all()
