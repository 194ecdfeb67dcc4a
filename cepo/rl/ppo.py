"""PPO math for language models: KL-penalised token rewards, GAE, whitening, the clipped value loss and
the KL coefficient controllers.

Pure functions of tensors, as in :mod:`cepo.rl.grpo`, whose masked reductions and policy surrogate are
shared. Completion tensors are ``(batch, T)`` with a ``mask`` that is 1 on real completion tokens.

References: PPO (Schulman et al. 2017), generalised advantage estimation (Schulman et al. 2016) and the
reward shaping and adaptive KL controller of Ziegler et al. 2019 ("Fine-tuning language models from human
preferences").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cepo.rl.grpo import aggregate_loss, masked_mean


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (B, T) for PPO with the KL penalty in the reward (Ziegler et al. 2019).

    Every completion token gets ``-kl_coef * kl``, where ``kl`` (B, T) is a per-token estimate of
    ``log(pi / pi_ref)`` (the caller passes ``logp - ref_logp``, the k1 estimator); the sequence score
    ``scores`` (B,) is added on the last completion token of each row. Positions outside ``mask`` get 0.
    A row with no completion token gets no reward at all: its score is dropped, since there is no token
    to credit it to. The result is detached: rewards are targets, not something to differentiate.
    """
    kl = kl.detach()
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # 1-based so that 0 means "none"
    last = (valid * positions).argmax(dim=-1, keepdim=True)  # (B, 1)
    has_token = valid.any(dim=-1, keepdim=True)
    score = torch.where(has_token, scores.unsqueeze(-1).to(rewards.dtype), torch.zeros_like(rewards[:, :1]))
    return rewards.scatter_add(-1, last, score)


def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each sequence's completion tokens.

    With ``delta_t = r_t + gamma * V_{t+1} - V_t``, the advantage is ``A_t = delta_t + gamma * lam * A_{t+1}``,
    run backwards. ``t + 1`` means the next *valid* token of the same row: positions where ``mask`` is 0 are
    skipped, so padding on either side (or inside) a sequence does not change its result, and the value
    after the last valid token is 0 because the episode ends there. ``gamma = lam = 1`` gives
    ``A_t = sum_{k >= t} r_k - V_t``.

    Returns ``(advantages, returns)``, both (B, T), with ``returns = advantages + values`` and both 0 outside
    ``mask``. Neither carries gradient: they are regression targets and weights, not outputs to train.
    """
    token_rewards = token_rewards.detach()
    values = values.detach()
    valid = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])  # (B,) value of the next valid token, 0 after the last
    next_advantage = values.new_zeros(values.shape[0])  # (B,)
    for t in reversed(range(values.shape[-1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        here = valid[:, t]
        # On padding, carry the running quantities over unchanged to the previous valid token.
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
        advantages[:, t] = torch.where(here, advantage, torch.zeros_like(advantage))
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the positions where ``mask`` is set.

    Mean and variance are taken over all valid tokens of the batch; the variance is the population (biased,
    divide by ``n``) one, so the result has masked variance exactly 1 up to ``eps``. With
    ``shift_mean=False`` the mean is added back, only the scale changes, as common PPO implementations do for
    rewards. Positions outside ``mask`` are 0 in the output.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


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
    token count, as for the ``"dapo"`` mode of :func:`cepo.rl.grpo.aggregate_loss` (pass the token count of
    the whole mini-batch so micro-batch losses sum to its loss).

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


class FixedKLController:
    """A KL coefficient that never changes; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"KL coefficient must be finite and non-negative, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, steering the measured KL towards ``target``.

    After each batch, ``update(current_kl, n_steps)`` applies

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    so the coefficient grows when the policy drifts further than ``target`` from the reference and shrinks
    when it stays closer; the clip bounds the change per ``horizon`` steps to 20 %. ``n_steps`` is the
    number of samples (episodes) in the batch; a step so large that the factor would fall below 0 sets the
    coefficient to 0 rather than making it negative. Only ``value`` evolves, so only it is checkpointed:
    ``target`` and ``horizon`` come from the configuration of the resumed run.
    """

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        if not math.isfinite(init_value) or init_value < 0:
            raise ValueError(f"init_value (the initial KL coefficient) must be finite and >= 0, got {init_value}")
        if not target > 0:
            raise ValueError(f"target (the KL to steer towards) must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon (samples over which the coefficient adapts) must be > 0, got {horizon}")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient by the clipped proportional error of ``current_kl`` against the target."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative, got {n_steps}")
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= max(1.0 + error * n_steps / self.horizon, 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
