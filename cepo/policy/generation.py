"""Sampling completions: one ``generate`` call per rollout batch with all G samples per prompt."""

from __future__ import annotations

import math
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cepo.policy.forward import unwrap
from cepo.policy.passes import position_limit


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
    """Prompts longer than this are cut from the left (the end of a prompt holds the instruction). A
    prompt is also cut so that it and the completion budget fit the model's positions. Every cut is
    counted (``train/prompt/truncated``, ``prompt_truncation_rate``, ``prompt_truncated`` in predictions)."""
    eval_max_new_tokens: int | None = None
    """Completion budget during validation/test (None = ``max_new_tokens``)."""
    eval_temperature: float = 0.0
    """Temperature during validation/test; 0 means greedy decoding (pass@1)."""
    sampling_seed: int | None = None
    """None: completions are drawn from each device's random stream (seeded by ``seed_everything``), so
    they depend on the number of devices and on which prompts share a batch. An integer: sample j of a
    prompt is drawn from its own stream, seeded by this number, the stage, the rollout step, the prompt's
    text and j, so the completions do not depend on the device count, the batch composition or the
    prompt order: a 1-device and a 2-device run with the same global batch sample the same texts. The
    distribution is unchanged (Gumbel-max over the temperature/top-k/top-p-filtered logits); a prompt
    that occurs twice in one step gets the same G samples twice."""


def check_generation_options(config: GenerationConfig, *, training: bool, prefix: str = "model.generation") -> None:
    """Refuse a sampling or decoding option that is invalid, or that would make training silently learn
    nothing, naming the option and a valid value. ``training``: also the options only ``fit`` uses."""
    def refuse(option: str, problem: str) -> None:
        raise ValueError(f"{prefix}.{option}={getattr(config, option)!r}: {problem}")

    if config.max_new_tokens < 1:
        refuse("max_new_tokens", "a completion needs at least one token; set it to the longest answer you "
                                 "expect (e.g. 256)")
    if config.eval_max_new_tokens is not None and config.eval_max_new_tokens < 1:
        refuse("eval_max_new_tokens", "must be >= 1, or null to use max_new_tokens")
    if config.max_prompt_tokens is not None and config.max_prompt_tokens < 1:
        refuse("max_prompt_tokens", "must be >= 1 (prompts are cut from the left to this many tokens), or "
                                    "null to cut only at the model's positions")
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        refuse("temperature", "must be a finite number > 0 (1.0 is usual)")
    if not (math.isfinite(config.eval_temperature) and config.eval_temperature >= 0):
        refuse("eval_temperature", "must be a finite number >= 0 (0 = greedy decoding)")
    if not 0 < config.top_p <= 1:
        refuse("top_p", "must lie in (0, 1]: it is the probability mass that nucleus sampling keeps; 0 keeps "
                        "only the most likely token, so every sample of a group would be the same. Use 1.0 "
                        "(off) or e.g. 0.95")
    if isinstance(config.top_k, bool) or config.top_k < 0:
        refuse("top_k", "must be >= 0: the number of most likely tokens sampling keeps (0 = off)")
    if not training:
        return
    if not config.temperature > 0:
        refuse("temperature", "training samples G completions per prompt and scores their log-probs at this "
                              "temperature, so it must be > 0 (1.0 is usual); greedy decoding is for "
                              "evaluation (model.generation.eval_temperature: 0)")
    if config.top_k == 1:
        refuse("top_k", "keeps only the most likely token: greedy decoding, so every sample of a group is "
                        "the same and nothing trains; use 0 (off) or a value >= 2 (e.g. 50)")


