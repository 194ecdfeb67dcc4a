"""Misbehaving plug-ins for the bad-configuration catalogue, loaded by ``cepo`` through class paths."""

import torch
from lightning import Callback

from cepo.rewards.base import RewardFunction


class ConstantReward(RewardFunction):
    """Scores every completion with the same ``value`` (inf, NaN or out of [0, 1] in the catalogue)."""

    default_name = "constant"

    def __init__(self, value: str, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.value = float(value)  # text, so that "inf" and "nan" pass the parser

    def score(self, rollout):
        return torch.full((len(rollout),), self.value)


class OldStyleReward(Callback):
    """A reward written against the old hook: it looks like a reward but is not a ``cepo.NetworkReward``."""

    def on_rollout_batch(self, module, rollout) -> None:
        rollout.add_reward("old", torch.ones(len(rollout)), 1.0)
