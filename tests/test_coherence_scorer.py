from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from cepo.coherence.counterfactuals import WordShuffle, draw_counterfactuals
from cepo.coherence.scorer import CoherenceScorer, _Sequence
from cepo.training.coherence_callback import CoherenceRewardCallback
from cepo.rollout import Rollout
from coherence_reference import score_reference

FLOOR = 0.005


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a shared machine makes extra threads slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Mixed lengths; empty rationale (row 2), empty answer (row 3), a one-word rationale (row 4).
PROMPTS = ["Q: 7+5-3 hint: 9\n", "Q: 1+2 hint: 3\n", "what is two plus two", "a b c d", "Q: 4-1 hint: 3\n"]
RATIONALES = ["7+5=12; 12-3=9;", "so 1+2 is 3 and done", "", "think then answer", "4-1=3;"]
ANSWERS = ["<answer>9</answer>", "3", "4", "", "<answer>3</answer>"]


def explicit_counterfactuals(k=2):
    cf_p = draw_counterfactuals(PROMPTS, WordShuffle(), k, seed=11)
    cf_x = draw_counterfactuals(RATIONALES, WordShuffle(), k, seed=12)
    cf_p[0][0] = "hint: Q: 9\n 7+5-3 and more words"  # longer than the base prompt: truncated
    cf_p[1][-1] = "Q: hint:"  # shorter: zero padded
    cf_x[1][0] = "done"
    return cf_p, cf_x


def assert_matches_reference(result, model, tok, cf_p, cf_x, **kw):
    for i in range(len(PROMPTS)):
        ref = score_reference(model, tok, PROMPTS[i], RATIONALES[i], ANSWERS[i], cf_p[i], cf_x[i], **kw)
        for c in ("zx", "xy", "zy"):
            assert float(getattr(result, c)[i]) == pytest.approx(ref[c]["score"], abs=1e-5), (i, c)
            assert float(result.diagnostics[f"{c}_magnitude"][i]) == pytest.approx(ref[c]["magnitude"], abs=1e-5)
            if ref[c]["magnitude"] > 1e-3:  # the shape of a rounding-noise residual is meaningless
                assert float(result.diagnostics[f"{c}_shape"][i]) == pytest.approx(ref[c]["shape"], abs=1e-5)


@pytest.fixture(params=["head at once", "head in chunks of 2 positions"])
def head_chunks(request, monkeypatch):
    """Both ways the LM head can run over the scored positions: at once (a small vocabulary fits one chunk)
    and in checkpointed chunks (what a real vocabulary gets), which must give the same scores."""
    if request.param != "head at once":
        monkeypatch.setattr("cepo.policy.logprobs.chunk_tokens_for", lambda *args, **kwargs: 2)
    return request.param


def test_batched_scorer_matches_the_per_sample_reference(tiny_llama, char_tokenizer, head_chunks):
    cf_p, cf_x = explicit_counterfactuals()
    result = CoherenceScorer(micro_batch_size=4, num_counterfactuals=2).score(
        tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, cf_p, cf_x
    )
    assert result.zx.dtype == torch.float32 and result.zx.shape == (5,) and result.zx.device.type == "cpu"
    assert_matches_reference(result, tiny_llama, char_tokenizer, cf_p, cf_x)
    # Not degenerate: the comparison exercises scores away from the floor.
    assert float(result.zx.max()) > 0.05 and float(result.xy.max()) > 0.05 and float(result.zy.max()) > 0.05


def test_token_caps_and_naive_variant_match_the_reference(tiny_llama, char_tokenizer):
    cf_p, cf_x = explicit_counterfactuals(k=1)
    caps = dict(max_prompt_tokens=6, max_rationale_tokens=5, max_answer_tokens=2)
    result = CoherenceScorer(micro_batch_size=3, num_counterfactuals=1, **caps).score(
        tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, cf_p, cf_x
    )
    assert_matches_reference(result, tiny_llama, char_tokenizer, cf_p, cf_x, **caps)
    naive = CoherenceScorer(hardened=False).score(tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS)
    assert_matches_reference(naive, tiny_llama, char_tokenizer, [[]] * 5, [[]] * 5, hardened=False)


