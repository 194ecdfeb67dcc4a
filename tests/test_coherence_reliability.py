"""Reliability of the coherence scorer: same text same score, non-finite Jacobians, models with a fixed
number of positions, counterfactuals that leave the chat template alone, and the memory options."""

import logging
import random
from types import SimpleNamespace

import pytest
import torch

from cepo.coherence import math as cm
from cepo.coherence.counterfactuals import WordShuffle
from cepo.coherence.scorer import CoherenceScorer
from cepo.data.example import Example
from cepo.data.prompts import render_prompt
from cepo.rollout import Rollout
from cepo.training.coherence_callback import CoherenceRewardCallback
from coherence_reference import score_reference

FLOOR = 0.005
CHANNELS = ("zx", "xy", "zy")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


A = ("Q: 7+5-3 hint: 9\n", "7+5=12; 12-3=9;", "<answer>9</answer>")
B = ("Q: 1+2 hint: 3\n", "so 1+2 is 3 and done", "3")
C = ("Q: 4-1 hint: 2\n", "4-1=3; then 3", "<answer>3</answer>")


def columns(rows):
    return [list(col) for col in zip(*rows)]


def scores(result, i):
    return [float(getattr(result, c)[i]) for c in CHANNELS]


# ---------------------------------------------------------------------- same text, same score


def test_identical_rollouts_score_identically_wherever_they_sit(tiny_llama, char_tokenizer):
    scorer = CoherenceScorer(num_counterfactuals=2, micro_batch_size=3)
    mixed = scorer.score(tiny_llama, char_tokenizer, *columns([A, B, A, C, A]), step=4)
    assert scores(mixed, 0) == scores(mixed, 2) == scores(mixed, 4)
    assert scores(mixed, 0) != scores(mixed, 1)
    # A rollout's scores do not depend on its row or on the other rollouts of the batch.
    reordered = scorer.score(tiny_llama, char_tokenizer, *columns([C, B, A]), step=4)
    alone = scorer.score(tiny_llama, char_tokenizer, *columns([A]), step=4)
    for c in CHANNELS:
        assert float(getattr(reordered, c)[2]) == pytest.approx(float(getattr(mixed, c)[0]), abs=1e-6)
        assert float(getattr(alone, c)[0]) == pytest.approx(float(getattr(mixed, c)[0]), abs=1e-6)
        assert float(getattr(reordered, c)[0]) == pytest.approx(float(getattr(mixed, c)[3]), abs=1e-6)
    torch.testing.assert_close(mixed.diagnostics["duplicate"], torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]))
    # The step changes the draws (fresh counterfactuals every step), replayed exactly on a rerun.
    later = scorer.score(tiny_llama, char_tokenizer, *columns([A]), step=5)
    assert scores(later, 0) != scores(alone, 0)
    assert scores(scorer.score(tiny_llama, char_tokenizer, *columns([A]), step=5), 0) == scores(later, 0)


def test_scoring_once_and_broadcasting_equals_scoring_every_copy(tiny_llama, char_tokenizer, monkeypatch):
    scorer = CoherenceScorer(num_counterfactuals=2)
    seen = []
    original = CoherenceScorer._sequences

    def counting(self, tokenizer, prompts, *args, **kwargs):
        seen.append(len(prompts))
        return original(self, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(CoherenceScorer, "_sequences", counting)
    result = scorer.score(tiny_llama, char_tokenizer, *columns([A, A, B, A, B]), step=1)
    assert seen == [2]  # two distinct rollouts reach the model
    for i, j in ((0, 1), (0, 3), (2, 4)):
        assert scores(result, i) == scores(result, j)


# ---------------------------------------------------------------------- non-finite Jacobians


def test_shape_score_of_a_non_finite_matrix_is_zero_and_spares_the_rest_of_the_batch():
    good = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    batch = torch.stack([good, torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), torch.tensor([[float("inf"), 0.0], [1.0, 0.0]])])
    out = cm.shape_score(batch)
    assert float(out[0]) == pytest.approx(0.9)  # s = (3, 1): 9 / 10
    assert out[1:].tolist() == [0.0, 0.0]


