"""The arithmetic of the coherence reward: pure tensor functions, no model and no I/O.

Every function works on one matrix ``(rows, d)`` or on a batch of them ``(..., rows, d)``. Batches of
matrices with different row counts are zero padded; where a padded row would change a result (the mean
unit row counts rows) a boolean row mask ``(..., rows)`` says which rows are real. Zero rows do not change
Frobenius products, norms or singular values, so every other function is padding safe as it is.

Notation follows the design notes (docs/design.md#jacobians): ``J_ZX`` (|Z| x d) is the gradient of the rationale's
log-likelihood with respect to the prompt's input embeddings, ``J_ZYtot`` (|Z| x d) and ``J_XY`` (|X| x d)
those of the answer's log-likelihood with respect to the prompt and the rationale.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNIT_ROW_EPS = 1e-8  # added to a row norm before dividing (mean unit row)
DIRECT_EPS = 1e-8  # added to ||V||^2 in the direct-effect regression
PROJECT_EPS = 1e-12  # added to ||Jcf||^2 (projection) and ||J||^2 (magnitude)
TINY = 1e-12  # squared norms at or below this count as zero
DEFAULT_FLOOR = 0.005


def frobenius_inner(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>_F`` over the last two dims: ``(..., rows, d) x (..., rows, d) -> (...)``."""
    return (a * b).sum(dim=(-2, -1))


def frobenius_sq(a: Tensor) -> Tensor:
    """``||a||_F^2`` over the last two dims."""
    return frobenius_inner(a, a)