def test_gradients_match_central_finite_differences(char_tokenizer, monkeypatch):
    from transformers.models.llama import modeling_llama

    from conftest import make_tiny_llama

    def rms_norm_in_input_dtype(self, x):  # the stock norm computes in float32, too coarse for the check
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    model = make_tiny_llama(len(char_tokenizer), seed=3).double()
    enc = lambda s: char_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = char_tokenizer.eos_token_id
    # Two sequences of different lengths in one padded batch.
    batch = [
        _Sequence(0, 0, 0, enc("ab c"), enc("de"), enc("f")),
        _Sequence(1, 0, 0, enc("xy"), enc("zzw q"), enc("12")),
    ]
    G_X, G_Y = CoherenceScorer()._gradients(model, batch, eos, char_tokenizer.pad_token_id)

    def segment_logliks(seq, E):
        ids = seq.z + [eos] + seq.x + [eos] + seq.y
        logp = torch.log_softmax(model(inputs_embeds=E[None]).logits[0], -1)
        xs = range(len(seq.z) + 1, len(seq.z) + 1 + len(seq.x))
        ys = range(len(seq.z) + len(seq.x) + 2, len(ids))
        return sum(logp[t - 1, ids[t]] for t in xs), sum(logp[t - 1, ids[t]] for t in ys)

    h = 1e-5
    for b, seq in enumerate(batch):
        ids = torch.tensor(seq.z + [eos] + seq.x + [eos] + seq.y)
        E0 = model.get_input_embeddings()(ids).detach()
        for row, col in [(0, 3), (1, 17), (len(seq.z), 5), (len(seq.z) + 1, 30), (len(ids) - 2, 9)]:
            Ep, Em = E0.clone(), E0.clone()
            Ep[row, col] += h
            Em[row, col] -= h
            with torch.no_grad():
                (xp, yp), (xm, ym) = segment_logliks(seq, Ep), segment_logliks(seq, Em)
            fd_x, fd_y = float(xp - xm) / (2 * h), float(yp - ym) / (2 * h)
            assert float(G_X[b, row, col]) == pytest.approx(fd_x, rel=1e-5, abs=1e-7), (b, row, col)
            assert float(G_Y[b, row, col]) == pytest.approx(fd_y, rel=1e-5, abs=1e-7), (b, row, col)
        # Padded rows get no gradient.
        assert torch.all(G_X[b, len(ids) :] == 0) and torch.all(G_Y[b, len(ids) :] == 0)


def test_cached_prefix_gives_the_full_sequence_gradients(tiny_llama, char_tokenizer):
    from cepo.coherence.scorer import _RATIONALE_CF
    from cepo.policy.cache import PrefixCache

    scorer = CoherenceScorer(micro_batch_size=3)  # suffixes of one rollout split across passes
    cf_p, cf_x = explicit_counterfactuals(k=3)
    cf_x[0][1] = ""  # an empty shuffled rationale: no rows
    sequences = scorer._sequences(char_tokenizer, PROMPTS, RATIONALES, ANSWERS, cf_p, cf_x)
    shuffled = [seq for seq in sequences if seq.kind == _RATIONALE_CF]
    eos, pad = char_tokenizer.eos_token_id, char_tokenizer.pad_token_id
    assert PrefixCache.build(tiny_llama, [[5, 6, eos], [7, eos]], pad) is not None  # the cached path runs
    with torch.enable_grad():
        cached = scorer._rationale_rows(tiny_llama, shuffled, eos, pad, 3)
        _, G_Y = scorer._gradients(tiny_llama, shuffled, eos, pad)
    for row, (seq, rows) in enumerate(zip(shuffled, cached)):
        start = len(seq.z) + 1
        assert rows.shape == (len(seq.x), G_Y.shape[-1])
        torch.testing.assert_close(rows, G_Y[row, start : start + len(seq.x)], atol=1e-6, rtol=1e-5)
    assert any(len(seq.y) == 0 and len(seq.x) > 0 for seq in shuffled)  # zero rows without a pass


def tiny_model(family: str, vocab_size: int):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    sizes = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":  # attention biases and grouped key/value heads
        return Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()
    return MistralForCausalLM(MistralConfig(sliding_window=6, **sizes)).eval()  # no cached prefix: full sequences


