"""GRPO math: group-relative advantages, the clipped surrogate, the k3 KL term and loss aggregation.

Every function here is a pure function of tensors (no Lightning, no I/O, no config objects) so that it can
be tested against numbers worked out by hand. Completion tensors are ``(batch, T)`` and come with a ``mask``
of the same shape (float or bool) that is 1 on real completion tokens and 0 after EOS and on padding.

References: GRPO is from DeepSeekMath (Shao et al. 2024); the token-level ("dapo") aggregation and the
asymmetric clip range are from DAPO (Yu et al. 2025); the constant-normalizer ("dr_grpo") aggregation and
the option not to scale advantages by the group std are from Dr. GRPO (Liu et al. 2025); the clipped
surrogate is PPO's (Schulman et al. 2017).
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


# ---------------------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` weighted by ``mask`` over ``dim`` (all elements when ``None``).

    Positions where ``mask`` is 0 are excluded even if ``x`` holds ``inf`` or ``nan`` there (padding often
    carries garbage log-probs), so they can never poison the sum.
    """
    mask = mask.to(x.dtype)
    weighted = torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero (``mask`` acts as weights).

    An empty mask (along ``dim``, or overall when ``dim`` is ``None``) gives 0 rather than NaN, so a batch or a
    sequence without a single completion token contributes nothing instead of breaking the step.
    """
    total = masked_sum(x, mask, dim)
    count = masked_sum(torch.ones_like(x), mask, dim)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(total))


# ---------------------------------------------------------------------------------------------------------
# Advantages
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


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024): each reward minus the mean of its group.

    ``rewards`` is (N,) with the samples of one prompt in consecutive rows: rows ``0..G-1`` belong to prompt 0,
    rows ``G..2G-1`` to prompt 1, and so on. The centred reward is then divided by

    - ``"group"``: the group's standard deviation plus ``eps`` (the original GRPO),
    - ``"batch"``: the standard deviation of all N rewards plus ``eps`` (robust when groups are nearly
      constant, as in TRL's ``scale_rewards="batch"``),
    - ``"none"``: nothing, which Dr. GRPO (Liu et al. 2025) argues removes a difficulty bias.

    Standard deviations are the unbiased (Bessel-corrected, ``n - 1``) estimate, PyTorch's default and TRL's
    choice; with a single sample the spread is taken as 0. A group whose rewards are all equal gets exactly
    zero advantages (not a rounding residue divided by ``eps``): it carries no learning signal.

    Returns a floating tensor (N,) with the dtype of ``rewards`` (float32 for integer rewards).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose one of {', '.join(ADVANTAGE_SCALES)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = _grouped(rewards, group_size)  # (num_groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        centred = centred / (std + eps)
    return centred.reshape(-1)


def zero_std_fraction(rewards: Tensor, group_size: int) -> Tensor:
    """Fraction of groups whose rewards are all equal, hence give no gradient (a scalar tensor).

    DAPO (Yu et al. 2025) filters such groups out ("dynamic sampling"); logging the fraction shows how much
    of each batch is wasted.
    """
    grouped = _grouped(rewards, group_size)
    constant = grouped.amax(dim=1) == grouped.amin(dim=1)
    return constant.float().mean()


# ---------------------------------------------------------------------------------------------------------
# Per-token terms
# ---------------------------------------------------------------------------------------------------------


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(r) - r - 1`` with ``r = ref_logp - logp``.

    This is Schulman's low-variance, always non-negative approximator ("Approximating KL divergence", 2020),
    unbiased for the KL when tokens are sampled from ``pi``; GRPO uses it as a loss term. ``expm1`` keeps the
    small-``r`` regime accurate, and the clamp removes rounding residues below zero.
    """
    r = ref_logp - logp
    return (torch.expm1(r) - r).clamp_min(0.0)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017) per token, with DAPO's optional asymmetric clip range.

    ``logp`` and ``old_logp`` are (B, T); ``advantages`` is (B,) (broadcast over the tokens of a sequence, as
    in GRPO) or (B, T). With ``ratio = exp(logp - old_logp)`` the per-token loss is

        -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    where ``eps_high`` defaults to ``eps_low`` (DAPO's "clip-higher" sets it larger to keep exploring).

    Returns ``(loss, clipped_low, clipped_high)``, all (B, T); the two bool tensors mark where the clip is
    active and the token therefore gets no gradient: ``clipped_low`` where ``A < 0`` and ``ratio < 1 - eps_low``,
    ``clipped_high`` where ``A > 0`` and ``ratio > 1 + eps_high``. They are not masked: combine with ``mask``.
    """
    if eps_high is None:
        eps_high = eps_low
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be non-negative, got eps_low={eps_low}, eps_high={eps_high}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1), broadcast over T
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_low = (advantages < 0) & (ratio < 1.0 - eps_low)
    clipped_high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return loss, clipped_low, clipped_high


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: (..., V) -> (...), in float32.

    Uses ``H = logsumexp(z) - sum(softmax(z) * z)``, which never takes the log of a probability that
    underflowed to 0, so it stays finite for very peaked distributions. Logits of ``-inf`` (tokens banned
    by a sampling filter) have probability 0 and contribute 0 instead of ``0 * -inf = nan``.
    """
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits))
    return log_normalizer - weighted.sum(dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------


def _check_loss_type(mode: str) -> None:
    if mode not in LOSS_TYPES:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_TYPES)}")


