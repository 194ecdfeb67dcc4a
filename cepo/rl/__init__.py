"""RL math as pure tensor functions, each family in a registry so a YAML option can name a member.

- :mod:`cepo.rl.advantages`: advantage estimators (``grpo``, ``rloo``, ``reinforce_pp``, ``gae``);
- :mod:`cepo.rl.losses`: policy losses (``clipped_surrogate``), loss aggregations (``grpo``, ``dapo``,
  ``dr_grpo``), the combined policy objective and the critic's value loss;
- :mod:`cepo.rl.kl`: KL estimators (``k1``, ``k2``, ``k3``) and the KL coefficient controllers;
- :mod:`cepo.rl.reductions`: the masked reductions they all share;
- :mod:`cepo.rl.registry`: the name -> function table.
"""

from cepo.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    AdvantageEstimator,
    AdvantageEstimatorName,
    AdvantageInputs,
    batch_std,
    gae,
    group_advantages,
    kl_penalized_rewards,
    per_term_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_std_fraction,
)
from cepo.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, KLEstimatorName, k1_kl, k2_kl, k3_kl
from cepo.rl.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    LossAggregationName,
    PolicyLossName,
    aggregate_loss,
    clipped_surrogate,
    clipped_value_loss,
    explained_variance,
    loss_normalizer,
    policy_objective,
)
from cepo.rl.reductions import entropy_from_logits, local_sum, masked_mean, masked_sum, whiten
from cepo.registry import Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS", "ADVANTAGE_SCALES", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
    "AdaptiveKLController", "AdvantageEstimator", "AdvantageEstimatorName", "AdvantageInputs", "FixedKLController",
    "KLEstimatorName", "LossAggregationName", "PolicyLossName", "Registry", "aggregate_loss", "batch_std",
    "clipped_surrogate", "clipped_value_loss", "entropy_from_logits", "explained_variance", "gae",
    "group_advantages", "k1_kl", "k2_kl", "k3_kl", "kl_penalized_rewards", "local_sum", "loss_normalizer",
    "masked_mean", "masked_sum", "per_term_advantages", "policy_objective", "reinforce_pp_advantages",
    "rloo_advantages", "whiten", "zero_std_fraction",
]