def test_non_finite_gradients_skip_the_rollout_at_the_floor_and_name_it(tiny_llama, char_tokenizer, caplog):
    # An embedding row of inf makes every gradient of a sequence holding '#' NaN.
    hash_id = char_tokenizer.convert_tokens_to_ids("#")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[hash_id] = float("inf")
    bad = ("Q: 3 # 4 hint: 7\n", "3+4=7;", "<answer>7</answer>")
    scorer = CoherenceScorer(num_counterfactuals=2)
    with caplog.at_level(logging.WARNING, logger="cepo.coherence.scorer"):
        result = scorer.score(tiny_llama, char_tokenizer, *columns([A, bad, B, bad]), step=2)
    assert scores(result, 1) == scores(result, 3) == [pytest.approx(FLOOR)] * 3
    assert result.diagnostics["skipped_nonfinite"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert all(torch.isfinite(v).all() for v in result.diagnostics.values())
    message = caplog.text
    assert "rollout 1, 3" in message and "J_ZX (base)" in message and "float32" in message
    clean = scorer.score(tiny_llama, char_tokenizer, *columns([A, B]), step=2)
    for c in CHANNELS:
        assert float(getattr(result, c)[0]) == pytest.approx(float(getattr(clean, c)[0]), abs=1e-6)
        assert float(getattr(result, c)[2]) == pytest.approx(float(getattr(clean, c)[1]), abs=1e-6)


# ---------------------------------------------------------------------- absolute positions (GPT-2)


def tiny_gpt2(vocab_size, positions):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_sequences_past_the_position_limit_are_cut_to_fit_and_counted(char_tokenizer):
    model = tiny_gpt2(len(char_tokenizer), positions=40)
    long = ("Q: what is 7+5-3 given the hint: 9\n", "7+5=12; 12-3=9;", "<answer>9</answer>")  # 36+15+3+2 = 56
    z, x, y = (char_tokenizer(t, add_special_tokens=False)["input_ids"] for t in long)
    assert len(z) + len(x) + len(y) + 2 > 40
    cf_p = [["hint: Q: what 7+5-3 is given 9\n the", "the given hint: 9\n Q: what is 7+5-3"], ["hint: 1+2 Q: 3\n"] * 2]
    cf_x = [["12-3=9; 7+5=12;", "12-3=9; 7+5=12;"], ["is so 1+2 3 done and", "done and is 3 1+2 so"]]
    rows = columns([long, B])
    result = CoherenceScorer(num_counterfactuals=2).score(model, char_tokenizer, *rows, cf_p, cf_x)
    assert result.diagnostics["truncated"].tolist() == [1.0, 0.0]
    # Same as capping the prompt by hand: it loses its first tokens until the sequence fits.
    fitted = 40 - 2 - len(x) - len(y)
    for i, kw in ((0, {"max_prompt_tokens": fitted}), (1, {})):
        ref = score_reference(model, char_tokenizer, rows[0][i], rows[1][i], rows[2][i], cf_p[i], cf_x[i], **kw)
        for c in CHANNELS:
            assert float(getattr(result, c)[i]) == pytest.approx(ref[c]["score"], abs=1e-5), (i, c)
    with pytest.raises(ValueError, match="max_prompt_tokens.*context_overflow='truncate'"):
        CoherenceScorer(num_counterfactuals=1, context_overflow="error").score(model, char_tokenizer, *rows)


def test_user_token_caps_are_counted_as_capped_not_truncated(char_tokenizer):
    model = tiny_gpt2(len(char_tokenizer), positions=200)
    long = ("Q: what is 7+5-3 given the hint: 9\n", "7+5=12; 12-3=9;", "<answer>9</answer>")
    rows = columns([long, B])
    x_len = len(char_tokenizer(long[1], add_special_tokens=False)["input_ids"])
    result = CoherenceScorer(num_counterfactuals=1, max_rationale_tokens=x_len - 1).score(model, char_tokenizer, *rows)
    assert result.diagnostics["truncated"].tolist() == [0.0, 0.0]
    assert result.diagnostics["capped"][0] == 1.0  # its rationale lost a token
    uncapped = CoherenceScorer(num_counterfactuals=1).score(model, char_tokenizer, *rows)
    assert uncapped.diagnostics["capped"].tolist() == [0.0, 0.0]


def test_rationale_and_answer_are_cut_when_the_prompt_alone_is_not_enough():
    from cepo.coherence.scorer import _fit

    z, x, y = list(range(5)), list(range(10, 16)), list(range(20, 24))  # 5 + 6 + 4 + 2 separators = 17
    assert _fit(z, x, y, 17) == (z, x, y)
    assert _fit(z, x, y, 15) == (z[2:], x, y)
    assert _fit(z, x, y, 12) == ([], x, y)
    assert _fit(z, x, y, 10) == ([], x[2:], y)
    assert _fit(z, x, y, 5) == ([], [], y[:3])


# ---------------------------------------------------------------------- content, not template


def test_shuffled_prompts_keep_the_chat_template_in_place(char_tokenizer):
    example = Example(question="Q: 7 + 5 - 3 hint: 9", gold=("9",))
    prompt = render_prompt(example, family="math", tokenizer=char_tokenizer, use_chat_template=True,
                           system_prompt="You are a careful solver of problems.")
    start = prompt.index(example.question)
    prefix, suffix = prompt[:start], prompt[start + len(example.question):]
    assert prefix.startswith("[system] You are a careful solver") and "[assistant]" in suffix
    scorer = CoherenceScorer(num_counterfactuals=6)
    cf_p, _, missing = scorer._counterfactual_texts([prompt], [example.question], ["r s"], [(prompt, "r s", "9")], None, None, 0)
    assert missing == set()
    for text in cf_p[0]:
        assert text.startswith(prefix) and text.endswith(suffix)
        body = text[len(prefix): len(text) - len(suffix)]
        assert sorted(body.split()) == sorted(example.question.split())
    assert any(text != prompt for text in cf_p[0])
    # Without the content the template words are shuffled too (the behaviour being fixed).
    whole, _, _ = scorer._counterfactual_texts([prompt], [None], ["r s"], [(prompt, "r s", "9")], None, None, 0)
    assert any(not text.startswith(prefix) for text in whole[0])


def test_content_missing_from_the_prompt_is_counted_and_the_whole_prompt_shuffled(tiny_llama, char_tokenizer):
    result = CoherenceScorer(num_counterfactuals=1).score(
        tiny_llama, char_tokenizer, *columns([A, B]), prompt_contents=["Q: 7+5-3 hint: 9", "not in the prompt"]
    )
    assert result.diagnostics["content_not_found"].tolist() == [0.0, 1.0]


def test_callback_passes_each_rows_question_as_the_prompt_content(tiny_llama, char_tokenizer):
    examples = [Example(question="Q: 7 + 5 - 3 hint: 9", gold=("9",)), Example(question="Q: 1 + 2 hint: 3", gold=("3",))]
    prompts = [render_prompt(ex, family="math", tokenizer=char_tokenizer, use_chat_template=True) for ex in examples]
    n = 2
    rollout = Rollout(
        examples=examples, prompts=prompts, completions=[""] * n, rationales=["7+5=12; 12-3=9;", "1+2=3"],
        answers=["9", "3"], marker_found=torch.ones(n, dtype=torch.bool), group_size=1,
        prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 1, dtype=torch.long), completion_mask=torch.ones(n, 1, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
    )
    module = SimpleNamespace(policy=tiny_llama, tokenizer=char_tokenizer)
    scorer = CoherenceScorer(num_counterfactuals=2)
    CoherenceRewardCallback(scorer, network="policy").score_rollout(module, rollout, step=3)
    expected = scorer.score(tiny_llama, char_tokenizer, prompts, rollout.rationales, rollout.answers, step=3,
                            prompt_contents=[ex.question for ex in examples])
    whole = scorer.score(tiny_llama, char_tokenizer, prompts, rollout.rationales, rollout.answers, step=3)
    assert torch.equal(rollout.rewards["coherence_zx"], expected.zx)
    assert not torch.equal(expected.zx, whole.zx)


# ---------------------------------------------------------------------- memory options


class OutOfMemoryAbove:
    """Makes the model's decoder raise an out-of-memory error for batches larger than ``limit``."""

    def __init__(self, model, limit):
        self.calls, self.limit = [], limit
        decoder = model.get_decoder()
        original = decoder.forward

        def forward(*args, **kwargs):
            rows = kwargs["inputs_embeds"].shape[0]
            self.calls.append(rows)
            if rows > self.limit:
                raise torch.OutOfMemoryError(f"out of memory: {rows} rows (test)")
            return original(*args, **kwargs)

        decoder.forward = forward


def test_auto_micro_batch_backs_off_on_out_of_memory_to_the_same_scores(tiny_llama, char_tokenizer):
    rows = columns([A, B, C, ("Q: 2+2 hint: 4\n", "2+2=4", "4")])
    fixed = CoherenceScorer(num_counterfactuals=2, micro_batch_size=3).score(tiny_llama, char_tokenizer, *rows)
    guard = OutOfMemoryAbove(tiny_llama, limit=5)
    auto = CoherenceScorer(num_counterfactuals=2, micro_batch_size="auto")
    result = auto.score(tiny_llama, char_tokenizer, *rows)
    assert auto._auto_size == 4  # 256 -> 128 -> ... -> 4 rollouts, 4 sequences per pass
    assert max(guard.calls) > 5
    for c in CHANNELS:
        torch.testing.assert_close(getattr(result, c), getattr(fixed, c), atol=1e-6, rtol=0)
    guard.calls.clear()
    auto.score(tiny_llama, char_tokenizer, *rows)
    assert max(guard.calls) <= 4  # the size found is kept
    with pytest.raises(torch.OutOfMemoryError):
        CoherenceScorer(num_counterfactuals=2, micro_batch_size=8).score(tiny_llama, char_tokenizer, *rows)
    with pytest.raises(ValueError, match="'auto'"):
        CoherenceScorer(micro_batch_size="max")


def test_activation_checkpointing_recomputes_layers_and_keeps_the_scores(tiny_llama, char_tokenizer):
    rows = columns([A, B, C])
    attention_calls = []
    tiny_llama.model.layers[0].self_attn.register_forward_hook(lambda *a: attention_calls.append(1))
    plain = CoherenceScorer(num_counterfactuals=2).score(tiny_llama, char_tokenizer, *rows)
    n_plain = len(attention_calls)
    attention_calls.clear()
    checkpointed = CoherenceScorer(num_counterfactuals=2, activation_checkpointing=True)
    result = checkpointed.score(tiny_llama, char_tokenizer, *rows)
    assert len(attention_calls) > n_plain  # the backward passes ran the layer again
    assert "forward" not in vars(tiny_llama.model.layers[0])  # the layers are restored
    for c in CHANNELS:
        torch.testing.assert_close(getattr(result, c), getattr(plain, c), atol=1e-6, rtol=0)