def check_position_budget(model, config: GenerationConfig, *, training: bool, prefix: str = "model.generation") -> None:
    """Refuse a completion budget that leaves no room for a prompt within the model's positions."""
    limit = position_limit(model)
    if limit is None:
        return
    budgets = {"eval_max_new_tokens" if config.eval_max_new_tokens else "max_new_tokens":
               config.eval_max_new_tokens or config.max_new_tokens}
    if training:
        budgets["max_new_tokens"] = config.max_new_tokens
    for option, budget in budgets.items():
        if budget >= limit:
            raise ValueError(
                f"{prefix}.{option}={budget} leaves no room for the prompt: the model takes {limit} positions "
                f"in all (prompt + completion); set {option} below {limit}, e.g. {max(1, limit // 4)}"
            )


def prompt_token_cap(model, max_prompt_tokens: int | None, max_new_tokens: int) -> int | None:
    """The most prompt tokens a generate call keeps: ``max_prompt_tokens``, lowered so that the prompt and
    ``max_new_tokens`` fit the model's positions (a learned position table has no row past its end)."""
    limit = position_limit(model)
    room = None if limit is None else max(limit - max_new_tokens, 1)
    caps = [cap for cap in (max_prompt_tokens, room) if cap is not None]
    return min(caps) if caps else None


@dataclass
class Generated:
    prompt_ids: Tensor  # (N, P) left padded
    prompt_mask: Tensor
    completion_ids: Tensor  # (N, T) right padded, pad after the first EOS
    completion_mask: Tensor  # (N, T) 1 up to and including the first EOS
    truncated: Tensor  # (N,) bool
    prompt_truncated: Tensor | None = None  # (N,) bool: the prompt was cut from the left to fit


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
_CUT_REPORTED: set[str] = set()


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
        "top_k": int(top_k) if sampling else 0,
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


def sample_seed(*parts: object) -> int:
    """A 63-bit seed that identifies ``parts`` (SHA-256 of their JSON): the same in every process and
    under any ``PYTHONHASHSEED``."""
    text = json.dumps([part if isinstance(part, (int, float, str)) else str(part) for part in parts])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


class KeyedSampler(LogitsProcessor):
    """Sampling with one random stream per row, for ``generate`` in greedy mode.

    The logits go through the same temperature, top-k and top-p warpers as ``do_sample=True``; then each
    row adds Gumbel noise ``-log E``, ``E ~ Exp(1)`` drawn from the row's own generator, so that the argmax
    that greedy decoding takes is an exact sample of the filtered ``softmax(logits / T)`` (the Gumbel-max
    trick). A row's draws depend only on its seed and its position in the completion, never on the
    other rows of the batch or on the global random state.
    """

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float, device) -> None:
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"KeyedSampler has {len(self.generators)} row seeds for a batch of {scores.shape[0]}")
        scores = self.warpers(input_ids, scores)
        # Drawn in float64: a float32 draw is exactly 0 with probability ~2^-24 per entry, which over a
        # large vocabulary would often hand one arbitrary token an infinite score.
        exponential = torch.stack([
            torch.empty(scores.shape[1], device=scores.device, dtype=torch.float64).exponential_(generator=g)
            for g in self.generators
        ])  # (N, vocab), one row per generator
        return scores - exponential.log().to(scores.dtype)


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
    sample_keys: list[str] | None = None,
) -> Generated:
    """Sample ``group_size`` completions per prompt in one batched call (KV cache on).

    Rows are ordered prompt-major: sample j of prompt i is row ``i * group_size + j``. The model is put in
    eval mode for sampling (no dropout) and its previous mode is restored. Sampling follows exactly
    ``softmax(logits / temperature)`` restricted by ``top_k``/``top_p`` (``temperature`` 0: greedy argmax);
    the model's own ``generation_config`` defaults (repetition penalty, top-k, ...) are not applied, and
    the first call that overrides any of them says so in the log.

    Prompts longer than :func:`prompt_token_cap` are cut from the left; ``Generated.prompt_truncated``
    flags them.
    ``sample_keys`` (one per prompt, with ``temperature`` > 0): sample j of prompt i is drawn from a stream
    seeded by ``(sample_keys[i], j)`` (:class:`KeyedSampler`) instead of the global random state, so it
    is the same whichever prompts share the batch.
    """
    if sample_keys is not None and len(sample_keys) != len(prompts):
        raise ValueError(f"sample_keys needs one key per prompt: got {len(sample_keys)} for {len(prompts)} prompts")
    device = next(model.parameters()).device
    enc, cut = tokenize_prompts(tokenizer, prompts, prompt_token_cap(model, max_prompt_tokens, max_new_tokens))
    prompt_ids = enc.input_ids.repeat_interleave(group_size, dim=0).to(device)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, dim=0).to(device)
    stop = eos_ids(model, tokenizer)
    keyed = sample_keys is not None and temperature > 0
    processors = LogitsProcessorList()
    if keyed:  # greedy decoding over KeyedSampler's noisy scores is sampling, row by row
        seeds = [sample_seed(key, j) for key in sample_keys for j in range(group_size)]
        processors.append(KeyedSampler(seeds, temperature, top_k, top_p, device))
    config = sampling_config(
        max_new_tokens=max_new_tokens, temperature=0.0 if keyed else temperature, top_p=top_p, top_k=top_k,
        eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    was_training = model.training
    model.eval()
    try:
        with _model_generation_config(model, config) as model_defaults:
            _report_overrides("sampling" if temperature > 0 else "greedy", overridden_defaults(model_defaults, config))
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                 logits_processor=processors)
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]
    completion_mask, truncated = completion_mask_after_eos(completion_ids, stop)
    # Trim columns that no row uses, so later passes do not pay for them.
    width = max(int(completion_mask.sum(-1).max().item()), 1)
    completion_ids = completion_ids[:, :width].masked_fill(completion_mask[:, :width] == 0, tokenizer.pad_token_id)
    return Generated(prompt_ids, prompt_mask, completion_ids, completion_mask[:, :width], truncated,
                     cut.repeat_interleave(group_size, dim=0))


