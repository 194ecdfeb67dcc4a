"""Advantage estimators: pure functions of rewards (and values), registered by name for the YAML option
``advantage.estimator``.

Rollouts hold N = prompts x G samples with the G samples of one prompt in consecutive rows (rows ``0..G-1``
belong to prompt 0, ``G..2G-1`` to prompt 1, ...). Completion tensors are ``(N, T)`` with a ``mask``.

Each registry entry of :data:`ADVANTAGE_ESTIMATORS` wraps one of the pure functions below behind a common
call ``estimator.compute(inputs, **options) -> (advantages, returns)`` where ``inputs`` is an
:class:`AdvantageInputs`, ``advantages`` is (N,) (one value per sequence, broadcast over its tokens) or
(N, T), and ``returns`` is (N, T) for a critic to regress on, or None. Its flags tell the training loop what
to prepare: ``group_relative`` (needs G > 1), ``needs_critic`` (values), ``needs_token_rewards``; its
``options`` name the configuration options it reads, and it is called with those alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cepo.rl.reductions import GlobalSum, local_sum, whiten
from cepo.registry import Registry

ADVANTAGE_SCALES = ("group", "batch", "none")
AdvantageScale = Literal[ADVANTAGE_SCALES]  # the configuration's type: the choices are written once, above
# Every option an estimator may read; each estimator declares the ones it reads (AdvantageEstimator.options)
# and is called with those alone, so an option set for an estimator that does not read it is refused at setup.
ADVANTAGE_OPTIONS = ("scale", "min_std", "per_term", "gamma", "lam")


# ---------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """View ``rewards`` (N,) as (N / group_size, group_size), checking that the split is exact."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one scalar per sample), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"the number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size}); "
            "samples must come in consecutive groups of group_size per prompt"
        )
    return rewards.view(-1, group_size)


def _centred(grouped: Tensor) -> Tensor:
    """Each reward minus its group's mean; exactly 0 in a group whose rewards are all equal (no rounding
    residue that a later division by a tiny std could blow up)."""
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centred), centred)


