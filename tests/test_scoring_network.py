"""The network a network reward scores with: reference, policy, or the lagged copy of the policy
(cepo.policy.lagged, dispatched with the others in cepo.rewards.network)."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from cepo.training.coherence_callback import CoherenceRewardCallback
from cepo.training.interventional_callback import InterventionalRewardCallback
from cepo.policy.lagged import LaggedPolicy
from cepo.rewards.network import SCORING_NETWORKS, lagged_copy
from tests.conftest import make_tiny_llama


@pytest.fixture()
def policy(char_tokenizer):
    base = make_tiny_llama(len(char_tokenizer))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def lora(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}


def train_a_step(policy, seed: int) -> None:
    """Stand-in for an optimiser step: move every trained LoRA weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def logits(net, ids) -> torch.Tensor:
    with torch.no_grad():
        return net(input_ids=ids).logits


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lagged_copy_equals_policy_at_refresh_and_lags_between_refreshes(policy):
    lagged = LaggedPolicy(lag_steps=3)
    ids = torch.randint(3, 30, (2, 7))
    train_a_step(policy, 0)
    assert lagged.refresh_if_due(policy, step=0)
    at_refresh = lora(policy)
    with lagged.applied(policy) as net:  # right after a refresh: the lagged network is the policy
        assert same(lora(net), at_refresh)
        lagged_out = logits(net, ids)
    assert torch.equal(lagged_out, logits(policy, ids))
    for step in (1, 2):  # between refreshes the policy moves and the lagged copy does not
        train_a_step(policy, step)
        assert not lagged.refresh_if_due(policy, step)
        current, current_out = lora(policy), logits(policy, ids)
        with lagged.applied(policy) as net:
            assert same(lora(net), at_refresh)
            assert not torch.allclose(logits(net, ids), current_out)
        assert same(lora(policy), current)  # the trained weights are put back after scoring
        assert torch.equal(logits(policy, ids), current_out)
    train_a_step(policy, 3)
    assert lagged.refresh_if_due(policy, step=3)  # lag_steps later: refreshed to the current weights
    with lagged.applied(policy) as net:
        assert same(lora(net), lora(policy))


def test_weights_are_restored_after_an_error_while_scoring(policy):
    lagged = LaggedPolicy(lag_steps=5)
    lagged.refresh_if_due(policy, 0)
    train_a_step(policy, 1)
    current = lora(policy)
    with pytest.raises(ZeroDivisionError):
        with lagged.applied(policy):
            1 / 0
    assert same(lora(policy), current)


def test_lagged_state_round_trips_for_resume(policy):
    lagged = LaggedPolicy(lag_steps=4)
    train_a_step(policy, 0)
    lagged.refresh_if_due(policy, 8)
    restored = LaggedPolicy(lag_steps=4)
    restored.load_state_dict(lagged.state_dict())
    assert restored.refreshed_at == 8 and same(restored.snapshot, lagged.snapshot)
    assert not restored.due(11) and restored.due(12)
    callback = CoherenceRewardCallback(network="lagged", lag_steps=4)
    callback.lagged.refresh_if_due(policy, 8)
    other = CoherenceRewardCallback(network="lagged", lag_steps=4)
    other.load_state_dict(callback.state_dict())
    assert same(other.lagged.snapshot, callback.lagged.snapshot)
    assert CoherenceRewardCallback().state_dict() == {}  # other networks keep no state


def test_the_lagged_network_is_dispatched_with_the_others(policy):
    module = SimpleNamespace(policy=policy)
    assert "lagged" in SCORING_NETWORKS.names()
    with pytest.raises(RuntimeError, match="copy that the reward keeps"):
        SCORING_NETWORKS["lagged"](module)  # not handed over by a reward
    lagged = LaggedPolicy(2)
    train_a_step(policy, 0)
    with lagged_copy(module, lagged, step=0):
        assert lagged.refreshed_at == 0
        train_a_step(policy, 1)  # the policy moves on; the network scored is the copy of step 0
        moved = lora(policy)
        with SCORING_NETWORKS["lagged"](module) as net:
            assert net is policy and same(lora(net), lagged.snapshot)
        assert same(lora(policy), moved)
    assert not hasattr(module, "lagged_scoring_copy")  # handed back after scoring
    with lagged_copy(module, None, step=5):  # other networks: nothing to hand over
        assert not hasattr(module, "lagged_scoring_copy")


def test_bad_network_options_are_named():
    with pytest.raises(ValueError, match="network='frozen' is not supported.*lagged"):
        CoherenceRewardCallback(network="frozen")
    with pytest.raises(ValueError, match="lag_steps must be an integer >= 1"):
        InterventionalRewardCallback(network="lagged", lag_steps=0)
    with pytest.raises(ValueError, match="lag_steps must be an integer >= 1"):
        LaggedPolicy(0)
    with pytest.raises(RuntimeError, match="before any refresh"):
        with LaggedPolicy(1).applied(None):
            pass
