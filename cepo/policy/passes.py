"""What a gradient pass over a frozen network needs around the model: unwrapping DDP, eval mode without
gradient checkpointing, optional per-layer activation checkpointing, the model's position limit,
out-of-memory detection, right-padded batches and an embedding leaf the VJPs stop at."""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cepo.policy.forward import unwrap


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The model inside any ``DistributedDataParallel``-style wrappers (the first with input embeddings)."""
    while not hasattr(model, "get_input_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


@contextmanager
def scoring_mode(model: nn.Module):
    """Eval mode (no dropout) and gradient checkpointing off for the pass; both restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    try:
        for m in checkpointed:
            m.gradient_checkpointing = False
        model.eval()
        yield
    finally:
        for m in checkpointed:
            m.gradient_checkpointing = True
        for m, training in modes:
            m.training = training


@contextmanager
def checkpointed_layers(model: nn.Module):
    """Non-reentrant activation checkpointing of every decoder layer for the duration of the pass.

    transformers checkpoints only in training mode, and the pass runs in eval mode (no dropout), so the
    layers' ``forward`` is wrapped here instead. The VJPs use ``torch.autograd.grad``, which supports
    non-reentrant checkpointing (``torch.func`` transforms do not)."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"activation_checkpointing: found no decoder layers to checkpoint in {type(model).__name__}; "
            "set activation_checkpointing false"
        )
    patched = []
    for layer in layers:
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's method


def position_limit(model: nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, GPT-2's ``n_positions``), or None."""
    inner = unwrap_ddp(model)
    config = getattr(unwrap(inner), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """True for an accelerator's or the host's allocation failure."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(model: nn.Module) -> None:
    gc.collect()
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.empty_cache()


def right_padded(tokens: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    """``(ids, attention mask)``, each ``(B, max length)``, of right-padded token lists."""
    width = max((len(t) for t in tokens), default=0)
    ids = torch.full((len(tokens), width), pad, dtype=torch.long)
    mask = torch.zeros((len(tokens), width), dtype=torch.long)
    for b, t in enumerate(tokens):
        ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[b, : len(t)] = 1
    return ids.to(device), mask.to(device)


def embedding_leaf(embed: nn.Module, ids: Tensor) -> Tensor:
    """The input embeddings of ``ids`` as a fresh leaf that requires grad, so the VJPs stop there and touch
    no parameter (with LoRA the embedding layer is frozen, so its own output would not require grad)."""
    with torch.no_grad():
        E = embed(ids)
    return E.detach().requires_grad_()
