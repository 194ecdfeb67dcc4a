"""The interventional coherence channels: S_do (answer likelihood lost when the rationale's conclusion is
edited) and S_med (share of the answer's input gradient on the rationale), against a slow per-sequence
reference, plus the conclusion edit and the reward callback."""

import math
import random
from contextlib import contextmanager

import pytest
import torch

from cepo.coherence.counterfactuals import NumberReplace
from cepo.coherence.interventional import (
    ConclusionEdit, InterventionalScorer, conclusion_span, conclusion_value, interventional_score, mediation_share,
)
from cepo.evaluation.faithfulness import is_faithful
from cepo.rollout import Rollout
from cepo.training.interventional_callback import InterventionalRewardCallback

FLOOR = 0.005
PROMPTS = ["Q: 7+5-3 hint: 9\n", "Q: 1+2 hint: 3\n", "what is two plus two", "Q: 4-1 hint: 3\n"]
RATIONALES = ["7+5=12; 12-3=9;", "1+2=3;", "", "4-1=3;"]
ANSWERS = ["9", "3", "4", ""]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_terms(model, tok, z, x, y):
    """log p(Y | Z <eos> X <eos>) and the gradient energies on Z and X rows, one sequence at a time with
    the model's own full forward (all logits, default positions)."""
    eos = tok.eos_token_id
    zi, xi, yi = (tok(t, add_special_tokens=False)["input_ids"] for t in (z, x, y))
    ids = torch.tensor([zi + [eos] + xi + [eos] + yi])
    E = model.get_input_embeddings()(ids).detach().requires_grad_()
    logp = torch.log_softmax(model(inputs_embeds=E).logits[0].float(), dim=-1)
    y0 = len(zi) + len(xi) + 2
    lp = sum(logp[t - 1, ids[0, t]] for t in range(y0, y0 + len(yi))) if yi else torch.zeros(())
    if not yi:
        return 0.0, 0.0, 0.0
    (G,) = torch.autograd.grad(lp, E)
    energy = G[0].double().pow(2).sum(-1)
    return float(lp.detach()), float(energy[: len(zi)].sum()), float(energy[len(zi) + 1 : len(zi) + 1 + len(xi)].sum())


@pytest.mark.parametrize("chunk", [None, 2])
def test_scores_match_the_per_sequence_reference(tiny_llama, char_tokenizer, chunk, monkeypatch):
    if chunk:  # the LM head in checkpointed chunks of 2 positions, as a real vocabulary gets
        monkeypatch.setattr("cepo.policy.logprobs.chunk_tokens_for", lambda *args, **kwargs: chunk)
    edits = [["7+5=12; 12-3=8;", "7+5=12; 12-3=11;"], ["1+2=5;", "1+2=4;"], ["", ""], ["4-1=2;", "4-1=6;"]]
    result = InterventionalScorer(micro_batch_size=3).score(
        tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, edited_rationales=edits
    )
    for i in range(len(PROMPTS)):
        lp, ez, ex = reference_terms(tiny_llama, char_tokenizer, PROMPTS[i], RATIONALES[i], ANSWERS[i])
        lp_cf = [reference_terms(tiny_llama, char_tokenizer, PROMPTS[i], e, ANSWERS[i])[0] for e in edits[i]]
        assert float(result.diagnostics["logp_answer"][i]) == pytest.approx(lp, abs=1e-4)
        changed = [e != RATIONALES[i] for e in edits[i]]
        drop = lp - sum(c if ch else lp for c, ch in zip(lp_cf, changed)) / len(lp_cf)
        expected = FLOOR if not ANSWERS[i] else FLOOR + (1 - FLOOR) * min(1.0, max(0.0, 1 - math.exp(-max(drop, 0))))
        assert float(result.interventional[i]) == pytest.approx(expected, abs=1e-5), i
        share = ex / (ex + ez) if ex + ez > 0 else 0.0
        assert float(result.mediation[i]) == pytest.approx(FLOOR + (1 - FLOOR) * share, abs=1e-5), i
    # Row 2 has no rationale (nothing to edit) and row 3 no answer: both score the floor.
    assert float(result.interventional[2]) == pytest.approx(FLOOR)
    assert float(result.interventional[3]) == pytest.approx(FLOOR)
    assert float(result.mediation[3]) == pytest.approx(FLOOR)
    # Not degenerate: the edits move the answer's likelihood, and mediation shares sit away from the floor.
    assert float(result.diagnostics["drop"][:2].abs().min()) > 1e-4 and float(result.mediation[:2].min()) > 0.01


