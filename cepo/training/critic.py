"""The optional critic of the training loop: a value head on the policy, or a separate LoRA adapter.

``head``: a linear value head on the policy's final hidden states, trained with the LoRA weights (shared
features, one forward pass). ``separate``: a second LoRA adapter (``critic``) on the same frozen base plus
its own value head, run in its own forward pass so the policy loss never shapes the critic's features; no
second copy of the base weights. The loop in :mod:`cepo.training.module` uses a critic when
``model.critic`` is set (PPO's GAE advantages need one).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cepo.policy.forward import hidden_states, unwrap

CRITIC_ADAPTER = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class CriticConfig:
    """The value model (PPO's critic)."""

    kind: Literal["head", "separate"] = "head"
    """``head``: a linear value head on the policy's final hidden states, trained together with the LoRA
    weights (the value loss also shapes the policy's features). ``separate``: a second LoRA adapter named
    ``critic`` on the same frozen base plus its own value head, in its own forward pass (no policy gradient
    reaches the critic; one extra forward/backward per micro-batch; not yet tried under data parallelism,
    where two backward passes per micro-batch need unused-parameter detection)."""
    value_clip: float = 0.2
    """Clip range of the value update around the rollout's values (PPO value clipping)."""
    value_coef: float = 0.5
    """Weight of the value loss added to the policy loss."""
    lr: float | None = None
    """Learning rate of the value parameters (value head, and the critic adapter for ``separate``) in their
    own optimiser group with the same schedule; None = ``optim.lr``. With ``head``, the value loss still
    reaches the policy's LoRA weights at ``optim.lr``."""

    def check(self) -> None:
        if not self.value_clip > 0:
            raise ValueError(f"model.critic.value_clip={self.value_clip} must be > 0 (0.2 is usual; use a large "
                             "value to effectively disable value clipping)")
        if not self.value_coef > 0:
            raise ValueError(f"model.critic.value_coef={self.value_coef} must be > 0, or the critic never learns "
                             "(0.5 is usual)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"model.critic.lr={self.lr} must be > 0, or None to use model.optim.lr")


class ValueHead(nn.Module):
    """``V(s_t)``: a dropout-free linear map from a final hidden state to a scalar, zero-initialised so
    that every value starts at 0 and the first advantages are the returns themselves."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., hidden) -> (...) float32 values."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_file(cls, path: str | Path) -> ValueHead:
        """Load a head written by :meth:`Critic.export` (``value_head.safetensors``)."""
        tensors = load_file(str(path))
        head = cls(tensors["score.weight"].shape[-1])
        head.load_state_dict(tensors)
        return head


def scoring_positions(hidden: Tensor, prompt_length: int) -> Tensor:
    """The hidden states that score the completion tokens: position ``t - 1`` scores token ``t``, so the
    value of completion token ``t`` is read from the state *before* it is emitted. (batch, T, hidden);
    the same slice :func:`cepo.policy.forward.completion_logits` takes for the logits."""
    return hidden[:, prompt_length - 1 : -1]


class Critic(nn.Module):
    """The value head plus, for ``separate``, the handling of the ``critic`` adapter on the policy."""

    def __init__(self, config: CriticConfig, policy) -> None:
        super().__init__()
        self.config = config
        model_config = unwrap(policy).config
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        self.value_head = ValueHead(text_config.hidden_size)

    @property
    def separate(self) -> bool:
        return self.config.kind == "separate"

    def add_adapter(self, policy, lora) -> None:
        """Give the policy the ``critic`` adapter (``separate`` only), with the policy's LoRA settings."""
        if self.separate:
            policy.add_adapter(CRITIC_ADAPTER, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ))
            policy.set_adapter("default")

    @contextmanager
    def adapter(self, policy, restore):
        """Run the ``critic`` adapter instead of the policy's; ``restore()`` re-freezes after switching back.
        Gradients of a loss computed inside must be taken inside too: with gradient checkpointing the
        backward pass recomputes the forward with whichever adapter is active then."""
        policy.set_adapter(CRITIC_ADAPTER)
        restore()
        try:
            yield policy
        finally:
            policy.set_adapter("default")
            restore()

    def parameters_of(self, policy) -> list[nn.Parameter]:
        """The critic's own parameters: the value head, plus the critic adapter for ``separate``."""
        params = list(self.value_head.parameters())
        if self.separate:
            params += [p for n, p in policy.named_parameters() if f".{CRITIC_ADAPTER}." in n]
        return params

    def values(self, policy, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
               completion_mask: Tensor) -> Tensor:
        """Values (B, T) of the completion tokens from the network active now (call inside :meth:`adapter`
        for ``separate``). Runs the backbone only: no vocabulary-sized logits."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        hidden = hidden_states(policy, attention_mask, input_ids=input_ids)
        return self.value_head(scoring_positions(hidden, prompt_ids.shape[1]))

    def export(self, policy, target: Path) -> None:
        """``value_head.safetensors`` (load with :meth:`ValueHead.from_file`) and, for ``separate``, the
        critic adapter in ``critic/``."""
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(tensors, str(target / VALUE_HEAD_FILE), metadata={"value_model": self.config.kind})
        if self.separate:
            policy.save_pretrained(str(target), selected_adapters=[CRITIC_ADAPTER])
