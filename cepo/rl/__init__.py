"""RL math as pure tensor functions: GRPO (:mod:`cepo.rl.grpo`) and PPO (:mod:`cepo.rl.ppo`)."""

from cepo.rl.grpo import (
    ADVANTAGE_SCALES,
    LOSS_TYPES,
    aggregate_loss,
    clipped_surrogate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    k3_kl,
    loss_normalizer,
    masked_mean,
    masked_sum,
    zero_std_fraction,
)
from cepo.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalized_rewards,
    whiten,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "LOSS_TYPES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "clipped_surrogate",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "kl_penalized_rewards",
    "loss_normalizer",
    "masked_mean",
    "masked_sum",
    "whiten",
    "zero_std_fraction",
]
