"""Key/value caches reused across rows: which argument a decoder takes its cache by, whether its attention
lets a cached prefix serve other rows, and a prefix cache built once and gathered per row (the coherence
scorer's shuffled rationales, the log-prob pass's shared prompts)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cepo.policy.forward import autocast_off, backbone_and_head, position_ids_from_mask
from cepo.policy.passes import right_padded


@dataclass
class PrefixCache:
    """Key/value states of right-padded prefixes ``[Z] <eos>``, one row per rollout, computed without
    grad. ``layers``: per decoder layer ``(keys, values)``, each ``(R, heads, P, head_dim)``; ``mask``
    ``(R, P)``; ``lengths`` ``(R,)``, the real tokens of each row; ``keyword``: the decoder's name for
    its cache argument (``cache`` in transformers 5, ``past_key_values`` before)."""

    layers: list[tuple[Tensor, Tensor]]
    mask: Tensor
    lengths: Tensor
    keyword: str

    @classmethod
    def build(cls, model: nn.Module, prefixes: list[list[int]], pad: int) -> PrefixCache | None:
        """The cache of ``prefixes``, or None where the model's cache cannot be reused across rows
        (sliding-window or chunked attention, or a cache that is not a plain dynamic key/value cache)."""
        decoder, _ = backbone_and_head(model)
        keyword = cache_keyword(decoder)
        if keyword is None or has_local_attention(getattr(decoder, "config", None)):
            return None
        embed = model.get_input_embeddings()
        device = embed.weight.device
        ids, mask = right_padded(prefixes, pad, device)
        with torch.no_grad(), autocast_off(device):
            out = decoder(
                inputs_embeds=embed(ids),
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=True,
                **{keyword: None},
            )
        layers = plain_key_values(getattr(out, keyword, None))
        if layers is None:
            return None
        return cls(layers, mask, mask.sum(dim=1), keyword)

    def select(self, rows: Tensor) -> tuple[str, object]:
        """``(keyword, cache)``: a fresh dynamic cache holding prefix row ``rows[b]`` as batch row b."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.layers):
            cache.update(keys[rows], values[rows], layer)
        return self.keyword, cache


def cache_keyword(decoder: nn.Module) -> str | None:
    """The name of the decoder's key/value cache argument, or None if it takes none."""
    try:
        parameters = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def has_local_attention(config) -> bool:
    """True if some layer attends to a window or chunk only (its cache would drop prefix positions)."""
    if config is None:
        return True
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return True
    if getattr(config, "attention_chunk_size", None):
        return True
    layer_types = getattr(config, "layer_types", None)
    return bool(layer_types) and any(t != "full_attention" for t in layer_types)


def plain_key_values(cache) -> list[tuple[Tensor, Tensor]] | None:
    """Per-layer ``(keys, values)`` of a dynamic cache with one full-attention layer entry per decoder
    layer, or None for any other kind of cache."""
    if cache is None or type(cache).__name__ != "DynamicCache":
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        if any(type(layer).__name__ != "DynamicLayer" or layer.keys is None for layer in layers):
            return None
        return [(layer.keys, layer.values) for layer in layers]
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if keys is None or values is None:
        return None
    return list(zip(keys, values))
