"""The Minkowski (weighted power-mean) combiner of accuracy and coherence rewards.

``R = (sum_i w_i v_i^p)^(1/p)`` over the signals ``v = (accuracy, S_ZX, S_XY, S_ZY)``. The exponent p is
the one knob trading accuracy against coherence: p < 1 is concave, so a high coherence score cannot buy
back a wrong answer (design reference, section 5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

GEOMETRIC_EPS = 1e-6  # |p| below this is the geometric mean
POWER_FLOOR = 1e-12  # inputs are floored here for p <= 0 so that v^p and log v stay finite

def normalized_weights(weights: Tensor | Sequence[float], n: int) -> Tensor:
    """Weights as a float64 ``(n,)`` tensor summing to 1: negative and NaN weights become 0, +inf
    weights share all the mass, and all-zero weights become uniform."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    if w.numel() != n:
        raise ValueError(f"power_mean got {w.numel()} weights for {n} signals")
    w = torch.where(torch.isnan(w) | (w < 0), torch.zeros_like(w), w)
    if torch.isinf(w).any():
        w = torch.isinf(w).to(torch.float64)
    total = w.sum()
    if total <= 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64) if n else w
    return w / total


def power_mean(values: Tensor, weights: Tensor | Sequence[float], p: float) -> Tensor:
    """The weighted power mean ``(sum_i w_i v_i^p)^(1/p)`` of each row of ``values`` ``(N, n) -> (N,)``.

    - NaN inputs become 0 and every input is clipped to [0, 1]; weights as :func:`normalized_weights`.
    - Terms with zero weight are dropped entirely (they cannot pull the min to 0 or the max to 1).
    - ``|p| < 1e-6``: the weighted geometric mean ``exp(sum_i w_i log v_i)``.
    - ``p = +inf`` / ``-inf``: max / min over the terms with positive weight.
    - For p <= 0 (and the geometric mean) inputs are floored at 1e-12 before the power or the log.
    - Otherwise evaluated in log space, ``exp(logsumexp(log w_i + p log v_i) / p)``, so large ``|p|``
      neither overflows nor underflows; large ``|p|`` tends to the max / min.

    Computed in float64; returned in the input's floating dtype (float32 for integer input), clipped
    to [0, 1].
    """
    values = torch.as_tensor(values)
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    if values.dim() != 2:
        raise ValueError(f"power_mean expects values of shape (N, n), got {tuple(values.shape)}")
    p = float(p)
    if math.isnan(p):
        raise ValueError("power_mean: p is NaN")
    v = torch.nan_to_num(values.detach().to(torch.float64), nan=0.0).clamp(0.0, 1.0)
    w = normalized_weights(weights, v.shape[1]).to(v.device)
    keep = w > 0
    v, w = v[:, keep], w[keep]
    if v.shape[1] == 0:
        return torch.zeros(v.shape[0], dtype=out_dtype, device=values.device)

    if p == math.inf:
        out = v.amax(dim=1)
    elif p == -math.inf:
        out = v.amin(dim=1)
    elif p == 1.0:
        out = v @ w
    else:
        if p <= 0 or abs(p) < GEOMETRIC_EPS:
            v = v.clamp_min(POWER_FLOOR)
        log_v = v.log()  # -inf only where v = 0 and p > 0, whose terms then vanish
        if abs(p) < GEOMETRIC_EPS:
            out = torch.exp(log_v @ w)
        else:
            out = torch.exp(torch.logsumexp(w.log() + p * log_v, dim=1) / p)
    return out.clamp(0.0, 1.0).to(out_dtype)


def fuse_terms(terms: Mapping[str, Tensor], weights: Mapping[str, float], p: float) -> Tensor:
    """The fused reward ``(N,)``: the weighted power mean (exponent ``p``) of the reward terms ``(N,)`` each,
    weighted by ``weights[name]``; the one fusion that training and the reward diagnostics share.

    All-zero weights are an error: there is nothing to fuse (the power mean would treat them as uniform).
    """
    names = list(terms)
    w = torch.tensor([weights[name] for name in names])
    if float(w.sum()) <= 0:
        raise ValueError(f"all reward terms {names} have weight 0; give at least one a positive weight")
    return power_mean(torch.stack([terms[name] for name in names], dim=1), w, p)
