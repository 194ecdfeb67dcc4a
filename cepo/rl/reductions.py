"""Masked reductions shared by every RL function: sums, means and whitening over completion tokens.

Completion tensors are ``(batch, T)`` with a ``mask`` of the same shape (float or bool) that is 1 on real
completion tokens and 0 after EOS and on padding. Functions that need batch-wide statistics take an
optional ``global_sum``: a function that sums a tensor over data-parallel ranks (identity on one device), so
the same code gives a multi-device run exactly the statistics of a single-device run on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GlobalSum = Callable[[Tensor], Tensor]


def local_sum(value: Tensor) -> Tensor:
    """The ``global_sum`` of a single process: the value itself."""
    return value


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


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           global_sum: GlobalSum = local_sum) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the positions where ``mask`` is set.

    Mean and variance are taken over all valid tokens of the batch (of every rank, through ``global_sum``);
    the variance is the population (divide by ``n``) one, so the result has masked variance exactly 1 up to
    ``eps``. With ``shift_mean=False`` the mean is added back and only the scale changes. Positions outside
    ``mask`` are 0 in the output.
    """
    count = global_sum(masked_sum(torch.ones_like(x), mask))
    count = torch.where(count > 0, count, torch.ones_like(count))
    mean = global_sum(masked_sum(x, mask)) / count
    variance = global_sum(masked_sum((x - mean) ** 2, mask)) / count
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


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
