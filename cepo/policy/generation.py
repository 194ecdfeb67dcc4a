"""Sampling completions: one ``generate`` call per rollout batch with all G samples per prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GenerationConfig:
    """Sampling settings for rollouts and evaluation."""

    max_new_tokens: int = 256
    """Completion budget per sample; completions that hit it without EOS are flagged as truncated."""
    temperature: float = 1.0
    """Sampling temperature for rollouts (also divides logits when scoring log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling mass for rollouts (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling for rollouts (0 = off)."""
    max_prompt_tokens: int | None = 512
    """Prompts longer than this are cut from the left (the end of a prompt holds the instruction)."""
    eval_max_new_tokens: int | None = None
    """Completion budget during validation/test (None = ``max_new_tokens``)."""
    eval_temperature: float = 0.0
    """Temperature during validation/test; 0 means greedy decoding (pass@1)."""


@dataclass
class Generated:
    prompt_ids: Tensor  # (N, P) left padded
    prompt_mask: Tensor
    completion_ids: Tensor  # (N, T) right padded, pad after the first EOS
    completion_mask: Tensor  # (N, T) 1 up to and including the first EOS
    truncated: Tensor  # (N,) bool


def completion_mask_after_eos(completion_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Mask that keeps tokens up to and including the first EOS; and whether a row never produced EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    mask = (~seen_before).long()
    truncated = ~is_eos.any(-1)
    return mask, truncated


def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    max_prompt_tokens: int | None = None,
) -> Generated:
    """Sample ``group_size`` completions per prompt in one batched call (KV cache on).

    Rows are ordered prompt-major: sample j of prompt i is row ``i * group_size + j``. The model is put in
    eval mode for sampling (no dropout) and its previous mode is restored.
    """
    device = next(model.parameters()).device
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
        truncation_side="left",
    )
    prompt_ids = enc.input_ids.repeat_interleave(group_size, dim=0).to(device)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, dim=0).to(device)
    stop = eos_ids(model, tokenizer)
    sampling = temperature > 0
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if sampling else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop,
            use_cache=True,
            **kwargs,
        )
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]
    completion_mask, truncated = completion_mask_after_eos(completion_ids, stop)
    # Trim columns that no row uses, so later passes do not pay for them.
    width = max(int(completion_mask.sum(-1).max().item()), 1)
    completion_ids = completion_ids[:, :width].masked_fill(completion_mask[:, :width] == 0, tokenizer.pad_token_id)
    return Generated(prompt_ids, prompt_mask, completion_ids, completion_mask[:, :width], truncated)