def mean_unit_row(J: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """``u = mean_i J[i] / (||J[i]|| + 1e-8)`` over the real rows: ``(..., rows, d) -> (..., d)``.

    Rows where ``row_mask`` is False are ignored (neither summed nor counted); a matrix with no real row
    gives the zero vector.
    """
    unit = J / (J.norm(dim=-1, keepdim=True) + UNIT_ROW_EPS)
    if row_mask is None:
        if J.shape[-2] == 0:
            return J.new_zeros(J.shape[:-2] + J.shape[-1:])
        return unit.mean(dim=-2)
    mask = row_mask.to(J.dtype).unsqueeze(-1)  # (..., rows, 1)
    count = mask.sum(dim=-2)  # (..., 1)
    return (unit * mask).sum(dim=-2) / count.clamp_min(1.0)


def direct_effect(
    J_ZYtot: Tensor,
    J_ZX: Tensor,
    J_XY: Tensor,
    xy_mask: Tensor | None = None,
) -> Tensor:
    """The direct Z->Y sensitivity: ``J_ZYtot`` minus its part carried through the rationale.

    A one-regressor projection (docs/design.md#jacobians)::

        u = mean_i J_XY[i] / (||J_XY[i]|| + 1e-8)          # (d,)
        V = J_ZX * u                                         # each row of J_ZX times u, elementwise
        a = <J_ZYtot, V>_F / (||V||_F^2 + 1e-8)
        J_ZY = J_ZYtot - a V

    and ``J_ZY = J_ZYtot`` when X is empty (no real row of ``J_XY``) or ``||V||_F^2 <= 1e-12``.

    Shapes: ``J_ZYtot`` and ``J_ZX`` are ``(..., |Z|, d)``; ``J_XY`` is ``(..., |X|, d)`` with optional
    ``xy_mask`` ``(..., |X|)``. Leading dims broadcast, so one base ``J_XY`` of shape ``(B, 1, |X|, d)`` serves
    K counterfactual prompts ``(B, K, |Z|, d)``.
    """
    u = mean_unit_row(J_XY, xy_mask)  # (..., d)
    V = J_ZX * u.unsqueeze(-2)  # (..., |Z|, d)
    v_sq = frobenius_sq(V)
    a = frobenius_inner(J_ZYtot, V) / (v_sq + DIRECT_EPS)
    if xy_mask is None:
        has_x = torch.tensor(J_XY.shape[-2] > 0, device=v_sq.device)
    else:
        has_x = row_mask_any(xy_mask)  # (...), broadcasts against v_sq
    keep_total = (~has_x) | (v_sq <= TINY)
    a = torch.where(keep_total, torch.zeros_like(a), a)
    return J_ZYtot - a[..., None, None] * V


def row_mask_any(row_mask: Tensor) -> Tensor:
    """True where a matrix has at least one real row: ``(..., rows) -> (...)``."""
    if row_mask.shape[-1] == 0:
        return torch.zeros(row_mask.shape[:-1], dtype=torch.bool, device=row_mask.device)
    return row_mask.bool().any(dim=-1)


def project_out(J: Tensor, Jcf: Tensor) -> Tensor:
    """The residual of ``J`` after removing its component along the counterfactual mean ``Jcf``.

    ``R = J - (<J, Jcf>_F / (||Jcf||_F^2 + 1e-12)) Jcf``, and ``R = J`` where ``||Jcf||_F^2 <= 1e-12``
    (docs/design.md#counterfactuals). Shapes ``(..., rows, d)``, broadcastable.
    """
    cf_sq = frobenius_sq(Jcf)
    coef = frobenius_inner(J, Jcf) / (cf_sq + PROJECT_EPS)
    coef = torch.where(cf_sq <= TINY, torch.zeros_like(coef), coef)
    return J - coef[..., None, None] * Jcf


def align_rows(J_cf: Tensor, n_rows: int | Tensor, width: int | None = None) -> Tensor:
    """Align a counterfactual matrix to the base matrix's row count: truncate extra rows, zero-pad
    missing ones.

    ``n_rows`` an int: ``(..., m, d) -> (..., n_rows, d)``. ``n_rows`` a tensor of per-matrix row counts
    (shape = the leading dims of ``J_cf``): the output keeps the width ``max(n_rows)`` and zeroes row i
    of matrix b wherever ``i >= n_rows[b]``; rows of ``J_cf`` past its own length must already be zero
    (the usual zero padding), which then supplies the padding. ``width`` overrides the output width
    (at least ``max(n_rows)``), e.g. to match a padded base batch.
    """
    if isinstance(n_rows, int):
        m = J_cf.shape[-2]
        if m >= n_rows:
            return J_cf[..., :n_rows, :]
        pad = J_cf.new_zeros(J_cf.shape[:-2] + (n_rows - m, J_cf.shape[-1]))
        return torch.cat([J_cf, pad], dim=-2)
    if width is None:
        width = int(n_rows.max()) if n_rows.numel() else 0
    out = align_rows(J_cf, width)
    keep = torch.arange(width, device=J_cf.device) < n_rows.to(J_cf.device).unsqueeze(-1)  # (..., width)
    return out * keep.unsqueeze(-1).to(out.dtype)


def shape_score(R: Tensor) -> Tensor:
    """``s1^2 / sum_i s_i^2`` over the singular values of ``R`` (0 if ``R`` is empty or zero).

    Computed in float32: ``s_i^2`` are the eigenvalues of the smaller Gram matrix (``R R^T`` when rows <=
    d, else ``R^T R``), so the ratio is the top eigenvalue over the trace. ``R`` is first scaled to unit
    Frobenius norm (the ratio is scale free) so that tiny gradients do not underflow when squared.
    ``(..., rows, d) -> (...)``; zero rows add zero eigenvalues and change nothing. A matrix holding an
    inf or NaN scores 0 (the other matrices of a batch are unaffected).
    """
    R = R.float()
    out_shape = R.shape[:-2]
    if R.shape[-2] == 0 or R.shape[-1] == 0:
        return R.new_zeros(out_shape)
    # Divide by the largest entry first (squares of tiny entries underflow), then by the norm.
    peak = R.abs().flatten(-2).amax(dim=-1)  # (...)
    ok = torch.isfinite(peak) & (peak > 0)
    scaled = R / torch.where(ok, peak, torch.ones_like(peak))[..., None, None]
    # A matrix with an inf or NaN scores 0 instead of failing the eigen-decomposition of the whole batch.
    scaled = torch.where(ok[..., None, None], scaled, torch.zeros_like(scaled))
    scaled = scaled / scaled.flatten(-2).norm(dim=-1).clamp_min(1.0)[..., None, None]
    if R.shape[-2] <= R.shape[-1]:
        gram = scaled @ scaled.transpose(-1, -2)  # (..., rows, rows)
    else:
        gram = scaled.transpose(-1, -2) @ scaled  # (..., d, d)
    top = torch.linalg.eigvalsh(gram)[..., -1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)  # = 1 up to rounding
    ratio = (top / trace.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)
    return torch.where(ok, ratio, torch.zeros_like(ratio))


def magnitude_score(R: Tensor, J: Tensor) -> Tensor:
    """``clip(||R||_F^2 / (||J||_F^2 + 1e-12), 0, 1)``: the share of ``J`` that survives the projection
    (= 1 - cos^2 between ``J`` and the counterfactual mean). ``(..., rows, d) -> (...)``."""
    return (frobenius_sq(R) / (frobenius_sq(J) + PROJECT_EPS)).clamp(0.0, 1.0)


def floor_squash(x: Tensor, floor: float = DEFAULT_FLOOR) -> Tensor:
    """``f + (1 - f) * clip(x, 0, 1)``: maps [0, 1] onto [f, 1] so scores stay positive."""
    return floor + (1.0 - floor) * x.clamp(0.0, 1.0)


def channel_score(shape: Tensor, magnitude: Tensor, floor: float = DEFAULT_FLOOR) -> Tensor:
    """``S = f + (1 - f) * clip(sqrt(shape * mag), 0, 1)``, in [f, 1]."""
    return floor_squash((shape * magnitude).clamp_min(0.0).sqrt(), floor)


def hardened_channel(J: Tensor, Jcf: Tensor, floor: float = DEFAULT_FLOOR) -> tuple[Tensor, Tensor, Tensor]:
    """(score, shape, magnitude) of one channel: project the counterfactual mean ``Jcf`` out of ``J``
    and score the residual. ``(..., rows, d) -> 3 x (...)``."""
    R = project_out(J, Jcf)
    shape = shape_score(R)
    magnitude = magnitude_score(R, J).to(shape.dtype)
    return channel_score(shape, magnitude, floor), shape, magnitude


def naive_channel_score(J: Tensor, floor: float = DEFAULT_FLOOR) -> Tensor:
    """The unhardened score of the reward-hacking baseline: ``floor_squash(shape(J))`` of the base
    matrix, with no counterfactual projection and no magnitude term."""
    return floor_squash(shape_score(J), floor)
