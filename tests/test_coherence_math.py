import pytest
import torch

from cepo.coherence import math as cm


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def svd_shape(R: torch.Tensor) -> float:
    s = torch.linalg.svdvals(R.double())
    return float(s[0] ** 2 / (s**2).sum())


def test_mean_unit_row_by_hand_and_masked_rows_ignored():
    J = torch.tensor([[3.0, 4.0], [0.0, 2.0], [100.0, -7.0]])
    u = cm.mean_unit_row(J, torch.tensor([True, True, False]))
    torch.testing.assert_close(u, torch.tensor([0.3, 0.9]), atol=1e-7, rtol=0)
    torch.testing.assert_close(cm.mean_unit_row(J[:2]), torch.tensor([0.3, 0.9]), atol=1e-7, rtol=0)
    assert torch.equal(cm.mean_unit_row(torch.zeros(0, 2)), torch.zeros(2))
    assert torch.equal(cm.mean_unit_row(J, torch.zeros(3, dtype=torch.bool)), torch.zeros(2))


def test_direct_effect_vanishes_when_total_is_a_multiple_of_v():
    J_ZX, J_XY = rand(5, 8, seed=1), rand(3, 8, seed=2)
    u = torch.stack([r / (r.norm() + 1e-8) for r in J_XY]).mean(0)
    V = J_ZX * u
    J_ZY = cm.direct_effect(-2.5 * V, J_ZX, J_XY)
    assert J_ZY.abs().max() < 1e-5 * V.abs().max()


def test_direct_effect_residual_is_orthogonal_to_v_and_matches_the_formula():
    J_ZYtot, J_ZX, J_XY = rand(4, 6, seed=3), rand(4, 6, seed=4), rand(2, 6, seed=5)
    J_ZY = cm.direct_effect(J_ZYtot, J_ZX, J_XY)
    V = J_ZX * cm.mean_unit_row(J_XY)
    a = (J_ZYtot * V).sum() / ((V * V).sum() + 1e-8)
    torch.testing.assert_close(J_ZY, J_ZYtot - a * V)
    assert abs(float((J_ZY * V).sum())) < 1e-5 * float(J_ZYtot.norm() * V.norm())


def test_direct_effect_keeps_the_total_for_empty_x_or_tiny_v():
    J_ZYtot, J_ZX = rand(4, 6, seed=6), rand(4, 6, seed=7)
    assert torch.equal(cm.direct_effect(J_ZYtot, J_ZX, torch.zeros(0, 6)), J_ZYtot)
    masked = cm.direct_effect(J_ZYtot, J_ZX, rand(3, 6, seed=8), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(masked, J_ZYtot)
    tiny = cm.direct_effect(J_ZYtot, 1e-8 * J_ZX, rand(3, 6, seed=9))  # ||V||^2 ~ 1e-16 <= 1e-12
    assert torch.equal(tiny, J_ZYtot)


def test_direct_effect_batched_with_padding_equals_per_matrix():
    z_rows, x_rows = [3, 5, 1], [2, 0, 4]
    items = [
        (rand(z, 7, seed=10 + i), rand(z, 7, seed=20 + i), rand(x, 7, seed=30 + i))
        for i, (z, x) in enumerate(zip(z_rows, x_rows))
    ]
    pad = torch.nn.utils.rnn.pad_sequence
    tot = pad([t for t, _, _ in items], batch_first=True)
    zx = pad([z for _, z, _ in items], batch_first=True)
    xy = pad([x for _, _, x in items], batch_first=True)
    xy[1, :] = 99.0  # garbage in padded rows must be ignored through the mask
    mask = torch.arange(xy.shape[1]) < torch.tensor(x_rows)[:, None]
    batched = cm.direct_effect(tot, zx, xy, mask)
    for i, (t, z, x) in enumerate(items):
        torch.testing.assert_close(batched[i, : z_rows[i]], cm.direct_effect(t, z, x))
        assert torch.all(batched[i, z_rows[i] :] == 0)


def test_projection_residual_is_orthogonal_to_the_counterfactual_mean():
    J, Jcf = rand(2, 6, 9, seed=11), rand(2, 6, 9, seed=12)
    R = cm.project_out(J, Jcf)
    inner = (R * Jcf).sum(dim=(-2, -1))
    assert torch.all(inner.abs() < 1e-5 * (J.norm(dim=(-2, -1)) * Jcf.norm(dim=(-2, -1))))
    assert torch.equal(cm.project_out(J, torch.zeros_like(J)), J)
    assert torch.equal(cm.project_out(J, 1e-7 * Jcf), J)  # ||Jcf||^2 <= 1e-12


def test_magnitude_is_one_minus_cos_squared():
    J, Jcf = rand(5, 8, seed=13, dtype=torch.float64), rand(5, 8, seed=14, dtype=torch.float64)
    cos = (J * Jcf).sum() / (J.norm() * Jcf.norm())
    mag = cm.magnitude_score(cm.project_out(J, Jcf), J)
    assert abs(float(mag) - float(1 - cos**2)) < 1e-10
    assert float(cm.magnitude_score(cm.project_out(J, 3 * J), J)) < 1e-10


def test_shape_is_one_for_rank_one_and_unchanged_by_zero_rows():
    R = torch.outer(rand(6, seed=15), rand(10, seed=16))
    assert abs(float(cm.shape_score(R)) - 1.0) < 1e-5
    M = rand(4, 10, seed=17)
    padded = torch.cat([M, torch.zeros(5, 10)])
    assert abs(float(cm.shape_score(M)) - float(cm.shape_score(padded))) < 1e-6
    assert float(cm.shape_score(M)) < 0.9


@pytest.mark.parametrize("rows,d", [(3, 16), (16, 3), (7, 7), (40, 12)])
def test_shape_matches_singular_values_batched(rows, d):
    R = rand(5, rows, d, seed=rows * d)
    R[1] *= 1e-3
    R[2, :, 0] *= 50  # a dominant direction: shape near 1
    got = cm.shape_score(R)
    want = torch.tensor([svd_shape(m) for m in R])
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=0)


