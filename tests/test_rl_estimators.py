"""RLOO, REINFORCE++, the GRPO options min_std and per_term, the KL estimators and the registries, against
numbers worked out by hand; and a simulated two-rank run of the batch statistics against one process."""

from __future__ import annotations

import math
import threading
import typing

import pytest
import torch

from cepo.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimatorName,
    AdvantageInputs,
    group_advantages,
    kl_penalized_rewards,
    per_term_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from cepo.rl.kl import KL_ESTIMATORS, KLEstimatorName, k1_kl, k2_kl, k3_kl
from cepo.rl.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, LossAggregationName, PolicyLossName
from cepo.rl.reductions import whiten
from cepo.rl.registry import Registry


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


# --- RLOO ------------------------------------------------------------------------------------------------


def test_rloo_is_reward_minus_the_mean_of_the_others():
    rewards = torch.tensor([0.2, 0.4, 0.9, 0.5, 1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    # Group 0: baselines (0.4+0.9+0.5)/3 = 0.6, (0.2+0.9+0.5)/3 = 0.533333, (0.2+0.4+0.5)/3 = 0.366667,
    # (0.2+0.4+0.9)/3 = 0.5. Group 1: 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3. Group 2 is constant: exactly 0.
    expected = [-0.4, 0.4 - 1.6 / 3, 0.9 - 1.1 / 3, 0.0, 2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]
    close(rloo_advantages(rewards, 4), expected)
    assert torch.equal(rloo_advantages(rewards, 4)[8:], torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 0.0]), 1)


# --- REINFORCE++ -----------------------------------------------------------------------------------------


def test_reinforce_pp_returns_and_batch_normalisation_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Scores 1.0 and 0.0 on the last valid token; a k1 KL of 0.1 on the first token of row 0 with coef 1.
    kl = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 7.0]])  # 7.0 sits on padding
    token_rewards = kl_penalized_rewards(torch.tensor([1.0, 0.0]), kl, mask, kl_coef=1.0)
    close(token_rewards, [[-0.1, 0.0, 1.0], [0.0, 0.0, 0.0]])
    advantages, returns = reinforce_pp_advantages(token_rewards, mask, gamma=1.0)
    close(returns, [[0.9, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # Five valid returns 0.9, 1, 1, 0, 0: mean 0.58, population variance 1.128 / 5 = 0.2256.
    std = math.sqrt(0.2256)
    close(advantages, [[0.32 / std, 0.42 / std, 0.42 / std], [-0.58 / std, -0.58 / std, 0.0]], atol=1e-4)
    # gamma = 0.5: 1.0; 0 + 0.5 * 1.0 = 0.5; -0.1 + 0.5 * 0.5 = 0.15.
    _, discounted = reinforce_pp_advantages(token_rewards, mask, gamma=0.5)
    close(discounted[0], [0.15, 0.5, 1.0])


# --- GRPO options ------------------------------------------------------------------------------------------


def test_min_std_keeps_small_spreads_small():
    # Group 0 spreads by 0.01 (unbiased std exactly 0.01); group 1 by 0.5 (std 0.5).
    rewards = torch.tensor([0.50, 0.51, 0.52, 0.0, 0.5, 1.0])
    plain = group_advantages(rewards, 3)
    close(plain[:3], [-0.01 / (0.01 + 1e-6), 0.0, 0.01 / (0.01 + 1e-6)])  # inflated to about +-1
    floored = group_advantages(rewards, 3, min_std=0.1)
    close(floored[:3], [-0.01 / (0.1 + 1e-6), 0.0, 0.01 / (0.1 + 1e-6)])  # about +-0.1
    close(floored[3:], plain[3:])  # a std above the floor is unchanged
    assert torch.equal(group_advantages(rewards, 3, min_std=0.0), plain)  # 0 is off
    # Batch scale: the whole batch's std (0.3847) is above 0.1, so nothing changes there either.
    close(group_advantages(rewards, 3, scale="batch", min_std=0.1), group_advantages(rewards, 3, scale="batch"))
    with pytest.raises(ValueError, match="min_std"):
        group_advantages(rewards, 3, min_std=-1.0)


def test_per_term_advantages_by_hand():
    # Group 0: every sample right, coherence 0.5..0.8. Group 1: accuracy 1, 0, 1, 0; coherence constant.
    accuracy = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    coherence = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.5, 0.5, 0.5, 0.5])
    terms = torch.stack([accuracy, coherence], dim=1)
    weights = torch.tensor([0.7, 0.1])  # normalised to 0.875, 0.125
    advantages = per_term_advantages(terms, weights, 4)
    coherence_std = math.sqrt(0.05 / 3)  # deviations +-0.15, +-0.05
    accuracy_z = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = [0.125 * d / (coherence_std + 1e-6) for d in (-0.15, -0.05, 0.05, 0.15)]
    expected += [0.875 * accuracy_z * s for s in (1, -1, 1, -1)]
    close(advantages, expected)
    # z-scoring a fused reward instead inflates group 0's coherence noise to unit size.
    fused = 0.875 * accuracy + 0.125 * coherence
    assert group_advantages(fused, 4)[:4].abs().max() > 1.1 > 0.2 > advantages[:4].abs().max()


def test_per_term_with_one_term_is_plain_grpo():
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.4, 1.0, 0.0])
    close(per_term_advantages(rewards[:, None], torch.tensor([0.3]), 3), group_advantages(rewards, 3))
    with pytest.raises(ValueError, match="positive sum"):
        per_term_advantages(rewards[:, None], torch.tensor([0.0]), 3)