def loss_normalizer(mask: Tensor, mode: str, max_completion_length: int | None = None) -> Tensor:
    """The denominator :func:`aggregate_loss` uses for ``mode`` on a batch with this ``mask`` (scalar tensor).

    Call it once on the mask of the whole mini-batch and pass the result as ``normalizer`` to
    :func:`aggregate_loss` (or :func:`grpo_loss`) for each micro-batch: the micro-batch losses then sum to
    exactly the full mini-batch loss, whatever the split. The values are

    - ``"grpo"``: the number of sequences with at least one completion token,
    - ``"dapo"``: the total mask weight (the number of completion tokens),
    - ``"dr_grpo"``: ``B * max_completion_length`` with ``B`` the number of rows of ``mask``,

    replaced by 1 when they are 0 (the numerator is then 0 too, so the loss is 0 rather than NaN). Under data
    parallelism, sum the ``"grpo"`` and ``"dapo"`` values over ranks and divide the loss by the world size
    if the strategy averages gradients.
    """
    _check_loss_type(mode)
    mask = mask.float()
    if mode == "grpo":
        value = (mask.sum(dim=-1) > 0).sum().float()
    elif mode == "dapo":
        value = mask.sum()
    else:
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the generation budget in tokens)")
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
        value = mask.new_tensor(float(mask.shape[0] * max_completion_length))
    return torch.where(value > 0, value, torch.ones_like(value))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    max_completion_length: int | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) over the completion tokens to a scalar.

    - ``"grpo"`` (Shao et al. 2024): mean over each sequence's own tokens, then mean over sequences. A
      sequence with no completion token contributes 0 and is not counted in the number of sequences.
      Long sequences weigh less per token, which DAPO and Dr. GRPO identify as a length bias.
    - ``"dapo"`` (Yu et al. 2025): sum over all tokens divided by the number of tokens in the batch.
    - ``"dr_grpo"`` (Liu et al. 2025): sum over all tokens divided by ``B * max_completion_length``, a
      constant that does not depend on the lengths generated.

    ``normalizer`` replaces the denominator of the outer mean (number of sequences for ``"grpo"``, number
    of tokens for ``"dapo"``, ``B * max_completion_length`` for ``"dr_grpo"``). For gradient accumulation,
    pass :func:`loss_normalizer` of the *whole* mini-batch's mask to every micro-batch: for ``"grpo"`` each
    micro-batch then returns (sum of its per-sequence means) / (non-empty sequences in the mini-batch), for
    ``"dapo"`` (its token sum) / (tokens in the mini-batch), for ``"dr_grpo"`` (its token sum) /
    (mini-batch rows * ``max_completion_length``), and the micro-batch losses sum to the full-batch loss.
    With ``normalizer`` given, ``max_completion_length`` is not needed.
    """
    _check_loss_type(mode)
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have one shape")
    if normalizer is None:
        normalizer = loss_normalizer(mask, mode, max_completion_length)
    elif not isinstance(normalizer, Tensor) and not normalizer > 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    if mode == "grpo":
        numerator = masked_mean(per_token, mask, dim=-1).sum()  # sum of per-sequence means
    else:
        numerator = masked_sum(per_token, mask)
    return numerator / normalizer


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective: clipped surrogate plus ``beta`` times the k3 KL to the reference, aggregated.

    ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are (B, T); ``advantages`` is (B,) or (B, T). The KL
    term is added only when ``beta > 0`` (and then ``ref_logp`` is required); when ``ref_logp`` is given the
    KL is still reported. ``loss_type``, ``max_completion_length`` and ``normalizer`` are passed to
    :func:`aggregate_loss` (see there for gradient accumulation).

    Returns ``(loss, stats)``. ``stats`` holds detached scalars: ``"policy_loss"`` (the surrogate part,
    aggregated the same way), ``"clip_fraction_low"``, ``"clip_fraction_high"`` and their sum
    ``"clip_fraction"`` (fractions of completion tokens), ``"ratio_mean"`` (token mean of the ratio) and,
    when ``ref_logp`` is given, ``"kl"`` (token mean of k3). These token means are over this call's tokens,
    not scaled by ``normalizer``.
    """
    if beta < 0:
        raise ValueError(f"beta (the KL coefficient) must be non-negative, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 adds a KL term to the loss and needs ref_logp (reference log-probs)")
    if normalizer is None:
        normalizer = loss_normalizer(mask, loss_type, max_completion_length)
    surrogate, clipped_low, clipped_high = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    per_token = surrogate
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta > 0:
            per_token = surrogate + beta * kl
    loss = aggregate_loss(per_token, mask, loss_type, max_completion_length, normalizer)

    with torch.no_grad():
        low = masked_mean(clipped_low.float(), mask)
        high = masked_mean(clipped_high.float(), mask)
        stats = {
            "policy_loss": aggregate_loss(surrogate.detach(), mask, loss_type, max_completion_length, normalizer),
            "clip_fraction_low": low,
            "clip_fraction_high": high,
            "clip_fraction": low + high,
            "ratio_mean": masked_mean(torch.exp(logp.detach() - old_logp.detach()), mask),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats
