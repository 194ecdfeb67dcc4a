"""Forward passes that compute logits only where they are needed.

A causal LM's head is (hidden x vocab); applying it to every prompt position wastes memory and time when
only completion tokens are scored. These helpers run the backbone, then the head on the positions that
score completion tokens (the hidden state at t-1 scores token t).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder stack that returns ``last_hidden_state``, LM head) of a causal LM or its PEFT wrapper."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings: a causal LM head is required")
    return decoder, head


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift RoPE."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def hidden_states(
    model: nn.Module,
    attention_mask: Tensor,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
) -> Tensor:
    """Last hidden states ``(batch, seq, hidden)`` of the backbone, no LM head, no KV cache."""
    decoder, _ = backbone_and_head(model)
    out = decoder(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def completion_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Logits ``(batch, T, vocab)`` scoring the completion tokens ``input_ids[:, prompt_length:]``,
    plus the final hidden states at those scoring positions ``(batch, T, hidden)``.

    ``input_ids`` is a left-padded prompt block of width ``prompt_length`` followed by a right-padded
    completion block of width T. Logits are divided by ``temperature`` so log-probs match the sampling
    distribution.
    """
    _, head = backbone_and_head(model)
    hidden = hidden_states(model, attention_mask, input_ids=input_ids)
    scoring = hidden[:, prompt_length - 1 : -1]  # (batch, T, hidden)
    logits = head(scoring).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits, scoring




def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) from logits ``(..., vocab)`` and tokens ``(...)``, in float32."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` (float32 math inside mixed-precision runs)."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()