def tokenize_prompts(tokenizer, prompts: list[str], cap: int | None):
    """Left-padded prompt tokens, each cut from the left to ``cap`` tokens, and which were cut ``(n,)``."""
    ids = tokenizer(prompts, add_special_tokens=False).input_ids
    cut = torch.tensor([cap is not None and len(row) > cap for row in ids], dtype=torch.bool)
    if cap is not None:
        ids = [row[len(row) - cap:] if len(row) > cap else row for row in ids]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
    return enc, cut


def warn_prompts_cut(prompt_truncated: Tensor | None, stage: str, max_prompt_tokens: int | None) -> None:
    """Say in the log, the first time a stage cuts prompts, how many and where they are counted."""
    if prompt_truncated is None or not bool(prompt_truncated.any()) or stage in _CUT_REPORTED:
        return
    _CUT_REPORTED.add(stage)
    counted = {"train": "train/prompt/truncated", "predict": "prompt_truncated in each prediction"}.get(
        stage, "prompt_truncation_rate in the results")
    rank_zero_warn(
        f"{stage}: {int(prompt_truncated.sum())} of {len(prompt_truncated)} rows had their prompt cut from the "
        f"left to fit model.generation.max_prompt_tokens={max_prompt_tokens} or the model's positions (minus "
        f"the completion budget); counted as {counted}. Raise max_prompt_tokens, or shorten the prompts."
    )


def visible_prompts(tokenizer, prompts: list[str], generated: Generated) -> list[str]:
    """Each row's prompt as the policy saw it: the text itself, or for a cut prompt its kept tokens decoded."""
    if generated.prompt_truncated is None or not bool(generated.prompt_truncated.any()):
        return list(prompts)
    seen = []
    for text, ids, mask, cut in zip(prompts, generated.prompt_ids, generated.prompt_mask, generated.prompt_truncated):
        seen.append(tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False) if cut else text)
    return seen
