"""Greedy decoding with our LLaMA, for evaluation and for checking an export against it.

No KV cache: every new token runs the whole prefix again (``model(tokens)`` returns the logits
of every position). For the short prompts and answers of evaluation this costs little, and it
is exactly the computation the model was trained with, so it is the reference that a
Hugging Face export's ``generate(do_sample=False)`` must reproduce token for token.

At TP > 1 each rank holds a vocabulary shard of the logits; they are gathered over the TP group
and every rank picks the same token (collective: call it on every rank of the group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _full_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary shard [b, V/t] -> the whole vocabulary [b, V]."""
    group = model.tp_group
    size = dist.get_world_size(group)
    if size == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


@torch.no_grad()
def greedy_generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
) -> list[int]:
    """The tokens ``model`` appends to ``prompt`` by always taking the most likely next token:
    at most ``max_new_tokens``, stopping after ``eos_id`` (included) or at the model's
    ``seq_length`` (its rotary table). Ties go to the lowest id, as ``torch.argmax``."""
    if not prompt:
        raise ValueError("greedy_generate needs a non-empty prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, s]
    generated: list[int] = []
    try:
        while len(generated) < max_new_tokens and tokens.shape[1] <= model.config.seq_length:
            logits = _full_logits(model, model(tokens)[:, -1].float())  # [1, V]
            token = int(logits.argmax(dim=-1))
            generated.append(token)
            if token == eos_id:
                break
            tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
    finally:
        model.train(was_training)
    return generated
