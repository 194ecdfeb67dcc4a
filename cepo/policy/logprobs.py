"""Per-token log-probabilities of completions, micro-batched, logits only at completion positions."""

from __future__ import annotations

import torch
from torch import Tensor

from cepo.policy.forward import completion_logits, gather_logprobs
from cepo.rl.reductions import entropy_from_logits


def completion_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    return_hidden: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """float32 log p(completion token) ``(B, T)``, optionally per-token entropy and the scoring hidden
    states ``(B, T, hidden)`` (for a value head). Runs one forward pass over the rows given; callers
    split large batches with :func:`micro_batches`."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits, hidden = completion_logits(model, input_ids, attention_mask, prompt_ids.shape[1], temperature)
    logp = gather_logprobs(logits, completion_ids)
    entropy = entropy_from_logits(logits.detach()) if with_entropy else None
    return logp, entropy, (hidden if return_hidden else None)


@torch.no_grad()
def batched_logprobs(model, rollout_tensors: tuple[Tensor, Tensor, Tensor, Tensor], micro_batch_size: int,
                     temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`completion_logprobs` over all rows in micro-batches, without gradients."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = rollout_tensors
    logps, entropies = [], []
    for rows in micro_batches(prompt_ids.shape[0], micro_batch_size):
        logp, entropy, _ = completion_logprobs(
            model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows],
            temperature=temperature, with_entropy=with_entropy,
        )
        logps.append(logp)
        if entropy is not None:
            entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
