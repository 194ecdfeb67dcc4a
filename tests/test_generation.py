"""Rollouts follow cepo's sampling options only: a model's generation_config defaults never leak in."""

import logging

import torch
from transformers import GenerationConfig as HFGenerationConfig

from cepo.policy.generation import KeyedSampler, generate_completions, overridden_defaults, sampling_config
from conftest import make_tiny_llama

# Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7; exaggerated here
# so that any leak changes what a tiny random model produces.
INSTRUCT_DEFAULTS = dict(do_sample=True, temperature=0.7, top_k=3, top_p=0.5, repetition_penalty=1.5,
                         no_repeat_ngram_size=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def model_with_instruct_defaults(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=3)
    model.generation_config = HFGenerationConfig(**INSTRUCT_DEFAULTS)
    return model


def teacher_forced_logits(model, generated):
    ids = torch.cat([generated.prompt_ids, generated.completion_ids], 1)
    mask = torch.cat([generated.prompt_mask, generated.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return logits[:, generated.prompt_ids.shape[1] - 1 : -1]


def test_greedy_decoding_is_the_argmax_of_the_models_logits(char_tokenizer):
    model = model_with_instruct_defaults(char_tokenizer)
    generated = generate_completions(model, char_tokenizer, ["abc", "hello world"], 1, max_new_tokens=24,
                                     temperature=0.0)
    argmax = teacher_forced_logits(model, generated).argmax(-1)
    real = generated.completion_mask.bool()
    assert real.sum() >= 24
    assert torch.equal(generated.completion_ids[real], argmax[real])
    assert model.generation_config.repetition_penalty == 1.5, "the model's own config is restored"


def test_samples_come_from_the_full_tempered_distribution(char_tokenizer):
    # With top_k 3 / top_p 0.5 leaking from the model, every sampled token would be among the 3 likeliest;
    # under softmax(logits) over ~100 tokens of a random model most are not.
    model = model_with_instruct_defaults(char_tokenizer)
    torch.manual_seed(0)
    generated = generate_completions(model, char_tokenizer, ["abc", "xyz"], 4, max_new_tokens=32, temperature=1.0)
    logits = teacher_forced_logits(model, generated)
    real = generated.completion_mask.bool()
    rank = (logits > logits.gather(-1, generated.completion_ids.unsqueeze(-1))).sum(-1)  # 0 = argmax
    outside_top3 = (rank[real] >= 3).float().mean()
    assert outside_top3 > 0.5, f"only {outside_top3:.2f} of sampled tokens lie outside the top 3"
    # no_repeat_ngram_size=1 would forbid any token from appearing twice in a completion
    assert any(len(set(row[m].tolist())) < int(m.sum()) for row, m in zip(generated.completion_ids, real))


def test_cepo_top_k_and_top_p_still_apply(char_tokenizer):
    model = model_with_instruct_defaults(char_tokenizer)
    torch.manual_seed(0)
    generated = generate_completions(model, char_tokenizer, ["abc", "xyz"], 4, max_new_tokens=16,
                                     temperature=1.0, top_k=2)
    logits = teacher_forced_logits(model, generated)
    real = generated.completion_mask.bool()
    rank = (logits > logits.gather(-1, generated.completion_ids.unsqueeze(-1))).sum(-1)
    assert int(rank[real].max()) <= 1


def test_overrides_of_the_models_defaults_are_named_in_the_log(char_tokenizer, caplog):
    model = model_with_instruct_defaults(char_tokenizer)
    config = sampling_config(max_new_tokens=8, temperature=1.0, eos_token_id=[2], pad_token_id=0)
    differences = overridden_defaults(model.generation_config, config)
    assert differences == {"temperature": (0.7, 1.0), "top_k": (3, 0), "top_p": (0.5, 1.0),
                           "repetition_penalty": (1.5, 1.0), "no_repeat_ngram_size": (1, 0)}
    greedy = sampling_config(max_new_tokens=8, temperature=0.0, eos_token_id=[2], pad_token_id=0)
    assert overridden_defaults(model.generation_config, greedy) == {
        "do_sample": (True, False), "repetition_penalty": (1.5, 1.0), "no_repeat_ngram_size": (1, 0)}
    with caplog.at_level(logging.INFO):
        generate_completions(model, char_tokenizer, ["abc"], 1, max_new_tokens=4, temperature=0.9)
    assert "repetition_penalty=1.5 -> 1.0" in caplog.text


# ------------------------------------------------------------------------ generation.sampling_seed
def keyed(model, tokenizer, prompts, group=3, **options):
    generated = generate_completions(model, tokenizer, prompts, group, max_new_tokens=12, temperature=1.0,
                                     sample_keys=[f"k:{p}" for p in prompts], **options)
    texts = tokenizer.batch_decode(generated.completion_ids, skip_special_tokens=True)
    return {p: texts[i * group:(i + 1) * group] for i, p in enumerate(prompts)}


def test_keyed_samples_do_not_depend_on_the_batch_or_the_global_random_state(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=3)
    torch.manual_seed(0)
    alone = keyed(model, char_tokenizer, ["abc"])
    torch.manual_seed(123)  # another global stream, another batch, another order, another padding width
    mixed = keyed(model, char_tokenizer, ["a much longer prompt", "xyz", "abc"])
    assert mixed["abc"] == alone["abc"]
    assert len(set(alone["abc"])) > 1, "the G samples of a prompt differ from one another"
    plain = []
    for prompts in (["abc"], ["a much longer prompt", "xyz", "abc"]):  # the unkeyed sampler, same global seed
        torch.manual_seed(0)
        ids = generate_completions(model, char_tokenizer, prompts, 3, max_new_tokens=12, temperature=1.0).completion_ids
        plain.append(char_tokenizer.batch_decode(ids[-3:], skip_special_tokens=True))
    assert plain[0] != plain[1], "without keys the batch around a prompt changes its samples"


def test_keyed_sampler_draws_from_the_filtered_tempered_softmax():
    # Gumbel-max: argmax(logits / T + Gumbel) is a sample of softmax(logits / T). 20000 rows, one per seed.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    temperature, n = 0.7, 20000
    sampler = KeyedSampler(list(range(n)), temperature, top_k=4, top_p=1.0, device="cpu")
    chosen = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    counts = torch.bincount(chosen, minlength=5).double()
    expected = torch.softmax(logits[0, :4] / temperature, -1).double() * n
    assert counts[4] == 0, "top_k 4 removes the least likely token"
    sigma = (expected * (1 - expected / n)).sqrt()
    assert torch.all((counts[:4] - expected).abs() < 4 * sigma), (counts, expected)
    # top_p 0.5 keeps the smallest set of likeliest tokens holding half the mass: here token 0 alone.
    nucleus = KeyedSampler(list(range(200)), 1.0, top_k=0, top_p=0.5, device="cpu")
    assert set(nucleus(torch.zeros(200, 1, dtype=torch.long), logits.expand(200, -1).clone()).argmax(-1).tolist()) == {0}
