"""Policy losses, loss aggregations and the value loss: pure functions of tensors, registered by name.

- :data:`POLICY_LOSSES`: per-token policy losses ``fn(logp, old_logp, advantages, *, epsilon, epsilon_high)
  -> (per_token_loss, diagnostics)``; ``diagnostics`` maps a name to a per-token tensor whose masked mean
  is logged (e.g. where the clip is active).
- :data:`LOSS_AGGREGATIONS`: how a per-token loss becomes a scalar (``grpo``, ``dapo``, ``dr_grpo``).
- :func:`policy_objective`: a policy loss plus ``kl_coef`` times a KL estimator, aggregated; the one loss
  every algorithm in cepo optimises (the critic adds :func:`clipped_value_loss`).

References: the clipped surrogate and value clipping are PPO's (Schulman et al. 2017); the asymmetric clip
range and the token-level ("dapo") aggregation are from DAPO (Yu et al. 2025); the per-sequence ("grpo")
aggregation from DeepSeekMath (Shao et al. 2024); the constant-normalizer ("dr_grpo") aggregation from
Dr. GRPO (Liu et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cepo.rl.kl import KL_ESTIMATORS
from cepo.rl.reductions import masked_mean, masked_sum
from cepo.registry import Registry

PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@POLICY_LOSSES.register("clipped_surrogate")
def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017) per token, with DAPO's optional asymmetric clip range.

    ``logp`` and ``old_logp`` are (B, T); ``advantages`` is (B,) (broadcast over the tokens of a sequence, as
    in GRPO) or (B, T). With ``ratio = exp(logp - old_logp)`` the per-token loss is

        -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)

    where ``epsilon_high`` defaults to ``epsilon`` (DAPO's "clip-higher" sets it larger to keep exploring).

    Returns ``(loss, diagnostics)``: ``loss`` (B, T), and two bool (B, T) tensors marking where the clip is
    active and the token therefore gets no gradient: ``clip_fraction_low`` where ``A < 0`` and
    ``ratio < 1 - epsilon``, ``clip_fraction_high`` where ``A > 0`` and ``ratio > 1 + epsilon_high``. They are
    not masked: combine with the completion mask.
    """
    if epsilon_high is None:
        epsilon_high = epsilon
    if epsilon < 0 or epsilon_high < 0:
        raise ValueError(f"clip ranges must be non-negative, got epsilon={epsilon}, epsilon_high={epsilon_high}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1), broadcast over T
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    low = (advantages < 0) & (ratio < 1.0 - epsilon)
    high = (advantages > 0) & (ratio > 1.0 + epsilon_high)
    return loss, {"clip_fraction_low": low, "clip_fraction_high": high}


PolicyLossName = POLICY_LOSSES.literal()


# ---------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregation:
    """A loss aggregation: ``numerator(per_token, mask)`` over ``denominator(mask, max_completion_length)``."""

    numerator: Callable[[Tensor, Tensor], Tensor]
    denominator: Callable[[Tensor, int | None], Tensor]


LOSS_AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


def _sequence_means(per_token: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(per_token, mask, dim=-1).sum()


def _nonempty_sequences(mask: Tensor, _: int | None) -> Tensor:
    return (mask.float().sum(dim=-1) > 0).sum().float()


def _tokens(mask: Tensor, _: int | None) -> Tensor:
    return mask.float().sum()


def _rows_times_budget(mask: Tensor, max_completion_length: int | None) -> Tensor:
    if max_completion_length is None:
        raise ValueError("loss aggregation 'dr_grpo' needs max_completion_length (the generation budget in tokens)")
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    return mask.new_tensor(float(mask.shape[0] * max_completion_length), dtype=torch.float32)


# "grpo" (Shao et al. 2024): mean over each sequence's own tokens, then over sequences; long sequences weigh
# less per token, the length bias DAPO and Dr. GRPO point out.
LOSS_AGGREGATIONS.register("grpo")(Aggregation(_sequence_means, _nonempty_sequences))
# "dapo" (Yu et al. 2025): sum over all tokens / number of tokens in the batch.
LOSS_AGGREGATIONS.register("dapo")(Aggregation(masked_sum, _tokens))
# "dr_grpo" (Liu et al. 2025): sum over all tokens / (B * max_completion_length), independent of lengths.
LOSS_AGGREGATIONS.register("dr_grpo")(Aggregation(masked_sum, _rows_times_budget))

LossAggregationName = LOSS_AGGREGATIONS.literal()


def loss_normalizer(mask: Tensor, mode: str, max_completion_length: int | None = None) -> Tensor:
    """The denominator :func:`aggregate_loss` uses for ``mode`` on a batch with this ``mask`` (scalar tensor).

    Call it once on the mask of the whole mini-batch and pass the result as ``normalizer`` to
    :func:`aggregate_loss` (or :func:`policy_objective`) for each micro-batch: the micro-batch losses then sum
    to exactly the full mini-batch loss, whatever the split. The values are

    - ``"grpo"``: the number of sequences with at least one completion token,
    - ``"dapo"``: the total mask weight (the number of completion tokens),
    - ``"dr_grpo"``: ``B * max_completion_length`` with ``B`` the number of rows of ``mask``,

    replaced by 1 when they are 0 (the numerator is then 0 too, so the loss is 0 rather than NaN). Under data
    parallelism, sum the values over ranks and divide the loss by the world size if the strategy averages
    gradients.
    """
    value = LOSS_AGGREGATIONS[mode].denominator(mask, max_completion_length)
    return torch.where(value > 0, value, torch.ones_like(value))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    max_completion_length: int | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) over the completion tokens to a scalar with the aggregation ``mode``.

    - ``"grpo"``: mean over each sequence's tokens, then mean over sequences (an empty sequence adds 0 and
      is not counted);
    - ``"dapo"``: sum over all tokens divided by the number of tokens in the batch;
    - ``"dr_grpo"``: sum over all tokens divided by ``B * max_completion_length``.

    ``normalizer`` replaces the denominator; for gradient accumulation pass :func:`loss_normalizer` of the
    *whole* mini-batch's mask to every micro-batch, and the micro-batch losses sum to the full-batch loss.
    With ``normalizer`` given, ``max_completion_length`` is not needed.
    """
    aggregation = LOSS_AGGREGATIONS[mode]
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have one shape")
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode, max_completion_length)
    elif not isinstance(normalizer, Tensor) and not normalizer > 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    return aggregation.numerator(per_token, mask) / normalizer


# ---------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------


def policy_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    policy_loss: str = "clipped_surrogate",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_coef: float = 0.0,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy's loss: the registered ``policy_loss`` plus ``kl_coef`` times the ``kl_estimator`` KL to
    the reference, per token, aggregated by ``aggregation``.

    ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are (B, T); ``advantages`` is (B,) or (B, T). The KL
    term is added only when ``kl_coef > 0`` (and then ``ref_logp`` is required); when ``ref_logp`` is given
    the KL is still reported. ``max_completion_length`` and ``normalizer`` go to :func:`aggregate_loss`.

    Returns ``(loss, stats)``. ``stats`` holds detached scalars: ``"policy_loss"`` (the policy-loss part,
    aggregated the same way), the token fractions of the policy loss's diagnostics (for the clipped
    surrogate ``"clip_fraction_low"``, ``"clip_fraction_high"`` and their sum ``"clip_fraction"``),
    ``"ratio_mean"`` (token mean of the ratio) and, when ``ref_logp`` is given, ``"kl"`` (token mean of the
    KL estimator). These token means are over this call's tokens, not scaled by ``normalizer``.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef (the KL coefficient) must be non-negative, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 adds a KL term to the loss and needs ref_logp (reference log-probs)")
    if normalizer is None:
        normalizer = loss_normalizer(mask, aggregation, max_completion_length)
    surrogate, diagnostics = POLICY_LOSSES[policy_loss](
        logp, old_logp, advantages, epsilon=epsilon, epsilon_high=epsilon_high
    )
    per_token = surrogate
    kl = None
    if ref_logp is not None:
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp)
        if kl_coef > 0:
            per_token = surrogate + kl_coef * kl
    loss = aggregate_loss(per_token, mask, aggregation, max_completion_length, normalizer)

    with torch.no_grad():
        stats = {"policy_loss": aggregate_loss(surrogate.detach(), mask, aggregation, max_completion_length, normalizer)}
        for name, flags in diagnostics.items():
            stats[name] = masked_mean(flags.float(), mask)
        if "clip_fraction_low" in stats and "clip_fraction_high" in stats:
            stats["clip_fraction"] = stats["clip_fraction_low"] + stats["clip_fraction_high"]
        stats["ratio_mean"] = masked_mean(torch.exp(logp.detach() - old_logp.detach()), mask)
        if kl is not None:
            stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------------------------------------


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` per token.

    The value head may not move more than ``clip_range`` from the rollout's values unless that brings it
    closer to the return. The per-token loss is averaged over completion tokens; ``normalizer`` replaces the
    token count, as for the ``"dapo"`` aggregation (pass the token count of the whole mini-batch so
    micro-batch losses sum to its loss).

    Returns ``(loss, clip_fraction)``: the fraction of completion tokens (detached) where the clipped term was
    strictly larger, that is where the clip removed the gradient.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be non-negative, got {clip_range}")
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    loss = aggregate_loss(per_token, mask, "dapo", normalizer=normalizer)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask).detach()
    return loss, clip_fraction


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the value head explains: ``1 - Var(R - V) / Var(R)`` (scalar).

    Both variances are taken over the valid tokens. 1 is a perfect critic, 0 one no better than a constant,
    negative one worse than a constant. When ``Var(R)`` is 0 (constant returns or an empty mask) the ratio is
    undefined and 0 is returned instead of NaN, so the logged curve stays finite. Detached.
    """
    values = values.detach()
    returns = returns.detach()

    def variance(x: Tensor) -> Tensor:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    var_returns = variance(returns)
    var_residual = variance(returns - values)
    ratio = var_residual / var_returns.clamp_min(torch.finfo(var_returns.dtype).tiny)
    return torch.where(var_returns > 0, 1.0 - ratio, torch.zeros_like(ratio))
