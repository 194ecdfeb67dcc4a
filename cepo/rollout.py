"""The rollout batch: what generation produced and what the rewards said about it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cepo.data.example import Example


@dataclass
class Rollout:
    """N = prompts x group_size sequences; sample j of prompt i is row ``i * group_size + j``.

    Token tensors: ``prompt_ids``/``prompt_mask`` are left padded ``(N, P)``; ``completion_ids``/
    ``completion_mask`` are right padded ``(N, T)`` with everything after the first EOS masked out.
    Text fields hold one string per row: ``prompts`` is Z exactly as the policy saw it (chat template
    included), ``rationales``/``answers`` are X/Y from the project's one answer parser.
    """

    examples: list[Example]
    prompts: list[str]
    completions: list[str]
    rationales: list[str]
    answers: list[str]
    marker_found: Tensor  # (N,) bool
    group_size: int
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor  # (N,) bool: no EOS within the generation budget
    prompt_truncated: Tensor | None = None  # (N,) bool: the prompt was cut from the left to fit
    stage: str = "train"
    rewards: dict[str, Tensor] = field(default_factory=dict)  # term -> (N,) float32 on CPU
    reward_weights: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # extra scalars logged for this batch

    def __len__(self) -> int:
        return len(self.completions)

    def add_reward(self, name: str, values: Tensor, weight: float) -> None:
        """Attach one reward term; its weight enters the combiner (0 = logged but not optimised)."""
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
        if values.numel() != len(self):
            raise ValueError(f"reward {name!r} has {values.numel()} values for a rollout of {len(self)} rows")
        if name in self.rewards:
            raise ValueError(f"reward term {name!r} was attached twice; give each reward a distinct name")
        self.rewards[name] = values
        self.reward_weights[name] = float(weight)
