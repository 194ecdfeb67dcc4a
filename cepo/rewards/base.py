"""Reward functions: objects listed in the config, each producing one named term per rollout row.

A new reward is a subclass of :class:`RewardFunction` that implements ``score``; list it in the YAML
under ``model.init_args.rewards`` with ``class_path``/``init_args`` and it is computed, logged on its own
and fused with the other terms by the power-mean combiner, with no other code change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cepo.answers.matching import answers_match
from cepo.rollout import Rollout


class RewardFunction:
    """Base class. ``score`` returns one value in [0, 1] per rollout row (NaN is an error)."""

    default_name = "reward"

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            weight: Weight of this term in the combiner (0 = computed and logged, not optimised).
            name: Name of the term in logs (defaults to the class's own name).
        """
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{type(self).__name__}: weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)
        self.name = name or self.default_name

    def score(self, rollout: Rollout) -> Tensor:
        raise NotImplementedError

    def __call__(self, rollout: Rollout) -> Tensor:
        values = torch.as_tensor(self.score(rollout), dtype=torch.float32).reshape(-1)
        if torch.isnan(values).any():
            bad = torch.nonzero(torch.isnan(values)).flatten()[:5].tolist()
            raise ValueError(
                f"reward {self.name!r} returned NaN for rows {bad}; a reward must return a number in [0, 1] "
                "for every completion (score unparseable output as 0 instead)."
            )
        return values


class AccuracyReward(RewardFunction):
    """1 when the parsed answer Y matches a gold answer under the example's matching rule, else 0."""

    default_name = "accuracy"

    def score(self, rollout: Rollout) -> Tensor:
        return torch.tensor(
            [
                float(answers_match(answer, ex.gold, ex.answer_kind, options=ex.meta.get("options")))
                for answer, ex in zip(rollout.answers, rollout.examples)
            ]
        )


class FormatReward(RewardFunction):
    """1 when the completion marks its answer with the marker the prompt asked for, and was not truncated."""

    default_name = "format"

    def score(self, rollout: Rollout) -> Tensor:
        return (rollout.marker_found & ~rollout.truncated.cpu()).float()
