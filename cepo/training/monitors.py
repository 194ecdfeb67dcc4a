"""Run-level warnings about training that goes on without learning anything."""

from __future__ import annotations

# A fused reward std at or below this is a batch where every completion got the same reward.
CONSTANT_TOLERANCE = 1e-12


class ConstantRewardMonitor:
    """Counts consecutive rollout steps on which every completion of the batch got the same fused reward,
    with the same value each step (e.g. every gold answer unmatchable: reward 0 everywhere). Such steps
    give every sample the advantage 0, so the reward moves nothing.

    Groups with zero spread are common (a group whose samples are all right); this is about the whole
    batch, step after step. A batch that is all right (the fused reward's maximum, 1) late in a run is a
    task learned, not a stall, and is only counted; from the run's first step on, any value is suspect (a
    reward that can only say 1 is as silent as one that can only say 0).
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.run = 0  # consecutive constant steps with one value
        self.value: float | None = None
        self.steps_seen = 0

    def update(self, reward_mean: float, reward_std: float) -> str | None:
        """Record one step; returns the warning on the step the run reaches ``steps`` (once per run)."""
        constant = reward_std <= CONSTANT_TOLERANCE
        same = constant and self.value is not None and abs(reward_mean - self.value) <= CONSTANT_TOLERANCE
        self.run = self.run + 1 if same else int(constant)
        self.value = reward_mean if constant else None
        self.steps_seen += 1
        saturated = reward_mean >= 1.0 - CONSTANT_TOLERANCE and self.run < self.steps_seen
        if self.steps <= 0 or self.run != self.steps or saturated:
            return None
        return (
            f"train/reward has been {reward_mean:.4g} for every completion in each of the last {self.run} rollout "
            "steps: every advantage is 0, so the reward teaches the policy nothing. Check that the gold answers "
            "can be matched (the answer marker and answer kind), that the rewards can vary, and the sampling "
            f"options (train/reward_constant_steps counts these steps; model.reward_stall_steps={self.steps} "
            "sets when this is said, 0 never)"
        )
