"""PPO math against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cepo.rl.advantages import gae, kl_penalized_rewards
from cepo.rl.kl import AdaptiveKLController, FixedKLController
from cepo.rl.losses import clipped_value_loss, explained_variance
from cepo.rl.reductions import whiten


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


# --- GAE -------------------------------------------------------------------------------------------------


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3;          A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;       A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;       A0 = 0.04 + 0.72*0.246 = 0.21712
    close(adv, [[0.21712, 0.246, 0.3]])
    close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_shorter_sequence_equals_computing_it_alone():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.5, 9.0]])  # 9 and 7 are padding garbage
    values = torch.tensor([[0.5, 0.6, 0.7], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    alone_adv, alone_ret = gae(rewards[1:, :2], values[1:, :2], torch.ones(1, 2), gamma=0.9, lam=0.8)
    # t=1: delta = 0.5 - 0.4 = 0.1; t=0: delta = 0.2 + 0.9*0.4 - 0.3 = 0.26, A0 = 0.26 + 0.72*0.1 = 0.332.
    close(alone_adv, [[0.332, 0.1]])
    close(adv[1, :2], alone_adv[0])
    close(ret[1, :2], alone_ret[0])
    assert adv[1, 2] == 0 and ret[1, 2] == 0
    close(adv[0], [0.21712, 0.246, 0.3])


def test_gae_padding_anywhere_does_not_change_valid_tokens():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(1, 4, generator=gen), torch.randn(1, 4, generator=gen)
    ref_adv, ref_ret = gae(rewards, values, torch.ones(1, 4), gamma=0.95, lam=0.9)
    # Left padding and a hole in the middle, filled with garbage.
    padded_r = torch.tensor([[5.0, rewards[0, 0], rewards[0, 1], 5.0, rewards[0, 2], rewards[0, 3]]])
    padded_v = torch.tensor([[5.0, values[0, 0], values[0, 1], 5.0, values[0, 2], values[0, 3]]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]])
    adv, ret = gae(padded_r, padded_v, mask, gamma=0.95, lam=0.9)
    keep = mask[0].bool()
    close(adv[0, keep], ref_adv[0])
    close(ret[0, keep], ref_ret[0])
    assert torch.all(adv[0, ~keep] == 0)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # Reward-to-go 6, 5, 3.
    close(adv, [[5.5, 4.0, 1.5]])
    close(ret, [[6.0, 5.0, 3.0]])


# --- whitening, value loss, explained variance -----------------------------------------------------------


def test_whiten_masked_moments_and_zero_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = whiten(x, mask)
    valid = w[mask.bool()]
    # Valid 1, 2, 3, 4: mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25.
    close(valid, (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25))
    close(valid.mean(), 0.0)
    close(valid.var(unbiased=False), 1.0, atol=1e-4)
    assert torch.all(w[~mask.bool()] == 0)
    kept = whiten(x, mask, shift_mean=False)
    close(kept[mask.bool()].mean(), 2.5)
    assert torch.all(kept[~mask.bool()] == 0)


def test_clipped_value_loss_both_sides_by_hand():
    old = torch.zeros(1, 4)
    values = torch.tensor([[1.0, -1.0, 1.0, 0.1]], requires_grad=True)
    returns = torch.tensor([[1.0, -1.0, 0.0, 0.5]])
    loss, frac = clipped_value_loss(values, old, returns, torch.ones(1, 4), clip_range=0.2)
    # 1: clip(1) = 0.2, max(0, 0.64)/2 = 0.32 (clipped); 2: clip(-1) = -0.2, 0.32 (clipped);
    # 3: max(1, 0.04)/2 = 0.5; 4: inside the range, 0.16/2 = 0.08. Mean 1.22 / 4 = 0.305.
    close(loss, 0.305)
    close(frac, 0.5)
    loss.backward()
    # Clipped tokens get no gradient; token 3: (1 - 0)/4 = 0.25, token 4: (0.1 - 0.5)/4 = -0.1.
    close(values.grad, [[0.0, 0.0, 0.25, -0.1]])


def test_clipped_value_loss_micro_batches_sum_with_normalizer():
    gen = torch.Generator().manual_seed(2)
    v, old, ret = (torch.randn(4, 3, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    full, _ = clipped_value_loss(v, old, ret, mask, 0.2)
    norm = mask.sum().float()
    parts = [clipped_value_loss(v[s], old[s], ret[s], mask[s], 0.2, normalizer=norm)[0]
             for s in (slice(0, 1), slice(1, 4))]
    close(sum(parts), full)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # Residual (0, 1, 0, 1): variance 0.25; returns' variance 1.25 -> 1 - 0.2 = 0.8.
    close(explained_variance(torch.tensor([[1.0, 1.0, 3.0, 3.0, 0.0]]), returns, mask), 0.8)
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.zeros(1, 5), returns, mask), 0.0)
    assert explained_variance(torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)).item() == 0.0


# --- rewards and KL controllers --------------------------------------------------------------------------


def test_kl_penalized_rewards_puts_score_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, float("nan")], [0.1, 0.1, 0.1], [9.0, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 1, 1]])
    r = kl_penalized_rewards(scores, kl, mask, kl_coef=0.5)
    # Row 0: -0.05, -0.1, -0.15 + 1. Row 1: -0.2, -0.25 + 2, 0. Row 2: empty, score dropped.
    # Row 3 (left padded): 0, -0.1, -0.2 + 4.
    close(r, [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0], [0.0, -0.1, 3.8]])


def test_adaptive_kl_controller_update_rule_by_hand():
    ctl = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=7.2, n_steps=500)  # error 7.2/6 - 1 = 0.2; mult 1 + 0.2 * 0.05 = 1.01
    assert ctl.value == pytest.approx(0.101)
    ctl.update(current_kl=12.0, n_steps=500)  # error 1.0 clipped to 0.2: mult 1.01
    assert ctl.value == pytest.approx(0.101 * 1.01)
    ctl.update(current_kl=3.0, n_steps=1000)  # error -0.5 clipped to -0.2: mult 1 - 0.02 = 0.98
    assert ctl.value == pytest.approx(0.101 * 1.01 * 0.98)
    ctl.update(current_kl=6.6, n_steps=1000)  # error 0.1 unclipped: mult 1.01
    assert ctl.value == pytest.approx(0.101 * 1.01 * 0.98 * 1.01)


def test_kl_controllers_state_round_trip():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    ctl.update(2.0, 10)
    restored = AdaptiveKLController(0.2, target=1.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value != 0.2
    ctl.update(0.5, 10)
    restored.update(0.5, 10)
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_validates_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
