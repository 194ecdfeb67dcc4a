"""Per-token log-probabilities of completions, micro-batched, logits only at completion tokens.

The LM head is applied to the real completion tokens only (no prompt positions, no padding after EOS),
in chunks of tokens, so full-vocabulary float32 logits never exist for a whole micro-batch: at Qwen's
151,936-token vocabulary one float32 logit row is 0.6 MB, and 16 x 512 tokens of them (plus the
log-softmax temporaries and what autograd keeps for the backward pass) would be ~26 GB. With gradients,
each chunk is checkpointed: only its hidden states are kept and its logits are recomputed in the
backward pass, so the peak is a few chunks of logits whatever the micro-batch size. The result is exact
(the same per-token arithmetic; only which rows share one matrix product changes).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from cepo.policy.cache import cache_keyword, has_local_attention
from cepo.policy.forward import backbone_and_head, hidden_states, position_ids_from_mask

LOGITS_CHUNK_ELEMENTS = 1 << 24
"""Float32 logits computed at once by default (64 MB; 110 tokens at a 151,936-token vocabulary):
``chunk_tokens = LOGITS_CHUNK_ELEMENTS // vocab``."""


def chunk_tokens_for(vocab_size: int, chunk_elements: int = LOGITS_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's float32 logits hold about ``chunk_elements`` values."""
    return max(1, chunk_elements // max(1, vocab_size))


def _logprob_entropy(head: nn.Module, hidden: Tensor, tokens: Tensor, temperature: float,
                     with_entropy: bool) -> tuple[Tensor, Tensor]:
    """log p(token) and the entropy of the tempered distribution for rows ``hidden`` ``(n, hidden)``."""
    logits = head(hidden).float()  # (n, vocab)
    if temperature != 1.0:
        # in place is safe: the head's backward does not need its output
        logits = logits.div_(temperature)
    log_normalizer = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normalizer
    if not with_entropy:
        return logp, logp.new_zeros(())
    with torch.no_grad():
        # H = logsumexp(z) - sum softmax(z) z, in one extra (n, vocab) buffer; tokens with probability 0
        # (logit -inf) contribute 0, not 0 * -inf = nan.
        weighted = logits.detach() - log_normalizer.detach().unsqueeze(-1)
        weighted.exp_().mul_(logits.detach()).nan_to_num_(nan=0.0)
        entropy = log_normalizer.detach() - weighted.sum(-1)
    return logp, entropy


def token_logprobs(
    head: nn.Module,
    hidden: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """float32 ``log p(tokens)`` ``(n,)`` under ``softmax(head(hidden) / temperature)`` and optionally the
    entropy ``(n,)`` (no gradient), from hidden states ``(n, hidden)``, ``chunk_tokens`` rows at a time
    (None: :func:`chunk_tokens_for` the head's vocabulary). With gradients enabled, every chunk is
    checkpointed so that no chunk's logits are kept for the backward pass."""
    if not temperature > 0:
        raise ValueError(
            f"log-probs need a positive temperature, got {temperature}: the sampling temperature divides the "
            "logits (greedy decoding, temperature 0, is for evaluation only)"
        )
    n = hidden.shape[0]
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(head.weight.shape[0] if hasattr(head, "weight") else 1)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    logps, entropies = [], []
    for start in range(0, n, chunk_tokens):
        h, tok = hidden[start : start + chunk_tokens], tokens[start : start + chunk_tokens]
        if needs_grad and n > chunk_tokens:
            logp, entropy = checkpoint(_logprob_entropy, head, h, tok, temperature, with_entropy, use_reentrant=False)
        else:
            logp, entropy = _logprob_entropy(head, h, tok, temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


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
    chunk_tokens: int | None = None,
    share_prompts: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """float32 log p(completion token) ``(B, T)``, optionally per-token entropy and the scoring hidden
    states ``(B, T, hidden)`` (for a value head). Runs one forward pass over the rows given; callers
    split large batches with :func:`micro_batches`.

    ``input_ids`` is the left-padded prompt block followed by the right-padded completion block; the hidden
    state at t-1 scores token t. Log-probs and entropy are 0 where ``completion_mask`` is 0 (they are not
    computed there). Logits are divided by ``temperature`` so log-probs match the sampling distribution.
    """
    decoder, head = backbone_and_head(model)
    scoring = None
    if share_prompts and not (torch.is_grad_enabled() and getattr(decoder, "gradient_checkpointing", False)):
        scoring = _scoring_hidden_shared_prompts(decoder, prompt_ids, prompt_mask, completion_ids, completion_mask)
    if scoring is None:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        hidden = hidden_states(model, attention_mask, input_ids=input_ids)
        scoring = hidden[:, prompt_ids.shape[1] - 1 : -1]  # (B, T, hidden)
    real = completion_mask.bool()
    logp_real, entropy_real = token_logprobs(
        head, scoring[real], completion_ids[real], temperature=temperature, with_entropy=with_entropy,
        chunk_tokens=chunk_tokens,
    )
    logp = logp_real.new_zeros(completion_ids.shape).masked_scatter(real, logp_real)
    entropy = logp_real.new_zeros(completion_ids.shape).masked_scatter(real, entropy_real) if with_entropy else None
    return logp, entropy, (scoring if return_hidden else None)


def _scoring_hidden_shared_prompts(decoder: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                                   completion_ids: Tensor, completion_mask: Tensor) -> Tensor | None:
    """Scoring hidden states ``(B, T, hidden)`` with each distinct prompt run once: the G samples of a
    group share their prompt, so its keys and values are computed for one row and gathered for all G,
    and only the completion tokens run per row. None (run full sequences) when no two rows share a
    prompt, or the decoder takes no cache or has local-attention layers."""
    keyword = cache_keyword(decoder)
    if keyword is None or has_local_attention(decoder.config):
        return None
    width = prompt_ids.shape[1]
    unique, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    if unique.shape[0] == prompt_ids.shape[0]:
        return None
    unique_ids, unique_mask = unique[:, :width], unique[:, width:]
    cache = DynamicCache(config=decoder.config)  # filled in place by the prompt pass
    cache_arg = {keyword: cache}
    prompt_out = decoder(input_ids=unique_ids, attention_mask=unique_mask,
                         position_ids=position_ids_from_mask(unique_mask), use_cache=True, **cache_arg)
    cache.reorder_cache(inverse)  # (distinct prompts, ...) -> (B, ...)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = position_ids_from_mask(attention_mask)[:, width:]
    out = decoder(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions,
                  use_cache=True, **cache_arg)
    last_prompt = prompt_out.last_hidden_state[:, -1:].index_select(0, inverse)  # scores completion token 0
    return torch.cat([last_prompt, out.last_hidden_state[:, :-1]], dim=1)


@contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode (no dropout) inside the block, each module's own mode restored after.
    For passes without gradients only: Hugging Face models skip gradient checkpointing in eval mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def batched_logprobs(model, rollout_tensors: tuple[Tensor, Tensor, Tensor, Tensor], micro_batch_size: int,
                     temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`completion_logprobs` over all rows in micro-batches, without gradients, in eval mode (so any
    dropout left on, e.g. LoRA dropout, does not make stored old or reference log-probs random)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = rollout_tensors
    logps, entropies = [], []
    with eval_mode(model):
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