def batch_std(rewards: Tensor, global_sum: GlobalSum | None = None) -> Tensor:
    """Unbiased (``n - 1``) standard deviation of the *raw* rewards of the whole batch, over every rank when
    ``global_sum`` sums over ranks (two passes: global mean, then global sum of squared deviations). With
    ``global_sum=None`` it is ``rewards.std()`` of this process; one sample gives 0."""
    if global_sum is None:
        return rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    count = global_sum(rewards.new_tensor(float(rewards.numel())))
    mean = global_sum(rewards.sum()) / count
    squares = global_sum(((rewards - mean) ** 2).sum())
    return torch.where(count > 1, (squares / (count - 1).clamp_min(1.0)).sqrt(), torch.zeros_like(squares))


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-6,
    min_std: float = 0.0,
    global_sum: GlobalSum | None = None,
) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024): each reward minus the mean of its group.

    ``rewards`` is (N,). The centred reward is then divided by

    - ``"group"``: ``max(std of the group, min_std) + eps`` (the original GRPO when ``min_std = 0``),
    - ``"batch"``: ``max(std of all N rewards, min_std) + eps`` (TRL's ``scale_rewards="batch"``); under data
      parallelism pass ``global_sum`` so the std is that of the raw rewards of *every* rank,
    - ``"none"``: nothing, which Dr. GRPO (Liu et al. 2025) argues removes a difficulty bias.

    Standard deviations are the unbiased (Bessel-corrected, ``n - 1``) estimate, PyTorch's default and TRL's
    choice; with a single sample the spread is taken as 0. A group whose rewards are all equal gets exactly
    zero advantages: it carries no learning signal.

    ``min_std`` is a floor on the divisor (0 = off). z-scoring makes any spread unit-sized: when every
    sample of a group is equally right, differences of 0.01 in a small auxiliary reward (a coherence score)
    become advantages of about +-1, as large as the difference between a right and a wrong answer. With
    ``min_std = s``, a group whose std is below ``s`` is divided by ``s`` instead, so its advantages stay
    proportional to its actual spread (a spread of 0.01 with ``s = 0.1`` gives advantages of about +-0.1);
    groups with std above ``s`` are unchanged.

    Returns a floating tensor (N,) with the dtype of ``rewards`` (float32 for integer rewards).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose one of {', '.join(ADVANTAGE_SCALES)}")
    if not min_std >= 0:
        raise ValueError(f"min_std must be >= 0 (0 = off), got {min_std}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = _grouped(rewards, group_size)  # (num_groups, G)
    centred = _centred(grouped)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std.clamp_min(min_std) + eps)
    elif scale == "batch":
        centred = centred / (batch_std(rewards, global_sum).clamp_min(min_std) + eps)
    return centred.reshape(-1)


def per_term_advantages(
    terms: Tensor,
    weights: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-6,
    min_std: float = 0.0,
    global_sum: GlobalSum | None = None,
) -> Tensor:
    """GRPO advantages per reward term, then combined: ``A = sum_k w_k * group_advantages(terms[:, k])``.

    ``terms`` is (N, K), one column per reward term (accuracy, each coherence channel, ...), ``weights`` (K,)
    their weights in the combiner, normalised here to sum 1 (terms with weight 0 are skipped). Each term is
    centred and scaled within its group on its own (``scale``, ``eps`` and ``min_std`` as in
    :func:`group_advantages`), so a term that is constant in a group contributes exactly 0 there, and the
    accuracy term's advantage is not diluted by (or inflated together with) the coherence terms' noise.
    Unlike z-scoring the fused reward, the result is linear in the terms: the power mean's exponent p does
    not enter the advantages.
    """
    if terms.dim() != 2:
        raise ValueError(f"terms must be (N, K), got shape {tuple(terms.shape)}")
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if weights.numel() != terms.shape[1]:
        raise ValueError(f"{weights.numel()} weights for {terms.shape[1]} reward terms")
    if (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"term weights must be >= 0 with a positive sum, got {weights.tolist()}")
    weights = weights / weights.sum()
    terms = terms if terms.is_floating_point() else terms.float()
    total = torch.zeros(terms.shape[0], dtype=terms.dtype, device=terms.device)
    for k in range(terms.shape[1]):
        if weights[k] > 0:
            total = total + float(weights[k]) * group_advantages(terms[:, k], group_size, scale, eps, min_std, global_sum)
    return total


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"): each reward minus
    the mean of the *other* G - 1 rewards of its group, ``A_i = R_i - (sum_j R_j - R_i) / (G - 1)``, which
    equals ``G / (G - 1)`` times the reward minus the group mean. The baseline does not depend on the sample
    itself, so the estimate is unbiased. No scaling by a standard deviation. Needs G >= 2; a constant group
    gets exactly 0. Returns (N,)."""
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt (group_size), got {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    centred = _centred(_grouped(rewards, group_size))
    return (centred * (group_size / (group_size - 1))).reshape(-1)


def zero_std_fraction(rewards: Tensor, group_size: int) -> Tensor:
    """Fraction of groups whose rewards are all equal, hence give no gradient (a scalar tensor).

    DAPO (Yu et al. 2025) filters such groups out ("dynamic sampling"); logging the fraction shows how much
    of each batch is wasted.
    """
    grouped = _grouped(rewards, group_size)
    constant = grouped.amax(dim=1) == grouped.amin(dim=1)
    return constant.float().mean()


def kl_penalized_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (B, T): ``-kl_coef * kl`` on every completion token, plus the sequence score
    ``scores`` (B,) on the last completion token of each row (Ziegler et al. 2019).

    ``kl`` (B, T) is a per-token KL estimate (PPO passes k1, ``logp - ref_logp``). Positions outside ``mask``
    get 0. A row with no completion token gets no reward at all: its score is dropped, since there is no
    token to credit it to. The result is detached: rewards are targets, not something to differentiate.
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


def reinforce_pp_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    global_sum: GlobalSum = local_sum,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): per-token discounted returns ``G_t = sum_{k >= t} gamma^(k-t) r_k`` of the
    token rewards (the score on the last token, the KL penalty on every token), normalised over every
    completion token of the batch: ``A_t = (G_t - mean) / std``. The batch mean is the baseline (no critic,
    no group), the std (population, over the valid tokens of every rank through ``global_sum``) the scale.

    Returns ``(advantages, returns)``, both (B, T) and 0 outside ``mask``.
    """
    returns, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma, 1.0)
    return whiten(returns, mask, global_sum=global_sum), returns


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AdvantageInputs:
    """What the training loop prepared for one rollout (this rank's rows)."""

    scores: Tensor
    """(N,) the fused sequence reward."""
    mask: Tensor
    """(N, T) completion tokens."""
    group_size: int
    """Samples per prompt, consecutive rows."""
    token_rewards: Tensor | None = None
    """(N, T) the score on the last token minus the KL penalty when the KL is placed in the reward."""
    values: Tensor | None = None
    """(N, T) the critic's values of the rollout (estimators with ``needs_critic``)."""
    terms: Tensor | None = None
    """(N, K) the reward terms before fusion, in the order of ``term_weights``."""
    term_weights: Tensor | None = None
    """(K,) the terms' combiner weights."""
    global_sum: GlobalSum | None = None
    """Sums a tensor over data-parallel ranks; None on a single process."""


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: ``compute(inputs, **options) -> (advantages, returns or None)``, called with
    exactly the options it names in ``options`` (a subset of :data:`ADVANTAGE_OPTIONS`)."""

    compute: Callable[..., tuple[Tensor, Tensor | None]]
    group_relative: bool = False
    needs_critic: bool = False
    needs_token_rewards: bool = False
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(ADVANTAGE_OPTIONS))
        if unknown:
            raise ValueError(f"advantage estimator options {unknown} are not among {ADVANTAGE_OPTIONS}")


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _grpo(inputs: AdvantageInputs, *, scale: str, min_std: float, per_term: bool) -> tuple[Tensor, None]:
    if per_term:
        if inputs.terms is None or inputs.term_weights is None:
            raise ValueError("per-term advantages need the reward terms and their weights")
        advantages = per_term_advantages(inputs.terms, inputs.term_weights, inputs.group_size, scale,
                                         min_std=min_std, global_sum=inputs.global_sum)
    else:
        advantages = group_advantages(inputs.scores, inputs.group_size, scale, min_std=min_std,
                                      global_sum=inputs.global_sum)
    return advantages, None


def _rloo(inputs: AdvantageInputs) -> tuple[Tensor, None]:
    return rloo_advantages(inputs.scores, inputs.group_size), None


def _reinforce_pp(inputs: AdvantageInputs, *, gamma: float) -> tuple[Tensor, Tensor]:
    return reinforce_pp_advantages(inputs.token_rewards, inputs.mask, gamma, inputs.global_sum or local_sum)


def _gae(inputs: AdvantageInputs, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    return gae(inputs.token_rewards, inputs.values, inputs.mask, gamma, lam)


ADVANTAGE_ESTIMATORS.register("grpo")(
    AdvantageEstimator(_grpo, group_relative=True, options=("scale", "min_std", "per_term")))
ADVANTAGE_ESTIMATORS.register("rloo")(AdvantageEstimator(_rloo, group_relative=True))
ADVANTAGE_ESTIMATORS.register("reinforce_pp")(
    AdvantageEstimator(_reinforce_pp, needs_token_rewards=True, options=("gamma",)))
ADVANTAGE_ESTIMATORS.register("gae")(
    AdvantageEstimator(_gae, needs_critic=True, needs_token_rewards=True, options=("gamma", "lam")))

AdvantageEstimatorName = ADVANTAGE_ESTIMATORS.literal()