def test_shape_is_zero_for_empty_or_zero_and_scale_free_for_tiny_values():
    assert float(cm.shape_score(torch.zeros(0, 8))) == 0.0
    assert float(cm.shape_score(torch.zeros(4, 8))) == 0.0
    M = rand(4, 8, seed=18)
    # Squared entries of 1e-30 underflow in float32: the score must not collapse to 0.
    assert abs(float(cm.shape_score(1e-30 * M)) - svd_shape(M)) < 1e-5


def test_align_rows_truncates_and_zero_pads():
    J = rand(5, 3, seed=19)
    assert torch.equal(cm.align_rows(J, 2), J[:2])
    padded = cm.align_rows(J, 7)
    assert padded.shape == (7, 3) and torch.equal(padded[:5], J) and torch.all(padded[5:] == 0)
    batch = torch.stack([J, J])  # per-matrix row counts 2 and 4, output width overridden to 6
    out = cm.align_rows(batch, torch.tensor([2, 4]), width=6)
    assert out.shape == (2, 6, 3)
    assert torch.equal(out[0, :2], J[:2]) and torch.all(out[0, 2:] == 0)
    assert torch.equal(out[1, :4], J[:4]) and torch.all(out[1, 4:] == 0)


def test_channel_score_by_hand():
    f = 0.005
    got = cm.channel_score(torch.tensor([0.25, 0.0, 1.0, 1.0]), torch.tensor([1.0, 0.7, 1.0, 0.04]), f)
    want = torch.tensor([f + (1 - f) * 0.5, f, 1.0, f + (1 - f) * 0.2])
    torch.testing.assert_close(got, want)


def test_hardened_channel_and_naive_score():
    J = torch.outer(rand(4, seed=20), rand(6, seed=21))
    score, shape, mag = cm.hardened_channel(J, torch.zeros_like(J))
    assert abs(float(shape) - 1) < 1e-5 and float(mag) == pytest.approx(1.0) and float(score) == pytest.approx(1.0)
    score, _, mag = cm.hardened_channel(J, 2 * J)  # fully explained by the counterfactual
    assert float(mag) < 1e-10 and float(score) == pytest.approx(0.005, abs=1e-4)
    M = rand(5, 6, seed=22)
    assert float(cm.naive_channel_score(M, 0.1)) == pytest.approx(0.1 + 0.9 * svd_shape(M), abs=1e-5)
