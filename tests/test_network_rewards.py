"""One path for network rewards: training, `cepo predict` and the reward diagnostics score a rollout alike,
on the network named, and the diagnostics fuse the terms with the run's weights."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from cepo.answers import AnswerParser
from cepo.coherence.interventional import InterventionalScorer
from cepo.coherence.scorer import CHANNELS, CoherenceScorer
from cepo.data.prompts import render_prompt
from cepo.data.shortcut import shortcut_examples
from cepo.records import Example, Rollout
from cepo.rewards.base import AccuracyReward
from cepo.rewards.network import SCORING_NETWORKS, NetworkName, check_network, score_coherence
from cepo.training.coherence_callback import CoherenceRewardCallback
from cepo.training.diagnostics_callback import RewardDiagnostics
from cepo.training.interventional_callback import InterventionalRewardCallback
from cepo.training.predict import PredictionWriter
from conftest import make_tiny_llama

EXAMPLES = [Example(question="Q: 7 + 5 - 3 hint: 9", gold=("9",)), Example(question="Q: 1 + 2 hint: 3", gold=("3",)),
            Example(question="Q: 4 - 1 hint: 8", gold=("3",))]
RATIONALES = ["7+5=12; 12-3=9;", "1+2=3", "4-1=3;"]
ANSWERS = ["9", "3", "8"]


def fake_module(policy, reference, tokenizer, step=3, **extra):
    """What the scoring path reads of the training module: the policy, the reference network, the tokenizer."""

    @contextmanager
    def reference_model():
        yield reference

    return SimpleNamespace(policy=policy, reference_model=reference_model, tokenizer=tokenizer, rollout_step=step,
                           **extra)


def rollout_of(tokenizer, rows=None):
    rows = rows if rows is not None else list(zip(EXAMPLES, RATIONALES, ANSWERS))
    # A chat-templated math prompt: only the question is the prompt content that shuffles perturb.
    prompts = [render_prompt(ex, family="math", tokenizer=tokenizer, use_chat_template=True) for ex, _, _ in rows]
    n = len(rows)
    return Rollout(
        examples=[ex for ex, _, _ in rows], prompts=prompts, completions=[""] * n,
        rationales=[x for _, x, _ in rows], answers=[y for _, _, y in rows],
        marker_found=torch.ones(n, dtype=torch.bool), group_size=1,
        prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 1, dtype=torch.long), completion_mask=torch.ones(n, 1, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
    )


@pytest.fixture()
def networks(char_tokenizer):
    return make_tiny_llama(len(char_tokenizer), seed=0), make_tiny_llama(len(char_tokenizer), seed=1)


@pytest.mark.parametrize("network", ["reference", "policy"])
def test_training_predict_and_diagnostics_score_a_rollout_alike(network, networks, char_tokenizer):
    reference, policy = networks
    module = fake_module(policy, reference, char_tokenizer, step=3)
    scorer = CoherenceScorer(num_counterfactuals=2)
    callback = CoherenceRewardCallback(scorer, network=network)

    rollout = rollout_of(char_tokenizer)
    callback.score_rollout(module, rollout, step=3)
    training = {c: rollout.rewards[f"coherence_{c}"] for c in CHANNELS}

    writer = PredictionWriter(coherence=True)
    writer._scoring = callback  # what on_predict_start picks from the trainer's callbacks
    predicted = writer._score(module, rollout_of(char_tokenizer))

    # The diagnostics score pairs (faithful rows, then unfaithful ones); a pair of two equal members is the
    # same rollout twice, and the step is the diagnostics' seed.
    rows = list(zip(EXAMPLES, RATIONALES, ANSWERS))
    members = rollout_of(char_tokenizer, rows + rows)
    diagnosed = RewardDiagnostics(seed=3)._channels(module, network, scorer, None, members)

    for c in CHANNELS:
        assert torch.equal(predicted[c], training[c]), c
        assert torch.equal(diagnosed[c][:3], training[c]) and torch.equal(diagnosed[c][3:], training[c]), c
    # The properties the comparison rests on can fail: the network named is the one scored, and scoring the
    # whole templated prompt (as predict did before it passed the prompt contents) scores differently.
    other = score_coherence(module, "policy" if network == "reference" else "reference", scorer, rollout.examples,
                            rollout.prompts, rollout.rationales, rollout.answers, 3)
    assert not torch.equal(other.zx, training["zx"])
    whole = scorer.score(policy if network == "policy" else reference, char_tokenizer, rollout.prompts,
                         rollout.rationales, rollout.answers, step=3)
    assert not torch.equal(whole.zx, training["zx"])


def test_interventional_training_and_diagnostics_agree(networks, char_tokenizer):
    reference, policy = networks
    module = fake_module(policy, reference, char_tokenizer)
    scorer = InterventionalScorer(num_counterfactuals=2)
    rollout = rollout_of(char_tokenizer)
    InterventionalRewardCallback(scorer, network="reference", weight_med=0.1).score_rollout(module, rollout, step=3)
    rows = list(zip(EXAMPLES, RATIONALES, ANSWERS))
    diagnosed = RewardDiagnostics(seed=3)._channels(module, "reference", CoherenceScorer(num_counterfactuals=1),
                                                    scorer, rollout_of(char_tokenizer, rows + rows))
    # Same edits, same log-likelihoods; the mediation share's gradient pass batches six rows instead of
    # three, so it agrees to float32 rounding.
    assert torch.equal(diagnosed["do"][:3], rollout.rewards["coherence_do"])
    torch.testing.assert_close(diagnosed["med"][:3], rollout.rewards["coherence_med"], atol=1e-6, rtol=0)


def test_network_choices_come_from_one_registry():
    assert SCORING_NETWORKS.names() == ("reference", "policy", "lagged")
    assert NetworkName.__args__ == SCORING_NETWORKS.names()
    with pytest.raises(ValueError, match=r"network='critic' is not supported; choose one of reference, policy, lagged"):
        check_network("CoherenceRewardCallback", "critic")
    with pytest.raises(ValueError, match="network='critic'"):
        CoherenceRewardCallback(network="critic")
    with pytest.raises(ValueError, match="network='critic'"):
        InterventionalRewardCallback(network="critic")
    with pytest.raises(ValueError, match="RewardDiagnostics.networks"):
        RewardDiagnostics(networks=["critic"])
    with pytest.raises(ValueError, match="'lagged' is a copy that a training reward keeps"):
        RewardDiagnostics(networks=["lagged"])


def test_diagnostics_fused_reward_follows_the_runs_reward_weights(networks, char_tokenizer):
    # Weights: accuracy 1 by its own init_args, overridden to 0 by model.reward_weights; S_ZX 1, the
    # others 0. With p = 1 the fused reward is then S_ZX itself; with accuracy's own weight it would be
    # the mean of accuracy and S_ZX.
    reference, policy = networks
    callback = CoherenceRewardCallback(CoherenceScorer(num_counterfactuals=1), weight_zx=1.0, weight_xy=0.0,
                                       weight_zy=0.0)
    logged = {}
    module = fake_module(
        policy, reference, char_tokenizer, step=0,
        render_prompts=lambda examples: [ex.question for ex in examples], prompt=SimpleNamespace(marker="answer"),
        parser=AnswerParser(), reward_functions=[AccuracyReward(weight=1.0)], reward_p=1.0,
        reward_weights={"accuracy": 0.0}, log=lambda name, value, **_: logged.__setitem__(name, value),
    )
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(eval_examples=lambda stage: {"flipped": shortcut_examples("flipped", 6, 4)}),
        callbacks=[callback],
    )
    diagnostics = RewardDiagnostics(networks=["policy"], kinds=["cue"], interventional=False)
    results = diagnostics.run(trainer, module, "val")
    by_channel = {r["channel"]: r for r in results}
    assert by_channel["zx"]["n"] > 0
    for key in ("mean_faithful", "mean_unfaithful"):
        assert by_channel["fused"][key] == pytest.approx(by_channel["zx"][key], abs=1e-6)
    # The faithful member is right and the unfaithful one wrong: accuracy's own weight would pull them apart.
    assert by_channel["fused"]["mean_faithful"] < 0.5 * (1.0 + by_channel["zx"]["mean_faithful"]) - 1e-3
    assert logged["val/diagnostics/flipped/cue/policy/fused/auc"] == by_channel["fused"]["auc"]
