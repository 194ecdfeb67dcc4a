import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cepo.rewards.combiner import normalized_weights, power_mean
from reward_presets import P_ABLATION, PRESETS

unit = st.floats(0.0, 1.0, allow_nan=False)
positive_unit = st.floats(0.05, 1.0, allow_nan=False)
weight = st.one_of(st.just(0.0), st.floats(1e-3, 10.0))


def rows(elements=unit, n=4):
    return st.lists(st.lists(elements, min_size=n, max_size=n), min_size=1, max_size=5)


def weights(n=4):
    return st.lists(weight, min_size=n, max_size=n).filter(lambda w: sum(w) > 1e-3)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


@settings(max_examples=100, deadline=None)
@given(rows(), weights())
def test_p1_is_the_weighted_mean(v, w):
    wn = t(w) / sum(w)
    torch.testing.assert_close(power_mean(t(v), w, 1.0), t(v) @ wn)


@settings(max_examples=100, deadline=None)
@given(rows(positive_unit), weights())
def test_p_to_zero_approaches_the_geometric_mean(v, w):
    wn = t(w) / sum(w)
    geometric = torch.exp(t(v).log() @ wn)
    torch.testing.assert_close(power_mean(t(v), w, 0.0), geometric)
    for p in (1e-4, -1e-4, 1e-7):
        torch.testing.assert_close(power_mean(t(v), w, p), geometric, atol=1e-3, rtol=0)


@settings(max_examples=100, deadline=None)
@given(rows(), weights())
def test_large_p_approaches_max_and_min_over_positive_weight_terms(v, w):
    keep = [i for i in range(4) if w[i] > 0]
    vk = t(v)[:, keep]
    torch.testing.assert_close(power_mean(t(v), w, math.inf), vk.amax(1))
    torch.testing.assert_close(power_mean(t(v), w, -math.inf), vk.amin(1))
    assume(min(w[i] for i in keep) / sum(w) > 1e-3)
    torch.testing.assert_close(power_mean(t(v), w, 1e5), vk.amax(1), atol=1e-3, rtol=0)
    torch.testing.assert_close(power_mean(t(v), w, -1e5), vk.amin(1).clamp_min(1e-12), atol=1e-3, rtol=0)


@settings(max_examples=100, deadline=None)
@given(rows(), weights(), st.sampled_from([-50.0, -2.0, 0.0, 0.2, 0.7, 1.0, 10.0, 50.0, math.inf, -math.inf]))
def test_zero_weight_terms_are_dropped_even_when_zero(v, w, p):
    values = t(v)
    w = [0.0] + list(w[1:])
    assume(sum(w) > 1e-3)
    with_zero = values.clone()
    with_zero[:, 0] = 0.0
    with_one = values.clone()
    with_one[:, 0] = 1.0
    torch.testing.assert_close(power_mean(with_zero, w, p), power_mean(with_one, w, p))
    torch.testing.assert_close(power_mean(with_zero, w, p), power_mean(values[:, 1:], w[1:], p))


@settings(max_examples=100, deadline=None)
@given(rows(), weights(), st.floats(1e-3, 1e3), st.sampled_from([-2.0, 0.0, 0.2, 1.0, 10.0]))
def test_invariant_to_the_scale_of_the_weights(v, w, scale, p):
    torch.testing.assert_close(power_mean(t(v), w, p), power_mean(t(v), [scale * x for x in w], p))


@settings(max_examples=200, deadline=None)
@given(
    rows(st.sampled_from([0.0, 1.0, 1e-300, 0.5, float("nan"), 2.0, -1.0])),
    st.lists(st.sampled_from([0.0, 1.0, 0.1, -1.0, float("nan"), 1e-300]), min_size=4, max_size=4),
    st.floats(-50, 50, allow_nan=False),
)
def test_no_overflow_and_output_in_unit_interval(v, w, p):
    out = power_mean(t(v), w, p)
    assert torch.all(torch.isfinite(out))
    assert torch.all((out >= 0) & (out <= 1))


def test_hand_values_and_weight_cleaning():
    v = t([[0.25, 1.0]])
    assert float(power_mean(v, [1, 1], 0.0)) == pytest.approx(0.5)  # sqrt(0.25 * 1)
    assert float(power_mean(v, [1, 1], -1.0)) == pytest.approx(0.4)  # harmonic mean
    assert float(power_mean(v, [1, 1], 2.0)) == pytest.approx(math.sqrt((0.0625 + 1) / 2))
    assert float(power_mean(v, [-3, float("nan")], 1.0)) == pytest.approx(0.625)  # uniform fallback
    assert float(power_mean(v, [2, -5], 1.0)) == pytest.approx(0.25)  # negative weight -> 0
    assert float(power_mean(t([[float("nan"), 1.0]]), [1, 1], 1.0)) == pytest.approx(0.5)
    assert power_mean(torch.tensor([[0.5, 0.5]]), [1, 1], 0.2).dtype == torch.float32


def test_infinite_weights_share_all_the_mass():
    # +inf outweighs any finite weight: the +inf terms split the mass equally, the others get none.
    assert normalized_weights([math.inf, 1.0, 0.0], 3).tolist() == [1.0, 0.0, 0.0]
    assert normalized_weights([math.inf, 5.0, math.inf], 3).tolist() == [0.5, 0.0, 0.5]
    v = t([[0.25, 1.0, 0.0], [0.81, 0.0, 0.36]])
    for p in (1.0, 0.5, 0.0, -2.0):
        out = power_mean(v, [math.inf, 3.0, math.inf], p)
        assert torch.all(torch.isfinite(out))
        torch.testing.assert_close(out, power_mean(v[:, [0, 2]], [1.0, 1.0], p))
    assert float(power_mean(t([[0.3, 0.9]]), [math.inf, 1e300], 1.0)) == pytest.approx(0.3)


def test_presets_cover_the_table():
    assert set(PRESETS) >= {"cepo", "cepo_geometric", "accuracy_only", "jacobian_only", "naive_jacobian", "weights_0.5"}
    assert PRESETS["cepo"] == (0.2, (0.7, 0.1, 0.1, 0.1))
    assert PRESETS["cepo_geometric"][0] == 0.0 and PRESETS["accuracy_only"] == (1.0, (1.0, 0.0, 0.0, 0.0))
    for p, w in PRESETS.values():
        assert len(w) == 4 and sum(w) == pytest.approx(1.0)
    assert P_ABLATION == (-2, 0, 0.2, 0.7, 1, 10)
    # accuracy_only ignores coherence entirely, even a zero coherence score
    p, w = PRESETS["accuracy_only"]
    assert torch.equal(power_mean(t([[0.8, 0.0, 0.0, 0.0]]), w, p), t([0.8]))