@pytest.mark.parametrize("family", ["qwen2", "mistral_sliding_window"])
def test_other_decoder_families_match_the_reference(family, char_tokenizer):
    from cepo.policy.cache import PrefixCache

    model = tiny_model(family, len(char_tokenizer))
    cached = PrefixCache.build(model, [[5, 6, 2]], char_tokenizer.pad_token_id)
    assert (cached is not None) == (family == "qwen2")
    cf_p, cf_x = explicit_counterfactuals()
    result = CoherenceScorer(micro_batch_size=4, num_counterfactuals=2).score(model, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, cf_p, cf_x)
    assert_matches_reference(result, model, char_tokenizer, cf_p, cf_x)


def test_scores_do_not_depend_on_the_rest_of_the_batch_or_micro_batch_size(tiny_llama, char_tokenizer):
    cf_p, cf_x = explicit_counterfactuals()
    alone = CoherenceScorer(micro_batch_size=1, num_counterfactuals=2).score(
        tiny_llama, char_tokenizer, PROMPTS[:1], RATIONALES[:1], ANSWERS[:1], cf_p[:1], cf_x[:1]
    )
    others = ["a much longer prompt that pads everything " * 2, "x"]
    for mb in (2, 7, 64):
        mixed = CoherenceScorer(micro_batch_size=mb, num_counterfactuals=2).score(
            tiny_llama,
            char_tokenizer,
            [others[0], PROMPTS[0], others[1]],
            ["r s t u v w", RATIONALES[0], "y"],
            ["long answer here", ANSWERS[0], "z"],
            [["b a"] * 2, cf_p[0], ["x"] * 2],
            [["w v u t s r"] * 2, cf_x[0], ["y"] * 2],
        )
        for c in ("zx", "xy", "zy"):
            assert float(getattr(mixed, c)[1]) == pytest.approx(float(getattr(alone, c)[0]), abs=1e-6), (mb, c)


def test_empty_rationale_or_answer_gives_the_floor(tiny_llama, char_tokenizer):
    scorer = CoherenceScorer(num_counterfactuals=2)
    prompts, rationales, answers = ["p q r s t", "p q r s t", "p q", ""], ["", "x y", "", ""], ["a", "", "", ""]
    result = scorer.score(tiny_llama, char_tokenizer, prompts, rationales, answers)

    def at_floor(i, c):
        return abs(float(getattr(result, c)[i]) - FLOOR) < 1e-8

    assert at_floor(0, "zx") and at_floor(0, "xy") and not at_floor(0, "zy")  # empty X: Y still reads Z
    assert at_floor(1, "xy") and at_floor(1, "zy") and not at_floor(1, "zx")  # empty Y
    assert all(at_floor(i, c) for i in (2, 3) for c in ("zx", "xy", "zy"))
    empty = scorer.score(tiny_llama, char_tokenizer, [], [], [])
    assert empty.zx.shape == (0,)


def test_no_parameter_grads_and_modes_restored_even_under_inference_mode(char_tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(char_tokenizer), seed=1)
    model.train()
    model.model.layers[0].eval()  # a mixed-mode model must come back mixed
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.lm_head.weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    scorer = CoherenceScorer(num_counterfactuals=1)
    args = (model, char_tokenizer, PROMPTS[:2], RATIONALES[:2], ANSWERS[:2])
    first = scorer.score(*args, step=3)
    with torch.inference_mode():
        second = scorer.score(*args, step=3)
    with torch.no_grad():
        third = scorer.score(*args, step=3)
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.model.layers[1].gradient_checkpointing is True
    # Eval mode inside the pass (no dropout) and seeded draws: identical scores every time.
    for c in ("zx", "xy", "zy"):
        assert torch.equal(getattr(first, c), getattr(second, c)) and torch.equal(getattr(first, c), getattr(third, c))