def test_grpo_registry_entry_routes_its_options():
    scores = torch.tensor([0.50, 0.51, 0.52, 0.0, 0.5, 1.0])
    inputs = AdvantageInputs(scores=scores, mask=torch.ones(6, 2), group_size=3,
                             terms=scores[:, None], term_weights=torch.tensor([1.0]))
    grpo = ADVANTAGE_ESTIMATORS["grpo"]
    options = dict(scale="group", min_std=0.1, per_term=False)
    assert set(grpo.options) == set(options)
    advantages, returns = grpo.compute(inputs, **options)
    assert returns is None and grpo.group_relative and not grpo.needs_critic
    close(advantages, group_advantages(scores, 3, min_std=0.1))
    close(grpo.compute(inputs, **{**options, "per_term": True})[0], advantages)


# --- KL estimators -------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    close(k1_kl(logp, ref), [math.log(2)])
    close(k2_kl(logp, ref), [0.5 * math.log(2) ** 2])
    close(k3_kl(logp, ref), [0.5 + math.log(2) - 1])
    # k1 is unbiased: averaged over samples from pi it gives KL(pi || ref) exactly for a two-point pi.
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    exact = float((p * (p / q).log()).sum())
    close((p * k1_kl(p.log(), q.log())).sum(), exact)
    close((p * k3_kl(p.log(), q.log())).sum(), exact)


# --- registries and the typed options they feed ----------------------------------------------------------


@pytest.mark.parametrize("registry, literal", [
    (ADVANTAGE_ESTIMATORS, AdvantageEstimatorName), (KL_ESTIMATORS, KLEstimatorName),
    (POLICY_LOSSES, PolicyLossName), (LOSS_AGGREGATIONS, LossAggregationName),
])
def test_literal_types_list_exactly_the_registered_names(registry, literal):
    assert typing.get_args(literal) == registry.names()


def test_builtin_names_and_registry_errors():
    assert ADVANTAGE_ESTIMATORS.names() == ("grpo", "rloo", "reinforce_pp", "gae")
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert LOSS_AGGREGATIONS.names() == ("grpo", "dapo", "dr_grpo")
    registry: Registry[int] = Registry("thing")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(2)
    with pytest.raises(ValueError, match="unknown thing 'b'; choose one of a"):
        registry["b"]


# --- data parallelism, simulated with threads ------------------------------------------------------------


class ThreadRanks:
    """Runs one function per simulated rank in threads; ``global_sum`` is a real all-reduce among them."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def global_sum_for(self, rank: int):
        def global_sum(value: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = value.detach().clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return total

        return global_sum

    def run(self, fn, parts):
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank):
            try:
                results[rank] = fn(parts[rank], self.global_sum_for(rank))
            except BaseException as error:  # surface a failure in the test, not a hang
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        if errors:
            raise errors[0]
        return results


def test_batch_scaled_advantages_on_two_ranks_equal_one_process():
    # Four groups of 4; rank 0 holds groups 0-1, rank 1 groups 2-3 (all samples of a prompt on one rank).
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.9, 0.4, 1.0, 1.0, 1.0, 0.0, 0.3, 0.3, 0.8, 0.1])
    single = group_advantages(rewards, 4, scale="batch")
    parts = [rewards[:8], rewards[8:]]
    both = ThreadRanks(2).run(lambda part, gsum: group_advantages(part, 4, scale="batch", global_sum=gsum), parts)
    close(torch.cat(both), single)
    # The old data-parallel formula divided by the std of the gathered *group-centred* rewards, which is
    # smaller than the raw rewards' std, so its advantages came out too large.
    centred = group_advantages(rewards, 4, scale="none")
    assert float((centred / (centred.std() + 1e-6)).abs().max()) > 1.05 * float(single.abs().max())


def test_whitening_and_reinforce_pp_on_two_ranks_equal_one_process():
    gen = torch.Generator().manual_seed(0)
    token_rewards = torch.randn(6, 5, generator=gen)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).float()
    single, _ = reinforce_pp_advantages(token_rewards, mask)
    parts = [(token_rewards[:2], mask[:2]), (token_rewards[2:], mask[2:])]
    both = ThreadRanks(2).run(lambda p, gsum: reinforce_pp_advantages(p[0], p[1], global_sum=gsum)[0], parts)
    close(torch.cat(both), single)
    whitened = ThreadRanks(2).run(lambda p, gsum: whiten(p[0], p[1], global_sum=gsum), parts)
    close(torch.cat(whitened), whiten(token_rewards, mask))
