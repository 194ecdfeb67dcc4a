"""Sampling completions: one ``generate`` call per rollout batch with all G samples per prompt."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import GenerationConfig as HFGenerationConfig

from cepo.policy.forward import unwrap


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


# Every generate() option that reshapes the next-token distribution or constrains the sequence, at its
# neutral value. A model's generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20,
# top_p 0.8, temperature 0.7) would otherwise fill in whatever cepo leaves unset, and rollouts would not
# be drawn from the softmax(logits / T) that the loss scores.
NEUTRAL_SAMPLING = {
    "top_k": 0, "top_p": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
    "min_new_tokens": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "remove_invalid_values": False, "renormalize_logits": False, "watermarking_config": None, "num_beams": 1,
    "num_return_sequences": 1, "length_penalty": 1.0, "diversity_penalty": 0.0,
}
_REPORTED: set[str] = set()


def sampling_config(*, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                    eos_token_id: list[int], pad_token_id: int, bos_token_id: int | None = None) -> HFGenerationConfig:
    """The complete ``transformers.GenerationConfig`` of a cepo generate call: cepo's own options, every
    other distribution-changing option neutral, nothing inherited from the model. ``temperature`` 0 is
    greedy decoding."""
    sampling = temperature > 0
    options: dict[str, Any] = {
        **NEUTRAL_SAMPLING,
        "do_sample": sampling,
        "temperature": float(temperature) if sampling else 1.0,
        "top_p": float(top_p) if sampling else 1.0,
        "top_k": int(top_k) if sampling else None,  # greedy: unset (transformers flags any value as invalid)
        "max_new_tokens": max_new_tokens,
        "max_length": None,
        "use_cache": True,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
    }
    return HFGenerationConfig(**options)


def overridden_defaults(model_config: HFGenerationConfig | None, config: HFGenerationConfig) -> dict[str, tuple]:
    """``{option: (model's value, cepo's value)}`` for the sampling options where the model's
    ``generation_config`` asks for something other than what cepo uses."""
    if model_config is None:
        return {}
    differences = {}
    for key in ("do_sample", "temperature", *NEUTRAL_SAMPLING):
        theirs, ours = getattr(model_config, key, None), getattr(config, key, None)
        if theirs is None or theirs == ours:
            continue
        if key in ("temperature", "top_p", "top_k") and not config.do_sample:
            continue  # sampling-only options do not affect greedy decoding
        differences[key] = (theirs, ours)
    return differences


@contextmanager
def _model_generation_config(model, config: HFGenerationConfig):
    """Swap the model's own generation_config for ``config`` during a call: ``generate`` fills every
    option left unset from the model's, which must not happen."""
    base = unwrap(model)
    original = getattr(base, "generation_config", None)
    base.generation_config = config
    try:
        yield original
    finally:
        base.generation_config = original


def _report_overrides(name: str, differences: dict[str, tuple]) -> None:
    if not differences:
        return
    text = ", ".join(f"{k}={theirs!r} -> {ours!r}" for k, (theirs, ours) in sorted(differences.items()))
    message = f"generation ({name}): the model's generation_config defaults are not used: {text}"
    if message not in _REPORTED:
        _REPORTED.add(message)
        rank_zero_info(message)


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
    eval mode for sampling (no dropout) and its previous mode is restored. Sampling follows exactly
    ``softmax(logits / temperature)`` restricted by ``top_k``/``top_p`` (``temperature`` 0: greedy argmax);
    the model's own ``generation_config`` defaults (repetition penalty, top-k, ...) are not applied, and
    the first call that overrides any of them says so in the log.
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
    config = sampling_config(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    was_training = model.training
    model.eval()
    try:
        with _model_generation_config(model, config) as model_defaults:
            _report_overrides("sampling" if temperature > 0 else "greedy", overridden_defaults(model_defaults, config))
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]
    completion_mask, truncated = completion_mask_after_eos(completion_ids, stop)
    # Trim columns that no row uses, so later passes do not pay for them.
    width = max(int(completion_mask.sum(-1).max().item()), 1)
    completion_ids = completion_ids[:, :width].masked_fill(completion_mask[:, :width] == 0, tokenizer.pad_token_id)
    return Generated(prompt_ids, prompt_mask, completion_ids, completion_mask[:, :width], truncated)