def test_lora_policy_scores_without_touching_adapter_grads(tiny_llama, char_tokenizer):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    policy.train()
    scorer = CoherenceScorer(num_counterfactuals=1)
    result = scorer.score(policy, char_tokenizer, PROMPTS[:2], RATIONALES[:2], ANSWERS[:2])
    with policy.disable_adapter():
        base = scorer.score(policy, char_tokenizer, PROMPTS[:2], RATIONALES[:2], ANSWERS[:2])
    assert all(p.grad is None for p in policy.parameters()) and policy.training
    # A fresh LoRA adapter is the identity (B = 0): the policy scores equal the base scores.
    torch.testing.assert_close(result.zx, base.zx, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- the Lightning callback


def make_rollout(stage="train"):
    n = 3
    return Rollout(
        examples=[None] * n,
        prompts=PROMPTS[:n],
        completions=[""] * n,
        rationales=RATIONALES[:n],
        answers=ANSWERS[:n],
        marker_found=torch.ones(n, dtype=torch.bool),
        group_size=1,
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 1, dtype=torch.long),
        completion_mask=torch.ones(n, 1, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        stage=stage,
    )


class FakeModule:
    def __init__(self, policy, reference, tokenizer):
        self.policy, self.tokenizer, self._reference, self.entered = policy, tokenizer, reference, 0

    @contextmanager
    def reference_model(self):
        self.entered += 1
        yield self._reference


def test_callback_attaches_the_three_terms_from_the_chosen_network(char_tokenizer):
    from conftest import make_tiny_llama

    policy, reference = make_tiny_llama(len(char_tokenizer), seed=5), make_tiny_llama(len(char_tokenizer), seed=6)
    module = FakeModule(policy, reference, char_tokenizer)
    scorer = CoherenceScorer(num_counterfactuals=1)
    rollout = make_rollout()
    CoherenceRewardCallback(scorer, weight_zx=0.2, weight_xy=0.0).score_rollout(module, rollout, step=7)
    assert module.entered == 1
    assert rollout.reward_weights == {"coherence_zx": 0.2, "coherence_xy": 0.0, "coherence_zy": 0.1}
    expected = scorer.score(reference, char_tokenizer, PROMPTS[:3], RATIONALES[:3], ANSWERS[:3], step=7)
    assert torch.equal(rollout.rewards["coherence_zx"], expected.zx)
    expected_stats = {"coherence/zx_shape", "coherence/xy_magnitude", "coherence/zy_norm", "time/coherence_s"}
    assert expected_stats <= set(rollout.stats)

    on_policy = make_rollout()
    CoherenceRewardCallback(scorer, network="policy").score_rollout(module, on_policy, step=7)
    assert module.entered == 1
    expected = scorer.score(policy, char_tokenizer, PROMPTS[:3], RATIONALES[:3], ANSWERS[:3], step=7)
    assert torch.equal(on_policy.rewards["coherence_zy"], expected.zy)

    evaluation = make_rollout(stage="validate")
    CoherenceRewardCallback(scorer).score_rollout(module, evaluation, step=7)
    assert evaluation.rewards == {}
    CoherenceRewardCallback(scorer, score_during_eval=True).score_rollout(module, evaluation, step=7)
    assert set(evaluation.rewards) == {"coherence_zx", "coherence_xy", "coherence_zy"}


def test_callback_rejects_unknown_network_and_negative_weights():
    with pytest.raises(ValueError, match="network='frozen'"):
        CoherenceRewardCallback(network="frozen")
    with pytest.raises(ValueError, match="weight_xy"):
        CoherenceRewardCallback(weight_xy=-1.0)


def test_k_comes_from_num_counterfactuals_never_from_the_lists(tiny_llama, char_tokenizer):
    cf_p, cf_x = explicit_counterfactuals(k=2)
    with pytest.raises(ValueError, match=r"counterfactual_prompts holds lists of \[2\] texts, but the scorer's "
                                         r"num_counterfactuals is 4; pass 4 texts per rollout"):
        CoherenceScorer().score(tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, cf_p, None)
    with pytest.raises(ValueError, match=r"counterfactual_rationales holds lists of \[1, 2\] texts"):
        CoherenceScorer(num_counterfactuals=2).score(tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS,
                                                     cf_p, [cf_x[0][:1]] + cf_x[1:])
    with pytest.raises(ValueError, match=r"unhardened scorer \(hardened=false\) uses none"):
        CoherenceScorer(hardened=False).score(tiny_llama, char_tokenizer, PROMPTS, RATIONALES, ANSWERS, cf_p, cf_x)