def test_batching_does_not_change_scores_and_parameters_keep_no_grad(tiny_llama, char_tokenizer):
    scorer = InterventionalScorer(num_counterfactuals=3, counterfactual=NumberReplace())
    together = scorer.score(tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, step=4)
    alone = [InterventionalScorer(num_counterfactuals=3, counterfactual=NumberReplace(), micro_batch_size=1).score(
        tiny_llama, char_tokenizer, [PROMPTS[i]], [RATIONALES[i]], [ANSWERS[i]], step=4) for i in range(4)]
    for i, single in enumerate(alone):  # edits are seeded by content, so a row draws the same ones alone
        assert float(together.interventional[i]) == pytest.approx(float(single.interventional[0]), abs=1e-5)
        assert float(together.mediation[i]) == pytest.approx(float(single.mediation[0]), abs=1e-5)
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_hand_computed_score_functions():
    drop = torch.tensor([0.0, math.log(2.0), -1.0, 50.0])
    # 1 - exp(-log 2) = 1/2: half of the answer's probability is lost; a gain counts as no drop.
    assert interventional_score(drop, 0.1).tolist() == pytest.approx([0.1, 0.1 + 0.9 * 0.5, 0.1, 1.0])
    share = mediation_share(torch.tensor([3.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), 0.0)
    assert share.tolist() == pytest.approx([0.75, 0.0, 1.0])


def test_conclusion_edit_changes_only_the_concluded_number():
    text = "7+5=12; 12-3=9;"
    assert conclusion_span(text) == (13, 14) and conclusion_value(text) == 9
    assert conclusion_value("She makes 9 * 2 = $1,800 a day") == 1800
    edit = ConclusionEdit()
    for seed in range(20):
        edited = edit(text, random.Random(seed))
        assert edited.startswith("7+5=12; 12-3=") and edited.endswith(";")
        value = conclusion_value(edited)
        assert value != 9 and 0 <= value and abs(value - 9) <= 3
        assert is_faithful(9, edited) is False and is_faithful(9, text) is True
    assert edit(text, random.Random(3)) == edit(text, random.Random(3))
    assert edit("no equation here", random.Random(0)) == "no equation here"
    assert {conclusion_value(edit("1-1=0;", random.Random(s))) for s in range(30)} <= {1, 2, 3}  # never negative
    with pytest.raises(ValueError, match="max_offset"):
        ConclusionEdit(max_offset=0)


class FakeModule:
    def __init__(self, policy, reference, tokenizer):
        self.policy, self._reference, self.tokenizer, self.entered = policy, reference, tokenizer, 0

    @contextmanager
    def reference_model(self):
        self.entered += 1
        yield self._reference


def make_rollout(stage="train"):
    n = len(PROMPTS)
    empty = torch.zeros((n, 0), dtype=torch.long)
    return Rollout(examples=[None] * n, prompts=PROMPTS, completions=list(ANSWERS), rationales=RATIONALES,
                   answers=ANSWERS, marker_found=torch.ones(n, dtype=torch.bool), group_size=1, prompt_ids=empty,
                   prompt_mask=empty, completion_ids=empty, completion_mask=empty,
                   truncated=torch.zeros(n, dtype=torch.bool), stage=stage)


def test_callback_attaches_terms_from_the_chosen_network(char_tokenizer):
    from conftest import make_tiny_llama

    policy, reference = make_tiny_llama(len(char_tokenizer), seed=5), make_tiny_llama(len(char_tokenizer), seed=6)
    module = FakeModule(policy, reference, char_tokenizer)
    scorer = InterventionalScorer()
    rollout = make_rollout()
    InterventionalRewardCallback(scorer, weight_do=0.2, weight_med=0.1).score_rollout(module, rollout, step=3)
    assert module.entered == 1
    expected = scorer.score(reference, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, step=3)
    assert torch.allclose(rollout.rewards["coherence_do"], expected.interventional)
    assert torch.allclose(rollout.rewards["coherence_med"], expected.mediation)
    assert rollout.reward_weights == {"coherence_do": 0.2, "coherence_med": 0.1}
    on_policy = make_rollout()
    InterventionalRewardCallback(scorer, network="policy").score_rollout(module, on_policy, step=3)
    assert module.entered == 1
    assert torch.allclose(on_policy.rewards["coherence_do"],
                          scorer.score(policy, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, step=3).interventional)
    skipped = make_rollout(stage="eval")
    InterventionalRewardCallback(scorer).score_rollout(module, skipped, step=3)
    assert skipped.rewards == {}


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="network='frozen'"):
        InterventionalRewardCallback(network="frozen")
    with pytest.raises(ValueError, match="weight_do"):
        InterventionalRewardCallback(weight_do=-1)
    with pytest.raises(ValueError, match="mediation"):
        InterventionalRewardCallback(InterventionalScorer(mediation=False), weight_med=0.5)
    with pytest.raises(ValueError, match="num_counterfactuals"):
        InterventionalScorer(num_counterfactuals=0)


def test_edited_rationales_must_number_num_counterfactuals(tiny_llama, char_tokenizer):
    scorer = InterventionalScorer(num_counterfactuals=2)
    with pytest.raises(ValueError, match=r"one list of num_counterfactuals=2 texts per rollout \(got 1 lists of "
                                         r"lengths \[3\] for 1 rollouts\)"):
        scorer.score(tiny_llama, char_tokenizer, ["Q: 1+2"], ["1+2=3;"], ["3"], edited_rationales=[["a", "b", "c"]])
    # The drawn edits follow the one seeding rule: K of them, the same for the same rollout and step.
    edits = scorer.edits(["Q: 1+2"], ["1+2=3;"], ["3"], step=5)
    assert len(edits[0]) == 2 and edits == scorer.edits(["Q: 1+2"], ["1+2=3;"], ["3"], step=5)
