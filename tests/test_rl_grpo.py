"""GRPO math (group advantages, the clipped surrogate, k3, aggregation, the policy objective) against numbers
worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cepo.rl.advantages import group_advantages, zero_std_fraction
from cepo.rl.kl import k3_kl
from cepo.rl.losses import aggregate_loss, clipped_surrogate, loss_normalizer
from cepo.rl.losses import policy_objective
from cepo.rl.reductions import entropy_from_logits, masked_mean, masked_sum


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])


# --- advantages ------------------------------------------------------------------------------------------


def test_group_advantages_group_scale_by_hand():
    # Group 0: mean 0.5, centred +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350.
    # 0.5 / (0.577350 + 1e-6) = 0.866024. Group 1 is constant: exactly 0.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(group_advantages(REWARDS, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_group_advantages_batch_and_none_scales_by_hand():
    close(group_advantages(REWARDS, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # Whole batch: mean 0.5, squared deviations 4 * 0.25 + 4 * 0 = 1, unbiased var 1/7, std 0.377964.
    a = 0.5 / (math.sqrt(1 / 7) + 1e-6)
    close(group_advantages(REWARDS, 4, scale="batch"), [a, -a, -a, a, 0, 0, 0, 0])


def test_constant_group_is_exactly_zero_despite_rounding():
    # mean(0.1, 0.1, 0.1) in float32 need not equal 0.1; the residue must not be blown up by 1 / eps.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    assert torch.equal(group_advantages(rewards, 3), torch.zeros(6))


def test_group_size_one_gives_zero_advantages():
    assert torch.equal(group_advantages(torch.tensor([1.0, 3.0]), 1), torch.zeros(2))


def test_group_advantages_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(8), 4, scale="rank")


def test_zero_std_fraction():
    assert zero_std_fraction(REWARDS, 4).item() == pytest.approx(0.5)
    with_constant = torch.cat([REWARDS, torch.ones(4)])
    assert zero_std_fraction(with_constant, 4).item() == pytest.approx(2 / 3)


# --- KL and surrogate ------------------------------------------------------------------------------------


def test_k3_kl_by_hand_and_zero_at_reference():
    # r = log 0.25 - log 0.5 = -ln 2; exp(r) - r - 1 = 0.5 + 0.693147 - 1 = 0.193147.
    logp = torch.log(torch.tensor([0.5]))
    ref = torch.log(torch.tensor([0.25]))
    close(k3_kl(logp, ref), [0.5 + math.log(2) - 1])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1))
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=gen) * 3, torch.randn(1000, generator=gen) * 3
    assert (k3_kl(a, b) >= 0).all()


def _surrogate_inputs():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    old_logp = torch.full((2, 3), -1.0)
    logp = (old_logp + ratios.log()).requires_grad_()
    advantages = torch.tensor([2.0, -1.0])
    return logp, old_logp, advantages


def test_clipped_surrogate_values_masks_and_gradient():
    logp, old_logp, adv = _surrogate_inputs()
    loss, flags = clipped_surrogate(logp, old_logp, adv, epsilon=0.2, epsilon_high=0.28)
    low, high = flags["clip_fraction_low"], flags["clip_fraction_high"]
    # A = +2: r=1.5 -> min(3.0, 1.28*2=2.56) = 2.56 (clipped high); r=0.5 -> min(1.0, 0.8*2=1.6) = 1.0;
    #         r=1.1 -> 2.2.
    # A = -1: r=1.5 -> min(-1.5, -1.28) = -1.5; r=0.5 -> min(-0.5, -0.8) = -0.8 (clipped low); r=1.1 -> -1.1.
    close(loss, [[-2.56, -1.0, -2.2], [1.5, 0.8, 1.1]])
    assert high.tolist() == [[True, False, False], [False, False, False]]
    assert low.tolist() == [[False, False, False], [False, True, False]]
    # d(-r A)/d logp = -r A where unclipped; exactly 0 where the clip is active.
    loss.sum().backward()
    close(logp.grad, [[0.0, -1.0, -2.2], [1.5, 0.0, 1.1]])
    assert torch.all(logp.grad[low | high] == 0)


def test_clip_flags_never_count_a_zero_advantage():
    # A = 0 (every sample of a constant group) gives zero loss and zero gradient whatever the ratio: the
    # clip cannot be what stops its gradient, so neither flag may count it, even with the ratio far out.
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    old_logp = torch.full((2, 3), -1.0)
    logp = old_logp + ratios.log()
    loss, flags = clipped_surrogate(logp, old_logp, torch.zeros(2), epsilon=0.2)
    assert not flags["clip_fraction_low"].any() and not flags["clip_fraction_high"].any()
    close(loss, torch.zeros(2, 3))
    # A constant group next to a learning one: only the learning group's out-of-range tokens count.
    advantages = torch.tensor([0.0, -1.0])
    _, stats = policy_objective(logp, old_logp, advantages, torch.ones(2, 3), epsilon=0.2, aggregation="dapo")
    close(stats["clip_fraction_low"], 1 / 6)  # (1, 0): A < 0 and ratio 0.5 < 0.8
    close(stats["clip_fraction_high"], 0.0)  # A = -1 with ratio 1.5 is not clipped; A = 0 never counts


def test_clipped_surrogate_accepts_token_advantages_and_defaults_eps_high():
    logp, old_logp, adv = _surrogate_inputs()
    per_seq, _ = clipped_surrogate(logp, old_logp, adv, epsilon=0.2)
    per_tok, flags = clipped_surrogate(logp, old_logp, adv[:, None].expand(2, 3), epsilon=0.2)
    high = flags["clip_fraction_high"]
    assert torch.equal(per_seq, per_tok)
    # eps_high defaults to eps_low: r = 1.5 with A = 2 clips at 1.2 -> -2.4.
    close(per_seq[0, 0], -2.4)
    assert high[0, 0]


def test_entropy_from_logits():
    # Uniform over 4: ln 4. p = (0.25, 0.75): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf]])
    close(entropy_from_logits(logits), [math.log(4), 0.25 * math.log(4) + 0.75 * math.log(4 / 3)])
    peaked = entropy_from_logits(torch.tensor([1000.0, 0.0], dtype=torch.float16))
    assert peaked.dtype == torch.float32 and peaked.abs().item() < 1e-6


# --- masked reductions and aggregation -------------------------------------------------------------------


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_masked_helpers_ignore_garbage_and_handle_empty_masks():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert masked_sum(x, mask).item() == 3.0
    assert masked_mean(x, mask).item() == 1.5
    close(masked_mean(x, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), dim=-1), [1.0, 0.0])
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0


def test_aggregate_loss_modes_by_hand():
    # grpo: per-sequence means (1+2)/2 = 1.5 and 4/1 = 4, mean 2.75.
    close(aggregate_loss(PER_TOKEN, MASK, "grpo"), 2.75)
    # dapo: (1 + 2 + 4) / 3 tokens.
    close(aggregate_loss(PER_TOKEN, MASK, "dapo"), 7 / 3)
    # dr_grpo: 7 / (B=2 * L=4).
    close(aggregate_loss(PER_TOKEN, MASK, "dr_grpo", max_completion_length=4), 0.875)


def test_aggregate_loss_empty_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # The empty row is not counted: grpo = 1.5 / 1 sequence. dr_grpo still divides by B * L = 6.
    close(aggregate_loss(PER_TOKEN, mask, "grpo"), 1.5)
    close(aggregate_loss(PER_TOKEN, mask, "dapo"), 1.5)
    close(aggregate_loss(PER_TOKEN, mask, "dr_grpo", max_completion_length=3), 0.5)
    for mode in ("grpo", "dapo"):
        assert aggregate_loss(PER_TOKEN, torch.zeros(2, 3), mode).item() == 0.0


def test_aggregate_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="grpo, dapo, dr_grpo"):
        aggregate_loss(PER_TOKEN, MASK, "token_mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(PER_TOKEN, MASK, "dr_grpo")
    with pytest.raises(ValueError, match="positive"):
        aggregate_loss(PER_TOKEN, MASK, "dapo", normalizer=0.0)


@pytest.mark.parametrize("mode", ["grpo", "dapo", "dr_grpo"])
def test_micro_batch_losses_sum_to_full_batch_loss(mode):
    gen = torch.Generator().manual_seed(1)
    per_token = torch.randn(6, 5, generator=gen)
    lengths = torch.tensor([5, 2, 0, 4, 1, 3])  # includes an empty completion
    mask = torch.arange(5)[None, :] < lengths[:, None]
    full = aggregate_loss(per_token, mask, mode, max_completion_length=5)
    norm = loss_normalizer(mask, mode, max_completion_length=5)
    parts = [aggregate_loss(per_token[s], mask[s], mode, normalizer=norm)
             for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    close(sum(parts), full)
    # Without the shared normalizer the sum is generally wrong, which is why it exists.
    naive = [aggregate_loss(per_token[s], mask[s], mode, max_completion_length=5)
             for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    assert not torch.isclose(sum(naive), full)


# --- full loss -------------------------------------------------------------------------------------------


def test_policy_objective_adds_kl_term_and_reports_stats():
    logp = torch.log(torch.full((2, 2), 0.5))
    ref = torch.log(torch.full((2, 2), 0.25))
    adv = torch.tensor([1.0, -1.0])
    # ratio 1: surrogate tokens -1, -1 | +1, +1; grpo mean 0. k3 = 0.193147 per token, times beta 0.1.
    k3 = 0.5 + math.log(2) - 1
    loss, stats = policy_objective(logp, logp, adv, torch.ones(2, 2), epsilon=0.2, kl_coef=0.1, ref_logp=ref)
    close(loss, 0.1 * k3)
    close(stats["policy_loss"], 0.0)
    close(stats["kl"], k3)
    close(stats["ratio_mean"], 1.0)
    close(stats["clip_fraction"], 0.0)
    # beta = 0: KL reported, not added.
    loss0, stats0 = policy_objective(logp, logp, adv, torch.ones(2, 2), epsilon=0.2, ref_logp=ref)
    close(loss0, 0.0)
    close(stats0["kl"], k3)
    assert "kl" not in policy_objective(logp, logp, adv, torch.ones(2, 2), epsilon=0.2)[1]


def test_policy_objective_clip_fractions_are_masked_token_fractions():
    logp, old_logp, adv = _surrogate_inputs()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # hides the low-clipped token (1, 1)
    loss, stats = policy_objective(logp, old_logp, adv, mask, epsilon=0.2, epsilon_high=0.28, aggregation="dapo")
    close(stats["clip_fraction_high"], 1 / 5)
    close(stats["clip_fraction_low"], 0.0)
    close(stats["clip_fraction"], 1 / 5)
    # dapo over 5 tokens: (-2.56 - 1.0 - 2.2 + 1.5 + 1.1) / 5.
    close(loss, (-2.56 - 1.0 - 2.2 + 1.5 + 1.1) / 5)
    assert all(not v.requires_grad for v in stats.values())
    assert loss.requires_grad


def test_policy_objective_requires_reference_when_beta_positive():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_objective(x, x, torch.ones(1), torch.ones(1, 2), epsilon=0.2, kl_coef=0.04)
