"""The records every layer passes along: :class:`Example` (one question with its gold answers, what every
dataset adapter produces) and :class:`Rollout` (what generation produced and what the rewards said about
it). The bottom layer of the package: it imports nothing else from cepo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Prompt frames (rendered by cepo.data.prompts); a dataset adapter declares one when it is registered.
# "raw" (alias "plain") is the question verbatim, with no instruction.
PROMPT_FAMILIES = ("math", "multiple_choice", "yes_no", "open", "raw", "plain")


@dataclass(frozen=True)
class Example:
    """One question with its accepted gold answers.

    ``question`` is the task text without any prompt template; the template (and the tokenizer's chat
    template) is applied later, so the same examples serve every model. ``gold`` holds every accepted
    final answer, already extracted from the raw dataset field (``"18"`` from GSM8K's ``"... #### 18"``,
    each alternative of ``"a or b"``). ``answer_kind`` names the matching rule used by
    :func:`cepo.answers.matching.answers_match` (``"number"``, ``"math"``, ``"yes_no"``, ``"choice"``,
    ``"text"`` or ``"auto"``). ``meta`` carries per-source fields that metrics need (split name, cue,
    pair ids, options); its values must be plain JSON types.
    """

    question: str
    gold: tuple[str, ...]
    answer_kind: str = "auto"
    source: str = "unknown"
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)



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
