"""Chunked log-probs equal the full-logits computation (values, entropy, gradients), and the base model's
own dropout never makes policy and reference log-probs of identical weights differ."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cepo.policy.forward import backbone_and_head, gather_logprobs, hidden_states
from cepo.policy.loading import LoraSettings, PolicyConfig, load_policy
from cepo.policy.logprobs import batched_logprobs, completion_logprobs, token_logprobs
from cepo.rl import entropy_from_logits, k3_kl


def full_logits_reference(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """The obvious implementation: the head on every completion position at once."""
    _, head = backbone_and_head(model)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    logits = head(hidden_states(model, mask, input_ids=ids)[:, prompt_ids.shape[1] - 1 : -1]).float() / temperature
    return gather_logprobs(logits, completion_ids), entropy_from_logits(logits.detach())


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (3, 5), generator=g)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    completion_ids = torch.randint(4, vocab, (3, 6), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits_ones(tiny_llama, chunk):
    tensors = batch(tiny_llama.config.vocab_size)
    mask = tensors[3].bool()
    weights = torch.randn(tensors[2].shape)
    temperature = 0.7

    ref_logp, ref_entropy = full_logits_reference(tiny_llama, *tensors, temperature)
    (ref_logp * weights * mask).sum().backward()
    ref_grads = [p.grad.clone() for p in tiny_llama.parameters()]
    tiny_llama.zero_grad()

    logp, entropy, _ = completion_logprobs(tiny_llama, *tensors, temperature=temperature, with_entropy=True,
                                           chunk_tokens=chunk)
    (logp * weights * mask).sum().backward()
    torch.testing.assert_close(logp[mask], ref_logp[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(logp[~mask], torch.zeros_like(logp[~mask]))
    for param, ref in zip(tiny_llama.parameters(), ref_grads):
        torch.testing.assert_close(param.grad, ref, rtol=1e-4, atol=1e-6)


def test_chunking_keeps_no_logits_for_the_backward_pass():
    # With a frozen head and one-token chunks, autograd must keep only hidden rows, never a (n, vocab) tensor.
    vocab, width, n = 5000, 8, 64
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(n, width, requires_grad=True)
    tokens = torch.randint(0, vocab, (n,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs(head, hidden, tokens, chunk_tokens=16)
    assert max(saved) < 16 * vocab, f"a saved tensor of {max(saved)} elements holds a chunk's logits"
    logp.sum().backward()
    full = torch.log_softmax(head(hidden.detach()), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, full)


def test_zero_temperature_is_refused_with_the_reason():
    head = torch.nn.Linear(4, 10)
    with pytest.raises(ValueError, match="positive temperature"):
        token_logprobs(head, torch.randn(3, 4), torch.tensor([1, 2, 3]), temperature=0.0)


def tiny_gpt2_with_dropout(path, dropout: float = 0.3):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_base_model_dropout_is_off_in_every_log_prob_pass(tmp_path, gradient_checkpointing):
    path = tiny_gpt2_with_dropout(tmp_path / "gpt2")
    policy, _ = load_policy(PolicyConfig(name_or_path=path, lora=LoraSettings(r=4, target_modules=["c_attn"]),
                                         gradient_checkpointing=gradient_checkpointing))
    policy.train()  # as during fit
    tensors = batch(40, seed=1)
    mask = tensors[3].float()
    old, _ = batched_logprobs(policy, tensors, micro_batch_size=2)
    with policy.disable_adapter():
        ref, _ = batched_logprobs(policy, tensors, micro_batch_size=2)
    torch.manual_seed(123)
    logp, _, _ = completion_logprobs(policy, *tensors)
    (logp * mask).sum().backward()  # a checkpointed backward recomputes the same network
    assert policy.training
    assert torch.equal(old, ref), "identical weights, so the reference log-probs must equal the policy's"
    assert torch.equal(k3_kl(old, ref), torch.zeros_like(old))
    assert torch.equal(torch.exp(logp.detach() - old) * mask, mask), "first ratio must be exactly 1"
    grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dropout_can_be_kept_on_request(tmp_path):
    path = tiny_gpt2_with_dropout(tmp_path / "gpt2")
    policy, _ = load_policy(PolicyConfig(name_or_path=path, disable_dropout=False,
                                         lora=LoraSettings(r=4, target_modules=["c_attn"])))
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    policy.train()
    tensors = batch(40, seed=1)
    # The no-grad passes run in eval mode anyway (and restore train mode after).
    first, _ = batched_logprobs(policy, tensors, micro_batch_size=3)
    second, _ = batched_logprobs(policy, tensors, micro_batch_size=3)
    assert torch.equal(first, second) and policy.training


def grouped_batch(vocab: int, group: int = 3):
    prompt_ids, prompt_mask, _, _ = batch(vocab, seed=2)
    g = torch.Generator().manual_seed(5)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0)
    completion_ids = torch.randint(4, vocab, (prompt_ids.shape[0], 6), generator=g)
    lengths = torch.randint(1, 7, (prompt_ids.shape[0],), generator=g)
    completion_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_sharing_each_groups_prompt_gives_the_same_logprobs_and_gradients(tiny_llama, tmp_path, architecture):
    if architecture == "llama":
        model = tiny_llama
    else:
        model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_with_dropout(tmp_path / "gpt2", dropout=0.0)).eval()
    tensors = grouped_batch(model.config.vocab_size)
    mask = tensors[3].bool()
    weights = torch.randn(tensors[2].shape)
    results = []
    for share in (False, True):
        model.zero_grad()
        logp, entropy, hidden = completion_logprobs(model, *tensors, with_entropy=True, return_hidden=True,
                                                    share_prompts=share)
        (logp * weights * mask).sum().backward()
        results.append((logp, entropy, hidden, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full_logp, full_entropy, full_hidden, full_grads), (logp, entropy, hidden, grads) = results
    torch.testing.assert_close(logp, full_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, full_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[mask], full_hidden[mask], rtol=1e-5, atol=1e-5)
    assert len(grads) == len(full_grads) > 0
    for grad, full in zip(grads, full_grads):
        torch.testing.assert_close(grad, full, rtol=1e-4, atol=1e-6)


def test_sliding_window_models_score_the_same_as_full_sequences():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    tensors = grouped_batch(40)
    mask = tensors[3].bool()
    with torch.no_grad():
        shared, _, _ = completion_logprobs(model, *tensors, share_prompts=True)
        full, _, _ = completion_logprobs(model, *tensors, share_prompts=False)
        ids, attention = torch.cat(tensors[::2], 1), torch.cat(tensors[1::2], 1)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp_min(0)).logits
    reference = gather_logprobs(logits[:, tensors[0].shape[1] - 1 : -1], tensors[2])
    torch.testing.assert_close(full[mask], reference[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[mask], reference[mask], rtol=1e-5, atol=1e-5)
